"""``bn-signal``: signal propagation through normalized ResNets at initialisation (De & Smith
2020, arXiv 2002.10444, Fig. 4).

In a pre-activation ResNet with BatchNorm inside each branch, every branch outputs ≈ unit
variance (the BN before it normalizes its input), so the variance on the skip path grows
linearly, ``Var(x_i) ≈ Var(x_0) + i``, and branch i is effectively downscaled by ~1/√i. BN's
running variance, which tracks the variance of BN's input (the skip path), grows with depth too
(``bn_batch_var``: the batch variance that the running variance averages). Measured with
:func:`depthlab.signal_propagation` on a deep linear ResNet (``mlp`` with ``activation=linear``)
and a ReLU conv ResNet, one forward pass in training mode on a Gaussian batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, fmt, verdict
from depthlab.registry import DepthlabError


@dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = ("linear-mlp", "relu-resnet")  # which networks
    linear_depth: int = 100  # residual blocks of the deep linear MLP
    width: int = 64  # its width
    resnet_depth: int = 56  # CIFAR ResNet 6n+2 (3n residual blocks)
    batch_size: int = 64  # Gaussian inputs per forward pass
    seed: int = 0


@EXPERIMENTS.register()
class BNSignal(Experiment):
    name = "bn-signal"
    choices = {"models": ("linear-mlp", "relu-resnet")}

    def check(self, cfg: Config) -> None:
        from depthlab.models.resnet import check_resnet_depth

        if "relu-resnet" in cfg.models:
            check_resnet_depth(cfg.resnet_depth, "resnet_depth")
        if cfg.batch_size < 2:
            raise DepthlabError(f"batch_size must be ≥ 2 (batch statistics), got {cfg.batch_size}")

    title = "skip-path and branch variance per block in BN ResNets at init"
    paper = "De & Smith 2020, arXiv 2002.10444, Fig. 4"
    columns = ("model", "block", "skip_var", "branch_var", "out_var", "bn_batch_var")
    Config = Config
    presets = {
        "smoke": Config(linear_depth=20, width=32, resnet_depth=14, batch_size=32),
        "quick": Config(),
        "full": Config(linear_depth=1000, width=256, resnet_depth=1202, batch_size=128),
    }

    def cells(self, cfg: Config) -> list[dict]:
        out = []
        for m in cfg.models:
            if m == "linear-mlp":
                out.append({"model": m, "depth": cfg.linear_depth, "width": cfg.width})
            else:
                out.append({"model": m, "depth": cfg.resnet_depth, "width": 1})
            out[-1].update(batch_size=cfg.batch_size, seed=cfg.seed)
        return out

    def run_cell(self, cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.diagnostics.signal import signal_propagation

        torch.manual_seed(cell["seed"])
        n = cell["batch_size"]
        if cell["model"] == "linear-mlp":
            w = cell["width"]
            model = dl.create_model(
                "mlp",
                depth=cell["depth"],
                width=w,
                in_dim=w,
                activation="linear",
                scheme="batchnorm",
            )
            x = torch.randn(n, w)
        else:
            model = dl.create_model("resnet", depth=cell["depth"], scheme="batchnorm")
            x = torch.randn(n, 3, 32, 32)
        model.train()
        df = signal_propagation(model, x)
        keep = [c for c in df.columns if c != "model"]
        return df[keep].to_dict("records")

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        models = list(dict.fromkeys(df["model"]))
        fig, axes = plt.subplots(1, len(models), figsize=(4.5 * len(models), 3.4), squeeze=False)
        for ax, m in zip(axes[0], models, strict=True):
            g = df[df["model"] == m]
            ax.plot(g["block"], g["skip_var"], label="skip path Var")
            ax.plot(g["block"], g["branch_var"], label="branch Var")
            if g["bn_batch_var"].notna().any():
                ax.plot(
                    g["block"],
                    g["bn_batch_var"],
                    "--",
                    label="var of BN input (tracked by running var)",
                )
            ax.set_yscale("log")
            ax.set_title(m)
            ax.set_xlabel("block i")
        axes[0][0].legend(fontsize=7)
        return [save_fig(fig, out_dir / "bn_signal.png")]

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        parts, oks, partly = [], [], []
        for m, g in df.groupby("model", sort=False):
            g = g.sort_values("block")
            skip = g["skip_var"].to_numpy(float)
            blocks = g["block"].to_numpy(float)
            slope = float(np.polyfit(blocks, skip, 1)[0]) if len(g) > 1 else math.nan
            corr = float(np.corrcoef(blocks, skip)[0, 1]) if len(g) > 1 else math.nan
            branch = float(np.median(g["branch_var"]))
            ratio = skip[-1] / max(skip[0], 1e-12)
            bn = g["bn_batch_var"].to_numpy(float)
            parts.append(
                f"{m}: skip Var {fmt(skip[0])}→{fmt(skip[-1])} over {len(g)} blocks "
                f"(slope {fmt(slope, 2)}/block, r={fmt(corr, 3)}), median branch Var "
                f"{fmt(branch, 2)}, BN input var {fmt(bn[0])}→{fmt(bn[-1])}"
            )
            oks.append(corr > 0.9 and 0.25 < branch < 4.0 and 0.3 < slope < 3.0)  # O(1) per block
            partly.append(ratio > 2)
        return [
            Claim(
                claim="In BN ResNets the skip-path variance grows linearly with depth (≈ i) "
                "while each branch outputs unit variance",
                paper="Var(skip) ≈ i, Var(branch) ≈ 1 (Fig. 4)",
                measured="; ".join(parts),
                verdict=verdict(all(oks), partly=any(oks) or all(partly)),
            )
        ]
