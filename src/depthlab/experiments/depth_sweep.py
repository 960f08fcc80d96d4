"""``depth-sweep``: which residual schemes train at depth without normalization.

SkipInit (De & Smith 2020, arXiv 2002.10444, Tables 1–2): ``x + α f(x)`` with α = 0 trains
1,000-layer networks like BatchNorm does, while α = 1 (``plain``) and the variance-preserving
``(x + f(x))/√2`` (``scaled``) fail at depth. Fixup (Zhang et al. 2019, arXiv 1901.09321, Fig. 3)
and ReZero (Bachlechner et al. 2020, arXiv 2003.04887) make the same point. Here: every scheme ×
depth is trained for a fixed budget (``steps``) on ``digits`` with a residual MLP (or on CIFAR-10
with a ResNet when ``data_dir`` is given); test accuracy after the budget, diverged runs marked.
Every scheme gets the same SGD recipe (momentum 0.9, lr 0.05, gradient clipping at norm 1; Fixup's
scalars at lr/10 as in its reference code).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, finite, fmt, train, verdict
from depthlab.registry import DepthlabError  # noqa: F401

SCHEMES = ("batchnorm", "skipinit", "fixup", "rezero", "plain", "scaled", "noskip")
GOOD = ("skipinit", "fixup", "rezero")
BAD = ("plain", "scaled")


@dataclass(frozen=True)
class Config:
    schemes: tuple[str, ...] = SCHEMES
    depths: tuple[int, ...] = (8, 64, 256)  # residual blocks (MLP) or 6n+2 (ResNet)
    width: int = 64  # MLP width, or Wide-ResNet multiplier k with cifar10
    steps: int = 100  # training budget (SGD steps, momentum 0.9)
    batch_size: int = 64
    lr: float = 0.05
    grad_clip: float = 1.0  # global gradient-norm clipping, the same for every scheme (0: off)
    data_dir: str = ""  # a CIFAR-10 python folder switches to cifar10 + ResNet
    seed: int = 0


@EXPERIMENTS.register()
class DepthSweep(Experiment):
    name = "depth-sweep"
    zero_ok = ("grad_clip", "seed")

    def check(self, cfg: Config) -> None:
        if cfg.data_dir:
            from depthlab.data.cifar10 import find_folder
            from depthlab.models.resnet import check_resnet_depth

            find_folder(cfg.data_dir)
            for d in cfg.depths:
                check_resnet_depth(d, "depths")

    title = "accuracy after a fixed budget: schemes × depth, no normalization vs BN"
    paper = (
        "De & Smith 2020, arXiv 2002.10444, Tables 1–2; Zhang et al. 2019, arXiv 1901.09321, Fig. 3"
    )
    columns = ("scheme", "depth", "test_accuracy", "final_train_loss", "diverged", "wall_time_s")
    Config = Config
    presets = {
        "smoke": Config(
            schemes=("batchnorm", "skipinit", "plain"), depths=(4, 64), width=32, steps=30
        ),
        "quick": Config(),
        "full": Config(depths=(10, 100, 1000, 10000), width=128, steps=2000),
    }

    def cells(self, cfg: Config) -> list[dict]:
        return [
            {
                "scheme": s,
                "depth": d,
                "width": cfg.width,
                "steps": cfg.steps,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "grad_clip": cfg.grad_clip,
                "data_dir": cfg.data_dir,
                "seed": cfg.seed,
            }
            for d in cfg.depths
            for s in cfg.schemes
        ]

    def run_cell(self, cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.data import create_dataset

        torch.manual_seed(cell["seed"])
        if cell["data_dir"]:
            data = create_dataset("cifar10", data_dir=cell["data_dir"])
            model = dl.create_model(
                "resnet", depth=cell["depth"], width=cell["width"], scheme=cell["scheme"]
            )
        else:
            data = create_dataset("digits", flat=True)
            model = dl.create_model(
                "mlp", depth=cell["depth"], width=cell["width"], scheme=cell["scheme"]
            )
        hist = train(
            model,
            data,
            cell,
            grad_clip=cell["grad_clip"] or None,
            scalar_lr_mult=0.1 if cell["scheme"] == "fixup" else 1.0,
        )
        s = hist.summary
        return [
            {
                "test_accuracy": finite(s.get("test_accuracy")),
                "final_train_loss": finite(s.get("final_train_loss")),
                "diverged": bool(hist.diverged),
                "diverged_step": hist.diverged_step if hist.diverged_step is not None else -1,
                "wall_time_s": finite(s.get("wall_time_s")),
            }
        ]

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        fig, ax = plt.subplots(figsize=(6, 3.8))
        for s, g in df.groupby("scheme", sort=False):
            g = g.sort_values("depth")
            acc = g["test_accuracy"].where(~g["diverged"].astype(bool), 0.0)
            (line,) = ax.plot(g["depth"], acc, marker="o", label=s)
            div = g[g["diverged"].astype(bool)]
            ax.plot(div["depth"], [0.0] * len(div), "x", color=line.get_color(), ms=10)
        ax.set_xscale("log")
        ax.set_xlabel("depth (residual blocks)")
        ax.set_ylabel(f"test accuracy after {cfg.steps} steps (× = diverged)")
        ax.legend(fontsize=7)
        return [save_fig(fig, out_dir / "depth_sweep.png")]

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        d = int(df["depth"].max())
        at = df[df["depth"] == d].set_index("scheme")

        def acc(s: str) -> float:
            if s not in at.index:
                return math.nan
            row = at.loc[s]
            return 0.0 if bool(row["diverged"]) else float(row["test_accuracy"])

        def status(s: str) -> str:
            if s not in at.index:
                return f"{s} n/a"
            return f"{s} diverged" if bool(at.loc[s]["diverged"]) else f"{s} {fmt(acc(s), 2)}"

        bn = acc("batchnorm")
        good = [s for s in GOOD if s in at.index]
        bad = [s for s in BAD if s in at.index]
        keep_up = [s for s in good if acc(s) >= bn - 0.05]
        fail = [s for s in bad if acc(s) < max(0.5 * bn, 0.3)]
        rows = [
            Claim(
                claim="Without normalization, α=1 (plain) and 1/√2 scaling (scaled) fail at depth",
                paper="plain/scaled fail at 1,000 layers (Table 2)",
                measured=f"depth {d}: " + ", ".join(status(s) for s in bad),
                verdict=verdict(len(fail) == len(bad) > 0, partly=bool(fail)),
            ),
            Claim(
                claim="SkipInit, Fixup and ReZero train at depth as well as BatchNorm",
                paper="SkipInit ≈ BN at 1,000 layers (Table 1); Fixup ≈ BN at 10,000 (Fig. 3)",
                measured=f"depth {d}: batchnorm {fmt(bn, 2)}, "
                + ", ".join(status(s) for s in good),
                verdict=verdict(len(keep_up) == len(good) > 0, partly=bool(keep_up)),
            ),
        ]
        return rows
