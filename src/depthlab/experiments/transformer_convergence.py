"""``transformer-convergence``: ReZero Transformers train fastest and need neither warm-up nor
LayerNorm (Bachlechner et al. 2020, "ReZero is All You Need", arXiv 2003.04887, Table 2 and
Section 5).

12-layer byte-level language models on the stdlib-source corpus (``bytes``; enwik8 when ``path``
is given): Post-LN with and without learning-rate warm-up, Pre-LN, ReZero with α = 1 at init and
ReZero with α = 0. We report the iterations until the smoothed training loss reaches a target in
bits per byte (``bpb = loss / ln 2``). Paper: ReZero α = 0 reaches 1.2 BPB on enwik8 56% faster
than Post-LN with warm-up; Post-LN without warm-up and ReZero α = 1 do not converge. A second
part trains 64-layer stacks for a few steps: does the loss go down?

Protocol (the paper's): every variant is trained at each learning rate of a grid ``lrs`` fixed in
advance (Adam, constant lr; quick: 3e-4, 1e-3, 3e-3), and compared at its own best lr — the one
that reaches the target in the fewest iterations (ties and never-reached: lowest final smoothed
bpb). Only the "Post-LN + warm-up" variant gets a linear warm-up (``warmup_steps``).
ReZero follows the official code: α = 0 at init, one α per layer shared by the attention and
feed-forward sublayers, no LayerNorm anywhere (``scheme.final_norm`` is None, so no final norm),
embeddings ``U(-0.1, 0.1)`` (see :class:`depthlab.models.transformer.TransformerLM`).

The target: on the stdlib corpus the byte unigram entropy is 4.70 bits and the plug-in bigram
conditional entropy 3.51 bits, so ``target_bpb = 4.0`` can only be reached by a model that uses
the context (a model that learned the byte frequencies alone sits at ≈ 4.7).
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
from depthlab.registry import DepthlabError

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
    context: int = 32
    batch_size: int = 16
    steps: int = 250
    lrs: tuple[float, ...] = (0.0003, 0.001, 0.003)  # Adam lr grid, every variant; best one wins
    warmup_steps: int = 50  # for the +warmup variant only
    target_bpb: float = 4.0  # smoothed training bits per byte that counts as reached
    smooth: int = 10  # moving-average window (steps)
    deep_depth: int = 64  # the "do deep stacks train" part (0: skip)
    deep_variants: tuple[str, ...] = ("postnorm", "rezero")
    deep_steps: int = 40
    deep_lr: float = 0.001  # Adam lr of the deep part
    path: str = ""  # an enwik8 file instead of the stdlib corpus
    seed: int = 0


def best_runs(main: pd.DataFrame, target: float) -> dict[str, tuple[float, float, float]]:
    """Each variant at its best lr: ``{variant: (lr, iterations to target, final bpb)}``.

    Best = fewest iterations to ``target`` (smoothed bpb), ties and never-reached runs broken by
    the lowest final smoothed bpb (NaN, i.e. diverged, counts as worst).
    """
    out: dict[str, tuple[float, float, float]] = {}
    for v, gv in main.groupby("variant", sort=False):
        runs = []
        for lr, g in gv.groupby("lr", sort=True):
            its = steps_to_target(list(g["step"]), list(g["smoothed_bpb"]), target)
            last = float(g["smoothed_bpb"].iloc[-1])
            runs.append((its, last if math.isfinite(last) else math.inf, float(lr)))
        its, last, lr = min(runs)
        out[str(v)] = (lr, its, last)
    return out


@EXPERIMENTS.register()
class TransformerConvergence(Experiment):
    name = "transformer-convergence"
    choices = {"variants": tuple(VARIANTS), "deep_variants": tuple(VARIANTS)}
    zero_ok = ("warmup_steps", "deep_depth", "seed")

    def check(self, cfg: Config) -> None:
        from depthlab.nn.transformer import check_heads

        check_heads(cfg.d_model, cfg.nhead)
        if cfg.path and not Path(cfg.path).is_file():
            raise DepthlabError(f"path {cfg.path} is not a file; pass an enwik8 file or path=''")

    title = "12-layer byte LMs: iterations to a target bpb at each variant's best lr"
    paper = "Bachlechner et al. 2020, arXiv 2003.04887, Table 2"
    columns = ("part", "variant", "depth", "lr", "step", "train_bpb", "smoothed_bpb", "diverged")
    version = 2
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
            lrs=(0.001, 0.003),
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
            lrs=(0.0001, 0.0003, 0.001),
            warmup_steps=2000,
            target_bpb=1.2,
            deep_depth=128,
            deep_steps=2000,
            deep_lr=0.0003,
        ),  # fmt: skip
    }

    def cells(self, cfg: Config) -> list[dict]:
        common = {
            "d_model": cfg.d_model, "nhead": cfg.nhead, "context": cfg.context,
            "batch_size": cfg.batch_size, "smooth": cfg.smooth, "path": cfg.path,
            "seed": cfg.seed,
        }  # fmt: skip
        out = [
            {
                "part": "main",
                "variant": v,
                "depth": cfg.depth,
                "lr": float(lr),
                "steps": cfg.steps,
                "warmup_steps": cfg.warmup_steps if VARIANTS[v][2] else 0,
                **common,
            }  # fmt: skip
            for v in cfg.variants
            for lr in cfg.lrs
        ]
        if cfg.deep_depth > 0:
            out += [
                {
                    "part": "deep",
                    "variant": v,
                    "depth": cfg.deep_depth,
                    "lr": float(cfg.deep_lr),
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
            model, data, cell, optimizer="adam", warmup_steps=cell["warmup_steps"],
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

        main, deep = df[df["part"] == "main"], df[df["part"] == "deep"]
        fig, axes = plt.subplots(1, 3 if len(deep) else 2, figsize=(15, 3.6), squeeze=False)
        ax_best, ax_lr = axes[0][0], axes[0][1]
        best = best_runs(main, cfg.target_bpb)
        for v, (lr, _, _) in best.items():
            g = main[(main["variant"] == v) & (main["lr"] == lr)]
            ax_best.plot(g["step"], g["smoothed_bpb"], label=f"{v} (lr {lr:g})")
        ax_best.axhline(cfg.target_bpb, color="gray", ls=":", lw=1)
        ax_best.set_title(f"{cfg.depth}-layer byte LM, each variant at its best lr")
        for v, gv in main.groupby("variant", sort=False):
            last = gv.groupby("lr")["smoothed_bpb"].last()
            ax_lr.plot(last.index, last.values, "o-", label=v)
        ax_lr.axhline(cfg.target_bpb, color="gray", ls=":", lw=1)
        ax_lr.set_xscale("log")
        ax_lr.set_xticks(list(cfg.lrs), [f"{lr:g}" for lr in cfg.lrs])
        ax_lr.minorticks_off()
        ax_lr.set_xlabel("Adam learning rate")
        ax_lr.set_ylabel(f"smoothed bpb after {cfg.steps} iterations")
        ax_lr.set_title("learning-rate grid")
        if len(deep):
            ax = axes[0][2]
            for v, g in deep.groupby("variant", sort=False):
                ax.plot(g["step"], g["smoothed_bpb"], label=v)
            ax.set_title(f"{cfg.deep_depth}-layer byte LM (lr {cfg.deep_lr:g})")
        for ax in axes[0]:
            if ax is not ax_lr:
                # log2(256) = 8 bpb is uniform over bytes; ReZero α=1 starts far above it
                lo = min((min(ln.get_ydata()) for ln in ax.get_lines()), default=0.0)
                ax.set_ylim(max(0.0, math.floor(lo) - 0.5), 10.0)
                ax.set_xlabel("iteration")
                ax.set_ylabel("training bits per byte (smoothed)")
            ax.legend(fontsize=7)
        return [save_fig(fig, out_dir / "transformer_convergence.png")]

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        main = df[df["part"] == "main"]
        best = best_runs(main, cfg.target_bpb)
        its = {v: t for v, (_, t, _) in best.items()}
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
            txt = ", ".join(
                f"{v} {'never' if math.isinf(t) else int(t)} (lr {lr:g})"
                for v, (lr, t, _) in best.items()
            )
            rows.append(
                Claim(
                    claim="ReZero (α=0) reaches a target bpb fastest among Post-LN (± warm-up), "
                    "Pre-LN and ReZero α=1, each at its best lr",
                    paper="1.2 BPB 56% faster than Post-LN + warm-up (enwik8)",
                    measured=f"iterations to {cfg.target_bpb} bpb at the best of lr "
                    f"{{{', '.join(f'{lr:g}' for lr in cfg.lrs)}}}: {txt}{vs}; final bpb "
                    + ", ".join(f"{v} {fmt(last, 3)}" for v, (_, _, last) in best.items()),
                    verdict=verdict(
                        fastest and math.isfinite(ref) and rz < ref,
                        partly=math.isfinite(rz)
                        and rz <= min(others.values(), default=math.inf) * 1.25,
                    ),
                )
            )
        deep = df[df["part"] == "deep"]
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
