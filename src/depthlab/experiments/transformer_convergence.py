"""``transformer-convergence``: ReZero Transformers train fastest and need neither warm-up nor
LayerNorm (Bachlechner et al. 2020, "ReZero is All You Need", arXiv 2003.04887, Table 2 and
Section 5).

12-layer byte-level language models on the stdlib-source corpus (``bytes``; enwik8 when ``path``
is given): Post-LN with and without learning-rate warm-up, Pre-LN, ReZero with α = 1 at init and
ReZero with α = 0. We report the iterations until the smoothed training loss reaches a target in
bits per byte (``bpb = loss / ln 2``). Paper: ReZero α = 0 reaches 1.2 BPB on enwik8 56% faster
than Post-LN with warm-up; Post-LN without warm-up and ReZero α = 1 do not converge. A second
part trains 64-layer stacks for a few steps: does the loss go down?
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
    fmt,
    steps_to_target,
    train,
    verdict,
)

LN2 = math.log(2.0)
VARIANTS = {  # label -> (scheme, scheme_options, warm-up)
    "postnorm+warmup": ("postnorm", {}, True),
    "postnorm": ("postnorm", {}, False),
    "prenorm": ("prenorm", {}, False),
    "rezero-alpha1": ("rezero", {"alpha_init": 1.0}, False),
    "rezero": ("rezero", {}, False),
}


@dataclass(frozen=True)
class Config:
    variants: tuple[str, ...] = tuple(VARIANTS)
    depth: int = 12  # Transformer layers (2 residual sublayers each)
    d_model: int = 64
    nhead: int = 4
    context: int = 64
    batch_size: int = 16
    steps: int = 300
    lr: float = 0.001  # Adam
    warmup_steps: int = 60  # for the +warmup variant
    target_bpb: float = 4.0  # smoothed training bits per byte that counts as reached
    smooth: int = 10  # moving-average window (steps)
    deep_depth: int = 64  # the "do deep stacks train" part (0: skip)
    deep_variants: tuple[str, ...] = ("postnorm", "rezero")
    deep_steps: int = 40
    path: str = ""  # an enwik8 file instead of the stdlib corpus
    seed: int = 0


@EXPERIMENTS.register()
class TransformerConvergence(Experiment):
    name = "transformer-convergence"
    title = "12-layer byte LMs: iterations to a target bpb (Post-LN ± warm-up, Pre-LN, ReZero)"
    paper = "Bachlechner et al. 2020, arXiv 2003.04887, Table 2"
    columns = ("variant", "depth", "step", "train_bpb", "smoothed_bpb", "diverged")
    Config = Config
    presets = {
        "smoke": Config(
            variants=("postnorm", "rezero"),
            depth=2,
            d_model=16,
            nhead=2,
            context=16,
            batch_size=8,
            steps=30,
            warmup_steps=10,
            target_bpb=6.0,
            smooth=5,
            deep_depth=8,
            deep_steps=5,
        ),  # fmt: skip
        "quick": Config(),
        "full": Config(
            d_model=512,
            nhead=8,
            context=512,
            batch_size=32,
            steps=20000,
            lr=0.0003,
            warmup_steps=2000,
            target_bpb=1.2,
            deep_depth=128,
            deep_steps=2000,
        ),  # fmt: skip
    }

    def cells(self, cfg: Config) -> list[dict]:
        common = {
            "d_model": cfg.d_model, "nhead": cfg.nhead, "context": cfg.context,
            "batch_size": cfg.batch_size, "lr": cfg.lr, "smooth": cfg.smooth, "path": cfg.path,
            "seed": cfg.seed,
        }  # fmt: skip
        out = [
            {
                "variant": v,
                "depth": cfg.depth,
                "steps": cfg.steps,
                "warmup_steps": cfg.warmup_steps if VARIANTS[v][2] else 0,
                **common,
            }  # fmt: skip
            for v in cfg.variants
        ]
        if cfg.deep_depth > 0:
            out += [
                {
                    "variant": v,
                    "depth": cfg.deep_depth,
                    "steps": cfg.deep_steps,
                    "warmup_steps": 0,
                    **common,
                }  # fmt: skip
                for v in cfg.deep_variants
            ]
        return out

    def run_cell(self, cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.data import create_dataset

        torch.manual_seed(cell["seed"])
        scheme, options, _ = VARIANTS[cell["variant"]]
        data = create_dataset("bytes", path=cell["path"] or None, context=cell["context"])
        model = dl.create_model(
            "transformer-lm", depth=cell["depth"], d_model=cell["d_model"], nhead=cell["nhead"],
            context=cell["context"], scheme=scheme, scheme_options=options or None,
        )  # fmt: skip
        hist = train(
            model, data, steps=cell["steps"], batch_size=cell["batch_size"], optimizer="adam",
            lr=cell["lr"], warmup_steps=cell["warmup_steps"], seed=cell["seed"],
            divergence_factor=None,
        )  # fmt: skip
        frame = hist.frame().dropna(subset=["train_loss"])
        bpb = frame["train_loss"].astype(float) / LN2
        smoothed = bpb.rolling(cell["smooth"], min_periods=1).mean()
        test_bpb = finite(hist.summary.get("test_bpb"))
        return [
            {
                "step": int(s),
                "train_bpb": finite(b),
                "smoothed_bpb": finite(m),
                "test_bpb": test_bpb,
                "diverged": bool(hist.diverged) or not math.isfinite(b),
            }
            for s, b, m in zip(frame["step"], bpb, smoothed, strict=True)
        ]

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        depths = sorted(df["depth"].unique())
        fig, axes = plt.subplots(1, len(depths), figsize=(5.5 * len(depths), 3.6), squeeze=False)
        for ax, d in zip(axes[0], depths, strict=True):
            for v, g in df[df["depth"] == d].groupby("variant", sort=False):
                ax.plot(g["step"], g["smoothed_bpb"], label=v)
            if d == cfg.depth:
                ax.axhline(cfg.target_bpb, color="gray", ls=":", lw=1)
            ax.set_title(f"{int(d)}-layer byte LM")
            ax.set_xlabel("iteration")
            ax.set_ylabel("training bits per byte (smoothed)")
            ax.legend(fontsize=7)
        return [save_fig(fig, out_dir / "transformer_convergence.png")]

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        main = df[df["depth"] == cfg.depth]
        its = {
            v: steps_to_target(list(g["step"]), list(g["smoothed_bpb"]), cfg.target_bpb)
            for v, g in main.groupby("variant", sort=False)
        }
        final = main.groupby("variant", sort=False)["smoothed_bpb"].last()
        rows = []
        if "rezero" in its:
            others = {v: t for v, t in its.items() if v != "rezero"}
            rz = its["rezero"]
            fastest = all(rz <= t for t in others.values()) and math.isfinite(rz)
            ref = its.get("postnorm+warmup", math.nan)
            if math.isfinite(rz) and math.isfinite(ref) and rz > 0:
                vs = f"; ReZero {100 * (ref / rz - 1):.0f}% faster than Post-LN+warm-up"
            else:
                vs = ""
            txt = ", ".join(f"{v} {'never' if math.isinf(t) else int(t)}" for v, t in its.items())
            rows.append(
                Claim(
                    claim="ReZero (α=0) reaches a target bpb fastest among Post-LN (± warm-up), "
                    "Pre-LN and ReZero α=1",
                    paper="1.2 BPB 56% faster than Post-LN + warm-up (enwik8)",
                    measured=f"iterations to {cfg.target_bpb} bpb: {txt}{vs}; final bpb "
                    + ", ".join(f"{v} {fmt(final[v], 3)}" for v in its),
                    verdict=verdict(
                        fastest and math.isfinite(ref) and rz < ref,
                        partly=math.isfinite(rz)
                        and rz <= min(others.values(), default=math.inf) * 1.25,
                    ),
                )
            )
        deep = df[df["depth"] == cfg.deep_depth] if cfg.deep_depth != cfg.depth else df.iloc[0:0]
        if len(deep):
            res = {}
            for v, g in deep.groupby("variant", sort=False):
                first = float(g["train_bpb"].head(3).mean())
                last = float(g["smoothed_bpb"].iloc[-1])
                res[v] = (first, last, bool(g["diverged"].any()))
            trains = {v: (not d and last < first - 0.3) for v, (first, last, d) in res.items()}
            txt = "; ".join(f"{v} {fmt(a, 3)}→{fmt(b, 3)} bpb" for v, (a, b, _) in res.items())
            rows.append(
                Claim(
                    claim=f"{cfg.deep_depth}-layer ReZero Transformers train without warm-up or "
                    "LayerNorm",
                    paper="64–128-layer ReZero Transformers train",
                    measured=f"{cfg.deep_steps} steps: {txt}",
                    verdict=verdict(trains.get("rezero", False)),
                )
            )
        return rows
