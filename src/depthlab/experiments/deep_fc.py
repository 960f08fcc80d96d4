"""``deep-fc``: a ReZero fully connected network with thousands of layers trains (Bachlechner et
al. 2020, arXiv 2003.04887, Section 4: a 10,000-layer FC network fits the training set).

Every ReZero block ``x + α W σ(x)`` is the identity at init (α = 0), so the input-output Jacobian
is the identity however deep the network is and gradients reach every layer. The comparison nets
fail: without skips (``noskip``) the signal vanishes or explodes through thousands of layers, and
``plain`` (α = 1) doubles the variance per block and overflows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from depthlab.experiments.base import (
    EXPERIMENTS,
    Claim,
    Experiment,
    finite,
    fmt,
    per_scheme,
    train,
    verdict,
)


@dataclass(frozen=True)
class Config:
    schemes: tuple[str, ...] = ("rezero", "noskip", "plain")
    depth: int = 1000  # fully connected layers
    width: int = 64
    steps: int = 100
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 0.001
    checkpointing: int = 0  # activation checkpointing segments (0: off), for very deep nets
    seed: int = 0


@EXPERIMENTS.register()
class DeepFC(Experiment):
    name = "deep-fc"
    zero_ok = ("checkpointing", "seed")

    title = "a very deep ReZero FC net fits its training set; FC and FC+Res do not"
    paper = "Bachlechner et al. 2020, arXiv 2003.04887, Section 4 (10,000 layers)"
    columns = ("scheme", "depth", "step", "train_loss", "test_accuracy", "diverged")
    Config = Config
    presets = {
        "smoke": Config(depth=100, width=32, steps=40),
        "quick": Config(),
        "full": Config(depth=10000, width=256, steps=2000, checkpointing=100),
    }

    def cells(self, cfg: Config) -> list[dict]:
        return per_scheme(
            cfg, "depth", "width", "steps", "batch_size", "optimizer", "lr", "checkpointing", "seed"
        )

    def run_cell(self, cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.data import create_dataset

        torch.manual_seed(cell["seed"])
        data = create_dataset("digits", flat=True)
        model = dl.create_model(
            "mlp", depth=cell["depth"], width=cell["width"], scheme=cell["scheme"]
        )
        hist = train(
            model,
            data,
            cell,
            optimizer=cell["optimizer"],
            checkpointing=cell["checkpointing"],
            divergence_factor=None,
            log_every=max(1, cell["steps"] // 50),
        )
        acc = finite(hist.summary.get("test_accuracy"))
        frame = hist.frame()
        out = []
        last = len(frame) - 1
        for j, (step, loss) in enumerate(zip(frame["step"], frame["train_loss"], strict=True)):
            out.append(
                {
                    "step": int(step),
                    "train_loss": finite(loss),
                    "test_accuracy": acc if j == last else float("nan"),
                    "diverged": bool(hist.diverged),
                }
            )
        return out

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        fig, ax = plt.subplots(figsize=(6, 3.6))
        for s, g in df.groupby("scheme", sort=False):
            ax.plot(g["step"], g["train_loss"], label=s)
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel("training loss")
        ax.set_title(f"{cfg.depth}-layer FC, width {cfg.width} (digits)")
        ax.legend(fontsize=7)
        return [save_fig(fig, out_dir / "deep_fc.png")]

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        def stats(s: str) -> tuple[float, float, float, bool]:
            g = df[df["scheme"] == s]
            first = float(g["train_loss"].iloc[0])
            last = float(g["train_loss"].tail(3).mean())
            acc = (
                float(g["test_accuracy"].dropna().iloc[-1])
                if g["test_accuracy"].notna().any()
                else float("nan")
            )
            return first, last, acc, bool(g["diverged"].any())

        if "rezero" not in set(df["scheme"]):
            return []
        r0, r1, racc, _ = stats("rezero")
        parts = [f"ReZero loss {fmt(r0, 3)}→{fmt(r1, 2)}, test acc {fmt(racc, 2)}"]
        others_fail = []
        for s in [s for s in cfg.schemes if s != "rezero" and s in set(df["scheme"])]:
            o0, o1, oacc, div = stats(s)
            parts.append(
                f"{s} " + ("diverged" if div else f"{fmt(o0, 3)}→{fmt(o1, 2)}, acc {fmt(oacc, 2)}")
            )
            others_fail.append(div or not (o1 < 0.5 * o0) or oacc < racc - 0.2)
        trains = r1 < 0.5 * r0 and racc > 0.5
        return [
            Claim(
                claim="A ReZero fully connected net with thousands of layers trains; "
                "FC without skips and FC+Res at α=1 do not",
                paper="10,000-layer ReZero FC net fits its training set",
                measured=f"{cfg.depth} layers: " + "; ".join(parts),
                verdict=verdict(trains and all(others_fail), partly=trains),
            )
        ]
