"""``transformer-convergence``: ReZero Transformers train fastest and need neither warm-up nor
LayerNorm (Bachlechner et al. 2020, "ReZero is All You Need", arXiv 2003.04887, Table 2 and
Section 5).

12-layer byte-level language models on the stdlib-source corpus (``bytes``; enwik8 when ``path``
is given): Post-LN with and without learning-rate warm-up, Pre-LN, ReZero with α = 1 at init and
ReZero with α = 0. We report the iterations until the smoothed training loss reaches a target in
bits per byte (``bpb = loss / ln 2``). Paper: ReZero α = 0 reaches 1.2 BPB on enwik8 56% faster
than Post-LN with warm-up; Post-LN without warm-up and ReZero α = 1 do not converge. A second
part is the paper's depth contrast: 64-layer ReZero, Post-LN and Post-LN + warm-up stacks, where
"trains" means reaching the corpus' bigram conditional entropy (so byte frequencies and one byte
of context are not enough) and the claim holds only if ReZero reaches it on every seed and no
Post-LN variant on any. Every variant runs every seed (``seeds``); a rule holds only on every
seed.

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
    steps_to_target,
    train,
    verdict,
)
from depthlab.experiments.rules import contrast, spread
from depthlab.registry import DepthlabError

LN2 = math.log(2.0)
VARIANTS = {  # label -> (scheme, scheme_options, warm-up)
    "postnorm+warmup": ("postnorm", {}, True),
    "postnorm": ("postnorm", {}, False),
    "prenorm": ("prenorm", {}, False),
    "rezero-alpha1": ("rezero", {"alpha_init": 1.0}, False),
    "rezero": ("rezero", {}, False),
    # Admin (Liu et al. 2020, arXiv 2004.08249): Post-LN with a profiled, learnable skip ω;
    # reported beside the others, not part of the ReZero claims' comparisons
    "admin": ("admin", {}, False),
}
#: the variants the ReZero claim compares with (its paper's Table 2)
PAPER_VARIANTS = ("postnorm+warmup", "postnorm", "prenorm", "rezero-alpha1")


@dataclass(frozen=True)
class Config:
    variants: tuple[str, ...] = (*PAPER_VARIANTS, "rezero")
    depth: int = 12  # Transformer layers (2 residual sublayers each)
    d_model: int = 48
    nhead: int = 4
    context: int = 32
    batch_size: int = 16
    steps: int = 200
    lrs: tuple[float, ...] = (0.0003, 0.001, 0.003)  # Adam lr grid, every variant; best one wins
    warmup_steps: int = 50  # for the +warmup variants only
    target_bpb: float = 4.0  # smoothed training bits per byte that counts as reached
    smooth: int = 10  # moving-average window (steps)
    deep_depths: tuple[int, ...] = (64,)  # the "deep stacks" contrast (empty: skip)
    deep_variants: tuple[str, ...] = ("rezero", "postnorm", "postnorm+warmup")
    deep_d_model: int = 32
    deep_steps: int = 150
    deep_lr: float = 0.001  # Adam lr of the deep part
    deep_target: float = 0.0  # bpb the deep part must reach (0: the corpus' bigram entropy)
    path: str = ""  # an enwik8 file instead of the stdlib corpus
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N


#: the paper's figure: ReZero reaches the target 56% faster than Post-LN + warm-up
PAPER_SPEEDUP = 1.56


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
    zero_ok = ("warmup_steps", "seeds", "deep_target")
    empty_ok = ("variants", "deep_depths")

    def check(self, cfg: Config) -> None:
        from depthlab.nn.transformer import check_heads

        check_heads(cfg.d_model, cfg.nhead)
        if cfg.path and not Path(cfg.path).is_file():
            raise DepthlabError(f"path {cfg.path} is not a file; pass an enwik8 file or path=''")

    title = "byte LMs: iterations to a target bpb at the best lr; ReZero vs Post-LN at depth"
    paper = "Bachlechner et al. 2020, arXiv 2003.04887, Table 2"
    columns = (
        "part", "variant", "depth", "lr", "seed", "step", "train_bpb", "smoothed_bpb", "diverged",
    )  # fmt: skip
    version = 3
    Config = Config
    needs = {"full": ("path",)}
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
            deep_depths=(8,),
            deep_d_model=16,
            deep_steps=5,
            seeds=(0, 1),
        ),  # fmt: skip
        "quick": Config(),
        # the paper's depth contrast alone: 64- and 128-layer stacks, ReZero α = 0 without
        # warm-up against Post-LN with and without it and ReZero α = 1, to the bigram entropy
        "deep": Config(
            variants=(),
            deep_depths=(64, 128),
            deep_variants=("rezero", "postnorm", "postnorm+warmup", "rezero-alpha1"),
            deep_steps=600,
            warmup_steps=100,
            seeds=(0, 1),
        ),  # fmt: skip
        "full": Config(
            d_model=512,
            nhead=8,
            context=512,
            batch_size=32,
            steps=20000,
            lrs=(0.0001, 0.0003, 0.001),
            warmup_steps=2000,
            target_bpb=1.2,
            deep_depths=(64, 128),
            deep_d_model=512,
            deep_steps=2000,
            deep_lr=0.0003,
        ),  # fmt: skip
    }

    def cells(self, cfg: Config) -> list[dict]:
        common = {
            "nhead": cfg.nhead, "context": cfg.context, "batch_size": cfg.batch_size,
            "smooth": cfg.smooth, "path": cfg.path,
        }  # fmt: skip
        out = []
        for seed in cfg.seeds:
            out += [
                {
                    "part": "main",
                    "variant": v,
                    "depth": cfg.depth,
                    "d_model": cfg.d_model,
                    "lr": float(lr),
                    "steps": cfg.steps,
                    "warmup_steps": cfg.warmup_steps if VARIANTS[v][2] else 0,
                    **common,
                    "seed": seed,
                }  # fmt: skip
                for v in cfg.variants
                for lr in cfg.lrs
            ]
            out += [
                {
                    "part": "deep",
                    "variant": v,
                    "depth": depth,
                    "d_model": cfg.deep_d_model,
                    "lr": float(cfg.deep_lr),
                    "steps": cfg.deep_steps,
                    "warmup_steps": cfg.warmup_steps if VARIANTS[v][2] else 0,
                    **common,
                    "seed": seed,
                }  # fmt: skip
                for depth in cfg.deep_depths
                for v in cfg.deep_variants
            ]
        return out

    def cell_scheme(self, cell: dict) -> tuple[str, dict]:
        scheme, options, _ = VARIANTS[cell["variant"]]
        return scheme, options

    def cell_optimizer(self, cell: dict) -> str:
        return "adam"

    def run_cell(self, cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.data import create_dataset

        torch.manual_seed(cell["seed"])
        scheme, options = self.cell_scheme(cell)
        data = create_dataset("bytes", path=cell["path"] or None, context=cell["context"])
        model = dl.create_model(
            "transformer-lm", depth=cell["depth"], d_model=cell["d_model"], nhead=cell["nhead"],
            context=cell["context"], scheme=scheme, scheme_options=options or None,
        )  # fmt: skip
        hist = train(
            model, data, cell, optimizer=self.cell_optimizer(cell),
            warmup_steps=cell["warmup_steps"], divergence_factor=None,
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
        n_main = 2 if len(main) else 0
        fig, axes = plt.subplots(1, n_main + (1 if len(deep) else 0), figsize=(15, 3.6),
                                 squeeze=False)  # fmt: skip
        ax_lr = None
        if n_main:
            ax_lr = axes[0][1]
            self._main_panels(axes[0][0], ax_lr, main, cfg)
        if len(deep):
            self._deep_panel(axes[0][n_main], deep, cfg)
        for ax in axes[0]:
            if ax is not ax_lr:
                # log2(256) = 8 bpb is uniform over bytes; ReZero α=1 starts far above it
                lo = min((min(ln.get_ydata()) for ln in ax.get_lines()), default=0.0)
                ax.set_ylim(max(0.0, math.floor(lo) - 0.5), 10.0)
                ax.set_xlabel("iteration")
                ax.set_ylabel("training bits per byte (smoothed)")
            ax.legend(fontsize=7)
        return [save_fig(fig, out_dir / "transformer_convergence.png")]

    @staticmethod
    def _main_panels(ax_best, ax_lr, main: pd.DataFrame, cfg: Config) -> None:
        """Each variant's best-lr curve, and the final bpb over the lr grid."""
        best = best_runs(main, cfg.target_bpb)
        for v, (lr, _, _) in best.items():
            g = main[(main["variant"] == v) & (main["lr"] == lr)]
            curve = g.pivot_table(index="step", columns="seed", values="smoothed_bpb")
            (line,) = ax_best.plot(curve.index, curve.mean(axis=1), label=f"{v} (lr {lr:g})")
            ax_best.fill_between(curve.index, curve.min(axis=1), curve.max(axis=1),
                                 color=line.get_color(), alpha=0.2)  # fmt: skip
        ax_best.axhline(cfg.target_bpb, color="gray", ls=":", lw=1)
        ax_best.set_title(f"{cfg.depth}-layer byte LM, each variant at its best lr")
        for v, gv in main.groupby("variant", sort=False):
            last = gv.groupby(["lr", "seed"])["smoothed_bpb"].last().groupby("lr")
            (line,) = ax_lr.plot(last.mean().index, last.mean().values, "o-", label=v)
            ax_lr.vlines(last.min().index, last.min().values, last.max().values,
                         color=line.get_color(), lw=1)  # fmt: skip
        ax_lr.axhline(cfg.target_bpb, color="gray", ls=":", lw=1)
        ax_lr.set_xscale("log")
        ax_lr.set_xticks(list(cfg.lrs), [f"{lr:g}" for lr in cfg.lrs])
        ax_lr.minorticks_off()
        ax_lr.set_xlabel("Adam learning rate")
        ax_lr.set_ylabel(f"smoothed bpb after {cfg.steps} iterations")
        ax_lr.set_title("learning-rate grid")

    def _deep_panel(self, ax, deep: pd.DataFrame, cfg: Config) -> None:
        """The deep stacks' curves against the bigram-entropy target."""
        for (d, v), g in deep.groupby(["depth", "variant"], sort=False):
            curve = g.pivot_table(index="step", columns="seed", values="smoothed_bpb")
            (line,) = ax.plot(curve.index, curve.mean(axis=1), label=f"{v}, {d} layers")
            ax.fill_between(curve.index, curve.min(axis=1), curve.max(axis=1),
                            color=line.get_color(), alpha=0.2)  # fmt: skip
        target = self.deep_target(cfg)
        ax.axhline(target, color="gray", ls=":", lw=1)
        depths = "/".join(map(str, cfg.deep_depths))
        ax.set_title(f"{depths}-layer byte LMs (lr {cfg.deep_lr:g}); target = bigram "
                     f"entropy {target:.2f}", fontsize=8)  # fmt: skip

    @staticmethod
    def deep_target(cfg: Config) -> float:
        """The deep part's target: the bigram conditional entropy of the training split (bits
        per byte), so that reaching it needs more than byte frequencies and one byte of
        context (:func:`depthlab.data.bytes.entropy_bits`)."""
        from depthlab.data import create_dataset
        from depthlab.data.bytes import entropy_bits

        data = create_dataset("bytes", path=cfg.path or None, context=cfg.context)
        return entropy_bits(data.train_data, order=1)

    def setup(self, cfg: Config, deep: int = 0) -> str:
        """The setup column; ``deep``: the depth of a deep-part claim (0: the main part)."""
        corpus = "enwik8" if cfg.path else "stdlib byte corpus"
        if deep:
            return (
                f"byte LM, {deep} layers, d_model {cfg.deep_d_model}, {cfg.nhead} heads, "
                f"context {cfg.context}, batch {cfg.batch_size}, Adam lr {cfg.deep_lr:g}, "
                f"{cfg.deep_steps} steps (warm-up {cfg.warmup_steps} for +warmup), {corpus}, "
                f"seeds {', '.join(map(str, cfg.seeds))}; "
                + ("the paper's depth, " if deep in (64, 128) else "")
                + "far smaller width, data and budget than the paper's"
            )
        return (
            f"byte LM, {cfg.depth} layers, d_model {cfg.d_model}, {cfg.nhead} heads, context "
            f"{cfg.context}, batch {cfg.batch_size}, Adam lr grid "
            f"{', '.join(f'{x:g}' for x in cfg.lrs)}, {cfg.steps} steps, target {cfg.target_bpb:g}"
            f" bpb, {corpus}, seeds {', '.join(map(str, cfg.seeds))}; far smaller than the paper's"
        )

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        if "seed" not in df:
            df = df.assign(seed=0)
        main = df[df["part"] == "main"]
        rows = []
        best = {int(k): best_runs(g, cfg.target_bpb) for k, g in main.groupby("seed")}
        if best and all("rezero" in b for b in best.values()):
            variants = list(next(iter(best.values())))

            def its(v: str) -> dict[int, float]:
                return {k: b[v][1] for k, b in best.items() if v in b}

            rz = its("rezero")
            others = [v for v in variants if v in PAPER_VARIANTS]
            fastest = all(
                math.isfinite(r) and all(r < its(v).get(k, math.inf) for v in others)
                for k, r in rz.items()
            )
            ref = its("postnorm+warmup")
            ratio = {
                k: ((cfg.steps if math.isinf(ref.get(k, math.inf)) else ref[k]) / max(r, 1.0))
                if math.isfinite(r) else 0.0
                for k, r in rz.items()
            }  # fmt: skip
            paper_like = fastest and bool(ref) and all(x >= PAPER_SPEEDUP for x in ratio.values())
            txt = ", ".join(f"{v} {spread(its(v).values(), 3)}" for v in variants)
            lrs = ", ".join(
                f"{v} {'/'.join(f'{best[k][v][0]:g}' for k in sorted(best))}" for v in variants
            )
            why = ""
            if not fastest:
                why = "ReZero is not the first to reach the target on every seed"
            elif not paper_like:
                why = "ReZero is fastest on every seed but not 56% faster than Post-LN + warm-up"
            rows.append(
                Claim(
                    claim="ReZero (α=0) reaches a target bpb fastest among Post-LN (± warm-up), "
                    "Pre-LN and ReZero α=1, each at its best lr, 56% faster than Post-LN + warm-up",
                    paper="1.2 BPB 56% faster than Post-LN + warm-up (enwik8, Table 2)",
                    paper_setup="12-layer Transformer, d_model 512, enwik8, target 1.2 bpb",
                    setup=self.setup(cfg),
                    measured=f"iterations to {cfg.target_bpb:g} bpb: {txt}; best lr per seed: "
                    f"{lrs}; ReZero vs Post-LN+warm-up per seed: "
                    + "/".join(f"{ratio[k]:.2f}×" for k in sorted(ratio))
                    + " (a lower bound where Post-LN+warm-up never reached it)",
                    verdict=verdict(paper_like, partly=fastest),
                    rule=why or "fastest on every seed and ≥ 1.56× Post-LN + warm-up on every seed",
                )
            )
        target = self.deep_target(cfg) if (df["part"] == "deep").any() else math.nan
        for depth in cfg.deep_depths:
            deep = df[(df["part"] == "deep") & (df["depth"] == depth)]
            if len(deep) and "rezero" in set(deep["variant"]):
                rows.append(self._deep_claim(deep, depth, cfg, target))
        return rows

    def _deep_claim(self, deep: pd.DataFrame, depth: int, cfg: Config, target: float) -> Claim:
        """The depth contrast at one depth: ReZero below ``target`` on every seed, every Post-LN
        variant (with or without warm-up) on none; other variants (ReZero α = 1) are reported
        beside them."""

        def reached(v: str) -> dict[int, bool]:
            g = deep[deep["variant"] == v]
            return {
                int(k): math.isfinite(
                    steps_to_target(list(gs["step"]), list(gs["smoothed_bpb"]), target)
                )
                for k, gs in g.groupby("seed")
            }

        def final(v: str) -> list[float]:
            g = deep[deep["variant"] == v]
            return [float(gs["smoothed_bpb"].iloc[-1]) for _, gs in g.groupby("seed")]

        present = [v for v in cfg.deep_variants if v in set(deep["variant"])]
        others = [v for v in present if v.startswith("postnorm")]
        shown = ["rezero", *(v for v in present if v != "rezero")]
        works = all(reached("rezero").values())
        fails = bool(others) and all(not any(reached(v).values()) for v in others)
        v, why = contrast(works, fails, f"ReZero-{depth}", " and ".join(others))
        return Claim(
            claim=f"{depth}-layer ReZero Transformers train (below the corpus' bigram entropy) "
            "where Post-LN fails even with warm-up",
            paper="64 and 128-layer ReZero train; Post-LN at 64 layers fails to converge even "
            "with warm-up (Table 3)",
            paper_setup="64 / 128-layer Transformers, enwik8",
            setup=self.setup(cfg, deep=depth),
            measured=f"final smoothed bpb after {cfg.deep_steps} steps (target: bigram entropy "
            f"{target:.2f}): "
            + ", ".join(f"{x} {spread(final(x), 3)}" for x in shown)
            + "; reached the target on "
            + ", ".join(f"{x} {sum(reached(x).values())}/{len(reached(x))}" for x in shown)
            + " seeds",
            verdict=v,
            rule=why
            or "ReZero below the bigram entropy on every seed, every Post-LN variant on none",
        )
