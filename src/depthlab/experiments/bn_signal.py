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

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, verdict
from depthlab.experiments.rules import spread
from depthlab.registry import DepthlabError


@dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = ("linear-mlp", "relu-resnet")  # which networks
    linear_depth: int = 100  # residual blocks of the deep linear MLP
    width: int = 64  # its width
    resnet_depth: int = 56  # CIFAR ResNet 6n+2 (3n residual blocks)
    batch_size: int = 64  # Gaussian inputs per forward pass
    seeds: tuple[int, ...] = (0, 1, 2)


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
    columns = ("model", "seed", "block", "skip_var", "branch_var", "out_var", "bn_batch_var")
    version = 2
    zero_ok = ("seeds",)
    Config = Config
    presets = {
        "smoke": Config(linear_depth=20, width=32, resnet_depth=14, batch_size=32),
        "quick": Config(),
        "full": Config(linear_depth=1000, width=256, resnet_depth=1202, batch_size=128),
    }

    def cells(self, cfg: Config) -> list[dict]:
        out = []
        for seed in cfg.seeds:
            for m in cfg.models:
                if m == "linear-mlp":
                    out.append({"model": m, "depth": cfg.linear_depth, "width": cfg.width})
                else:
                    out.append({"model": m, "depth": cfg.resnet_depth, "width": 1})
                out[-1].update(batch_size=cfg.batch_size, seed=seed)
        return out

    def cell_model(self, cell: dict) -> tuple[str, dict, int]:
        name = "mlp" if cell["model"] == "linear-mlp" else "resnet"
        return name, {"depth": cell["depth"], "width": cell["width"]}, cell["batch_size"]

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
        if "seed" not in df:
            df = df.assign(seed=0)
        for ax, m in zip(axes[0], models, strict=True):
            g = df[df["model"] == m]
            for col, label, ls in (
                ("skip_var", "skip path Var", "-"),
                ("branch_var", "branch Var", "-"),
                ("bn_batch_var", "var of BN input (tracked by running var)", "--"),
            ):
                if not g[col].notna().any():
                    continue
                t = g.pivot_table(index="block", columns="seed", values=col)
                (line,) = ax.plot(t.index, t.mean(axis=1), ls, label=label)
                ax.fill_between(t.index, t.min(axis=1), t.max(axis=1), color=line.get_color(),
                                alpha=0.2)  # fmt: skip
            ax.set_yscale("log")
            ax.set_title(f"{m} (mean, min–max over {g['seed'].nunique()} seeds)", fontsize=9)
            ax.set_xlabel("block i")
        axes[0][0].legend(fontsize=7)
        return [save_fig(fig, out_dir / "bn_signal.png")]

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        if "seed" not in df:
            df = df.assign(seed=0)
        parts, oks, partly, why = [], [], [], []
        for m, gm in df.groupby("model", sort=False):
            per = []
            for _, g in gm.groupby("seed"):
                g = g.sort_values("block")
                skip = g["skip_var"].to_numpy(float)
                blocks = g["block"].to_numpy(float)
                slope = float(np.polyfit(blocks, skip, 1)[0]) if len(g) > 1 else math.nan
                corr = float(np.corrcoef(blocks, skip)[0, 1]) if len(g) > 1 else math.nan
                branch = float(np.median(g["branch_var"]))
                ratio = skip[-1] / max(skip[0], 1e-12)
                per.append((skip[0], skip[-1], slope, corr, branch, ratio, len(g)))
            s0, s1, slope, corr, branch, ratio, n = (list(x) for x in zip(*per, strict=True))
            parts.append(
                f"{m}: skip Var {spread(s0)}→{spread(s1, 3)} over {n[0]} blocks (slope "
                f"{spread(slope)}/block, r={spread(corr, 3)}), median branch Var {spread(branch)}"
            )
            ok = [c > 0.9 and 0.25 < b < 4.0 and 0.3 < sl < 3.0
                  for c, b, sl in zip(corr, branch, slope, strict=True)]  # fmt: skip
            oks.append(all(ok))
            partly.append(all(r > 2 for r in ratio))
            if not all(ok):
                why.append(f"{m}: not linear (r > 0.9, slope 0.3–3/block, branch Var ¼–4) "
                           f"on every seed")  # fmt: skip
        seeds = ", ".join(map(str, sorted(set(df["seed"]))))
        return [
            Claim(
                claim="In BN ResNets the skip-path variance grows linearly with depth (≈ i) "
                "while each branch outputs unit variance",
                paper="Var(skip) ≈ i, Var(branch) ≈ 1 (Fig. 4)",
                paper_setup="BN ResNet at init, Gaussian inputs",
                setup=f"at init: deep linear BN MLP ({cfg.linear_depth} blocks × {cfg.width}), "
                f"ReLU BN ResNet-{cfg.resnet_depth} on 3×32×32 Gaussian inputs, batch "
                f"{cfg.batch_size}, seeds {seeds}",
                measured="; ".join(parts),
                verdict=verdict(all(oks), partly=any(oks) or all(partly)),
                rule="; ".join(why) or "linear growth and unit branch variance on every seed",
            )
        ]
