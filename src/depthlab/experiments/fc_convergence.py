"""``fc-convergence``: ReZero makes deep fully connected networks converge fast (Bachlechner et al.
2020, "ReZero is All You Need: Fast Convergence at Large Depth", arXiv 2003.04887, Fig. 3).

32-layer, width-256 fully connected ReLU networks: plain FC (``noskip``: ``x ↦ W σ(x)``),
FC + residual (``plain``: ``x + W σ(x)``), FC + LayerNorm (``layernorm``: ``x + W σ(LN(x))``) and
ReZero (``x + α W σ(x)``, α = 0 at init). Trained with Adagrad as in the reference notebook; we
report iterations until the (smoothed) training loss first reaches a target. Paper: ReZero
converges up to 15× faster; reference notebook: loss after 10 epochs 0.52 vs 1.87–2.02.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from depthlab.experiments.base import (
    EXPERIMENTS,
    Claim,
    Experiment,
    finite,
    steps_to_target,
    train,
    verdict,
)
from depthlab.experiments.rules import spread
from depthlab.registry import DepthlabError

LABELS = {"noskip": "FC", "plain": "FC+Res", "layernorm": "FC+LayerNorm", "rezero": "ReZero"}


@dataclass(frozen=True)
class Config:
    schemes: tuple[str, ...] = ("noskip", "plain", "layernorm", "rezero")
    depth: int = 32  # fully connected layers
    width: int = 256
    steps: int = 250
    batch_size: int = 128
    optimizer: str = "adagrad"
    lr: float = 0.01
    target_loss: float = 0.2  # smoothed training loss that counts as converged
    smooth: int = 10  # moving-average window (steps) for the training loss
    dataset: str = "digits"  # digits | cifar10 (needs data_dir) | synthetic
    data_dir: str = ""
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N


#: the paper's lower figure: "7 to 15 times faster than the other techniques"
PAPER_SPEEDUP = 7.0


@EXPERIMENTS.register()
class FCConvergence(Experiment):
    name = "fc-convergence"
    choices = {"dataset": ("digits", "cifar10", "synthetic"), "optimizer": ("adagrad", "sgd",
               "adam", "adamw")}  # fmt: skip
    zero_ok = ("seeds",)
    version = 2

    def check(self, cfg: Config) -> None:
        if cfg.dataset == "cifar10" or cfg.data_dir:
            from depthlab.data.cifar10 import find_folder

            if cfg.dataset != "cifar10":
                raise DepthlabError(
                    f"data_dir is only read with dataset=cifar10, got {cfg.dataset}"
                )
            find_folder(cfg.data_dir or None)

    title = "32-layer FC nets: iterations to a target training loss, ReZero vs FC/Res/LayerNorm"
    paper = "Bachlechner et al. 2020, arXiv 2003.04887, Fig. 3"
    columns = ("scheme", "seed", "step", "train_loss", "smoothed_loss", "diverged")
    Config = Config
    needs = {"full": ("data_dir",)}
    presets = {
        "smoke": Config(depth=32, width=64, steps=60, target_loss=1.0, smooth=5, seeds=(0, 1)),
        "quick": Config(),
        # the paper's Fig. 3 setup: 32 layers × 256, CIFAR-10, Adagrad lr 0.01 (the reference
        # notebook), 10 epochs (3,900 steps of 128); the target lies between the notebook's
        # final losses after 10 epochs (ReZero 0.52, the others 1.87–2.02)
        "full": Config(steps=3900, target_loss=1.0, smooth=50, dataset="cifar10"),
    }

    def cells(self, cfg: Config) -> list[dict]:
        keys = ("depth", "width", "steps", "batch_size", "optimizer", "lr", "smooth", "dataset")
        return [
            {
                "scheme": s,
                **{k: getattr(cfg, k) for k in keys},
                "data_dir": cfg.data_dir,
                "seed": seed,
            }  # fmt: skip
            for seed in cfg.seeds
            for s in cfg.schemes
        ]

    def cell_model(self, cell: dict) -> tuple[str, dict, int]:
        return "mlp", {"depth": cell["depth"], "width": cell["width"]}, cell["batch_size"]

    def run_cell(self, cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.data import create_dataset

        torch.manual_seed(cell["seed"])
        opts = {"flat": True} if cell["dataset"] == "digits" else {}
        if cell["data_dir"]:
            opts["data_dir"] = cell["data_dir"]
        data = create_dataset(cell["dataset"], **opts)
        in_dim = math.prod(data.input_shape)
        model = dl.create_model(
            "mlp",
            depth=cell["depth"],
            width=cell["width"],
            scheme=cell["scheme"],
            in_dim=in_dim,
            num_classes=data.num_classes or 10,
        )
        hist = train(
            model, data, cell, optimizer=cell["optimizer"], momentum=0.0, divergence_factor=None
        )
        frame = hist.frame()
        loss = frame["train_loss"].astype(float)
        smoothed = loss.rolling(cell["smooth"], min_periods=1).mean()
        return [
            {
                "step": int(step),
                "train_loss": finite(l),
                "smoothed_loss": finite(sm),
                "diverged": bool(hist.diverged),
            }
            for step, l, sm in zip(frame["step"], loss, smoothed, strict=True)
        ]

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        fig, ax = plt.subplots(figsize=(6, 3.8))
        for s, g in df.groupby("scheme", sort=False):
            loss = g.pivot_table(index="step", columns="seed", values="smoothed_loss")
            (line,) = ax.plot(loss.index, loss.mean(axis=1), label=LABELS.get(s, s))
            ax.fill_between(
                loss.index, loss.min(axis=1), loss.max(axis=1), color=line.get_color(), alpha=0.2
            )
        ax.axhline(cfg.target_loss, color="gray", ls=":", lw=1)
        ax.set_yscale("log")
        ax.set_xlabel("iteration")
        ax.set_ylabel("training loss (smoothed; mean, min–max)")
        ax.set_title(f"{cfg.depth}-layer FC, width {cfg.width}, {len(cfg.seeds)} seeds", fontsize=9)
        ax.legend(fontsize=7)
        return [save_fig(fig, out_dir / "fc_convergence.png")]

    def iterations(self, df: pd.DataFrame, target: float) -> dict[str, dict[int, float]]:
        """``{scheme: {seed: first step whose smoothed loss ≤ target}}`` (inf: never)."""
        if "seed" not in df:
            df = df.assign(seed=0)
        out: dict[str, dict[int, float]] = {}
        for (s, seed), g in df.groupby(["scheme", "seed"], sort=False):
            out.setdefault(s, {})[int(seed)] = steps_to_target(
                list(g["step"]), list(g["smoothed_loss"]), target
            )
        return out

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        its = self.iterations(df, cfg.target_loss)
        if "rezero" not in its or len(its) < 2:
            return []
        rz = its["rezero"]
        others = {s: v for s, v in its.items() if s != "rezero"}
        # speedup over the fastest other arm, per seed; an arm that never reached the target is
        # slower than the budget, so only the lower bound budget / ReZero's count is known
        speed: dict[int, float] = {}
        for seed, r in rz.items():
            best = min(v.get(seed, math.inf) for v in others.values())
            if math.isinf(r):
                speed[seed] = 0.0
            else:
                speed[seed] = (cfg.steps if math.isinf(best) else best) / max(r, 1.0)
        fastest = all(
            math.isfinite(r) and all(r < v.get(seed, math.inf) for v in others.values())
            for seed, r in rz.items()
        )
        paper_like = fastest and all(x >= PAPER_SPEEDUP for x in speed.values())
        final = df.groupby(["scheme", "seed"], sort=False)["smoothed_loss"].last()

        def it(s: str) -> str:
            return spread(its[s].values(), 3)

        measured = (
            f"iterations to loss {cfg.target_loss:g}: "
            + ", ".join(f"{LABELS.get(s, s)} {it(s)}" for s in its)
            + "; ReZero's speed-up over the fastest other, per seed: "
            + "/".join(f"{speed[k]:.1f}×" for k in sorted(speed))
            + " (a lower bound where no other arm reached the target); final loss "
            + ", ".join(f"{LABELS.get(s, s)} {spread(final[s].values)}" for s in its)
        )
        why = ""
        if not fastest:
            why = "ReZero is not the first to reach the target on every seed"
        elif not paper_like:
            why = f"ReZero is fastest on every seed, but not {PAPER_SPEEDUP:g}× faster on every one"
        return [
            Claim(
                claim="A 32-layer ReZero FC net fits its training data 7 to 15 times faster than "
                "FC, FC+Res and FC+LayerNorm",
                paper="7–15× faster convergence (Fig. 3)",
                paper_setup="32-layer FC, width 256, ReLU, CIFAR-10, Adagrad",
                setup=f"MLP, {cfg.depth} layers × width {cfg.width}, ReLU, {cfg.dataset}, "
                f"{cfg.optimizer} lr {cfg.lr:g}, batch {cfg.batch_size}, {cfg.steps} steps, "
                f"target smoothed loss {cfg.target_loss:g}, seeds "
                f"{', '.join(map(str, cfg.seeds))}"
                + ("" if cfg.dataset == "cifar10" else "; digits, not CIFAR-10"),
                measured=measured,
                verdict=verdict(paper_like, partly=fastest),
                rule=why or f"fastest on every seed and ≥ {PAPER_SPEEDUP:g}× faster on every seed",
            )
        ]
