"""``batch-size``: where BatchNorm beats SkipInit (De & Smith 2020, arXiv 2002.10444, Figs 5–6).

SkipInit matches BN at small batch sizes; BN's advantage appears at large batch, where it
tolerates (and needs) larger learning rates. For each scheme × batch size, a grid of learning
rates is trained for the same number of epochs; we report the best test accuracy and the
learning rate that achieved it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, finite, fmt, train, verdict


@dataclass(frozen=True)
class Config:
    schemes: tuple[str, ...] = ("batchnorm", "skipinit")
    batch_sizes: tuple[int, ...] = (32, 128, 512)
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)  # learning-rate grid (SGD, momentum 0.9)
    epochs: float = 8.0  # same number of epochs for every batch size
    depth: int = 16  # residual blocks of the MLP
    width: int = 64
    seed: int = 0


@EXPERIMENTS.register()
class BatchSize(Experiment):
    name = "batch-size"
    zero_ok = ("checkpointing", "seed")

    title = "BN vs SkipInit across batch sizes: best accuracy and optimal learning rate"
    paper = "De & Smith 2020, arXiv 2002.10444, Figs 5–6"
    columns = ("scheme", "batch_size", "lr", "test_accuracy", "diverged")
    Config = Config
    presets = {
        "smoke": Config(batch_sizes=(32, 256), lrs=(0.03, 0.3), epochs=1.0, depth=4, width=32),
        "quick": Config(),
        "full": Config(
            batch_sizes=(16, 64, 256, 1024),
            lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
            epochs=30.0,
            depth=32,
            width=128,
        ),
    }

    def cells(self, cfg: Config) -> list[dict]:
        return [
            {
                "scheme": s,
                "batch_size": b,
                "lr": lr,
                "epochs": cfg.epochs,
                "depth": cfg.depth,
                "width": cfg.width,
                "seed": cfg.seed,
            }
            for s in cfg.schemes
            for b in cfg.batch_sizes
            for lr in cfg.lrs
        ]

    def run_cell(self, cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.data import create_dataset

        torch.manual_seed(cell["seed"])
        data = create_dataset("digits", flat=True)
        steps = max(1, math.ceil(cell["epochs"] * data.num_train() / cell["batch_size"]))
        model = dl.create_model(
            "mlp", depth=cell["depth"], width=cell["width"], scheme=cell["scheme"]
        )
        hist = train(model, data, cell, steps=steps)
        s = hist.summary
        return [
            {
                "steps": steps,
                "test_accuracy": finite(s.get("test_accuracy")),
                "final_train_loss": finite(s.get("final_train_loss")),
                "diverged": bool(hist.diverged),
            }
        ]

    @staticmethod
    def best(df: pd.DataFrame) -> pd.DataFrame:
        """Per scheme × batch size: best accuracy (diverged = 0) and the lr achieving it."""
        d = df.copy()
        d["acc"] = d["test_accuracy"].fillna(0.0).where(~d["diverged"].astype(bool), 0.0)
        idx = d.groupby(["scheme", "batch_size"])["acc"].idxmax()
        return d.loc[idx, ["scheme", "batch_size", "lr", "acc"]].reset_index(drop=True)

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        best = self.best(df)
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
        for s, g in best.groupby("scheme", sort=False):
            axes[0].plot(g["batch_size"], g["acc"], marker="o", label=s)
            axes[1].plot(
                g["batch_size"], g["lr"], marker="o", ls="-" if s == "batchnorm" else "--", label=s
            )
        for ax, lab in zip(axes, ("best test accuracy", "optimal learning rate"), strict=True):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size")
            ax.set_ylabel(lab)
        axes[1].set_yscale("log")
        axes[0].legend(fontsize=7)
        return [save_fig(fig, out_dir / "batch_size.png")]

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        best = self.best(df).set_index(["scheme", "batch_size"])
        small, large = min(cfg.batch_sizes), max(cfg.batch_sizes)
        if ("batchnorm", large) not in best.index or ("skipinit", large) not in best.index:
            return []

        def get(s: str, b: int, col: str) -> float:
            return float(best.loc[(s, b), col])

        gap_small = get("batchnorm", small, "acc") - get("skipinit", small, "acc")
        gap_large = get("batchnorm", large, "acc") - get("skipinit", large, "acc")
        lr_bn = [get("batchnorm", b, "lr") for b in sorted(cfg.batch_sizes)]
        lr_si = [get("skipinit", b, "lr") for b in sorted(cfg.batch_sizes)]
        advantage_grows = gap_large > gap_small and gap_large > 0
        bn_lr_larger = lr_bn[-1] >= lr_si[-1]
        return [
            Claim(
                claim="BN's advantage over SkipInit appears at large batch size, where BN "
                "tolerates larger learning rates",
                paper="equal at small batch; BN better and higher optimal lr at large batch",
                measured=f"BN−SkipInit best acc: batch {small} {gap_small:+.3f}, batch {large} "
                f"{gap_large:+.3f}; optimal lr BN {', '.join(fmt(x, 2) for x in lr_bn)} vs "
                f"SkipInit {', '.join(fmt(x, 2) for x in lr_si)}",
                verdict=verdict(
                    advantage_grows and bn_lr_larger, partly=advantage_grows or bn_lr_larger
                ),
            )
        ]
