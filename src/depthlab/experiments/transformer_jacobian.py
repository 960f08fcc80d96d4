"""``transformer-jacobian``: input-output Jacobian spectra of deep Transformers (Bachlechner et
al. 2020, "ReZero is All You Need", arXiv 2003.04887, Fig. 5).

For the residual stack ``h ↦ blocks(h)`` of a byte LM (on the embedded sequence, ``(T·C)``
inputs and outputs per example), the singular values of the Jacobian ``∂ blocks(h) / ∂ h``
measure signal propagation: a network is dynamically isometric when they all sit near 1. ReZero
blocks are the identity at init, so its Jacobian is the identity at any depth, while Post-LN
stacks spread (and, with depth, collapse) their spectra. We compute the spectra at init and after
a short training run, via :func:`depthlab.jacobian_spectrum`, for Post-LN encoders of depth 4,
12 and 64 and a 64-layer ReZero stack.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, train, verdict
from depthlab.experiments.rules import every, spread
from depthlab.registry import DepthlabError


@dataclass(frozen=True)
class Config:
    models: tuple[str, ...] = ("postnorm-4", "postnorm-12", "postnorm-64", "rezero-64")
    d_model: int = 32
    nhead: int = 2
    context: int = 16  # Jacobian size per example: (context·d_model)²
    examples: int = 2  # sequences whose Jacobians are decomposed
    steps: int = 60  # training steps before the "trained" spectrum (0: init only)
    batch_size: int = 16
    lr: float = 0.001  # Adam
    seeds: tuple[int, ...] = (0, 1, 2)
    path: str = ""  # an enwik8 file to train on instead of the stdlib corpus
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N


@EXPERIMENTS.register()
class TransformerJacobian(Experiment):
    name = "transformer-jacobian"
    zero_ok = ("steps", "seeds")
    version = 2

    def check(self, cfg: Config) -> None:
        from depthlab.nn.transformer import check_heads

        check_heads(cfg.d_model, cfg.nhead)
        if cfg.path and not Path(cfg.path).is_file():
            raise DepthlabError(f"path {cfg.path} is not a file; pass an enwik8 file or path=''")
        from depthlab.schemes import list_schemes

        for m in cfg.models:
            scheme, _, depth = m.rpartition("-")
            if scheme not in list_schemes() or not depth.isdigit():
                raise DepthlabError(
                    f"models entry {m!r} must be SCHEME-DEPTH with SCHEME a registered scheme "
                    f"({', '.join(list_schemes())}), e.g. postnorm-12 or admin-64"
                )
            if not 1 <= int(depth) <= 10_000:
                raise DepthlabError(f"models entry {m!r}: depth must be in 1..10,000")

    title = "Jacobian singular values of deep Post-LN vs ReZero Transformer stacks"
    paper = "Bachlechner et al. 2020, arXiv 2003.04887, Fig. 5"
    columns = (
        "model",
        "seed",
        "scheme",
        "depth",
        "phase",
        "example",
        "index",
        "singular_value",
        "log10_sv",
    )
    Config = Config
    needs = {"full": ("path",)}
    presets = {
        "smoke": Config(
            models=("postnorm-2", "postnorm-8", "rezero-8"),
            d_model=16,
            context=8,
            examples=1,
            steps=5,
            batch_size=4,
            seeds=(0, 1),
        ),  # fmt: skip
        "quick": Config(),
        # the paper's depths: Post-LN and ReZero stacks of 64 and 128 layers (Post-LN 4 for the
        # spread's growth), trained longer before the "trained" spectrum
        "deep": Config(
            models=("postnorm-4", "postnorm-64", "postnorm-128", "rezero-64", "rezero-128"),
            steps=300,
            seeds=(0, 1),
        ),  # fmt: skip
        # enwik8 (``--set path=``), d_model 128, trained 2,000 steps before the trained spectrum
        "full": Config(
            models=(
                "postnorm-4",
                "postnorm-12",
                "postnorm-64",
                "postnorm-128",
                "rezero-64",
                "rezero-128",
            ),
            d_model=128,
            nhead=4,
            context=32,
            examples=8,
            steps=2000,
        ),  # fmt: skip
    }

    def cells(self, cfg: Config) -> list[dict]:
        return [
            {
                "model": m,
                "d_model": cfg.d_model,
                "nhead": cfg.nhead,
                "context": cfg.context,
                "examples": cfg.examples,
                "steps": cfg.steps,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "seed": seed,
                **({"path": cfg.path} if cfg.path else {}),  # stdlib cells keep their hash
            }  # fmt: skip
            for seed in cfg.seeds
            for m in cfg.models
        ]

    def cell_model(self, cell: dict) -> tuple[str, dict, int]:
        depth = int(cell["model"].rsplit("-", 1)[1])
        kw = {"depth": depth, "d_model": cell["d_model"], "nhead": cell["nhead"],
              "context": cell["context"]}  # fmt: skip
        return "transformer-lm", kw, cell["batch_size"]

    def cell_scheme(self, cell: dict) -> tuple[str, dict]:
        return cell["model"].rsplit("-", 1)[0], {}

    def cell_optimizer(self, cell: dict) -> str:
        return "adam"

    def run_cell(self, cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.data import create_dataset
        from depthlab.diagnostics.jacobian import jacobian_spectrum
        from depthlab.train.loop import resolve_device

        scheme, depth = cell["model"].rsplit("-", 1)
        depth = int(depth)
        torch.manual_seed(cell["seed"])
        data = create_dataset("bytes", path=cell.get("path") or None, context=cell["context"])
        model = dl.create_model(
            "transformer-lm", depth=depth, d_model=cell["d_model"], nhead=cell["nhead"],
            context=cell["context"], scheme=scheme,
        )  # fmt: skip
        g = torch.Generator().manual_seed(cell["seed"])
        tokens = torch.randint(0, 256, (cell["examples"], cell["context"]), generator=g)
        device = resolve_device(cell.get("device", "cpu"))

        def spectrum(phase: str) -> list[dict]:
            model.to(device)  # the spectra are computed on the cell's device, like its training
            model.eval()
            with torch.no_grad():
                h = model.embed(tokens.to(device))  # (B, T, C)
            with warnings.catch_warnings():  # vmap has no batching rule for fused attention
                warnings.filterwarnings("ignore", message="There is a performance drop")
                df = jacobian_spectrum(model.blocks, h.detach(), method="dense")
            model.train()
            sv = df["singular_value"].to_numpy(float)
            return [
                {
                    "scheme": scheme,
                    "depth": depth,
                    "phase": phase,
                    "example": int(e),
                    "index": int(i),
                    "singular_value": float(s),
                    "log10_sv": math.log10(s) if s > 0 else -math.inf,
                }
                for e, i, s in zip(df["example"], df["index"], sv, strict=True)
            ]

        out = spectrum("init")
        if cell["steps"] > 0:
            train(model, data, cell, optimizer=self.cell_optimizer(cell), divergence_factor=None)
            out += spectrum("trained")
        return out

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        phases = list(dict.fromkeys(df["phase"]))
        fig, axes = plt.subplots(1, len(phases), figsize=(5.5 * len(phases), 3.6), squeeze=False)
        lo = max(-6.0, float(df["log10_sv"].replace(-np.inf, np.nan).min()))
        hi = float(df["log10_sv"].max())
        bins = np.linspace(lo, max(hi, lo + 1e-3), 50)
        for ax, ph in zip(axes[0], phases, strict=True):
            for m, g in df[df["phase"] == ph].groupby("model", sort=False):
                vals = g["log10_sv"].clip(lower=lo)
                ax.hist(vals, bins=bins, histtype="step", density=True, label=m)
            ax.set_title(f"Jacobian singular values ({ph}; all seeds pooled)", fontsize=9)
            ax.set_xlabel(f"log10 singular value (clipped at {lo:.0f})")
            ax.legend(fontsize=7)
        return [save_fig(fig, out_dir / "transformer_jacobian.png")]

    @staticmethod
    def summary(df: pd.DataFrame) -> pd.DataFrame:
        """Per model × phase × seed: mean and std of log10 σ, and the share of σ in [1/2, 2]."""
        if "seed" not in df:
            df = df.assign(seed=0)
        rows = []
        for (m, ph, seed), g in df.groupby(["model", "phase", "seed"], sort=False):
            lg = g["log10_sv"].replace(-np.inf, -300.0).to_numpy(float)
            rows.append(
                {
                    "model": m,
                    "phase": ph,
                    "seed": int(seed),
                    "mean_log10_sv": float(lg.mean()),
                    "std_log10_sv": float(lg.std()),
                    "share_within_2": float(np.mean(np.abs(lg) <= math.log10(2.0))),
                }
            )
        return pd.DataFrame(rows)

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        s = self.summary(df)
        models = list(dict.fromkeys(s["model"]))
        rz = [m for m in models if m.startswith("rezero")]
        pn = sorted((m for m in models if m.startswith("postnorm")), key=_depth)
        if not rz or not pn:
            return []

        def get(m: str, phase: str, col: str) -> dict[int, float]:
            g = s[(s["model"] == m) & (s["phase"] == phase)]
            return {int(r.seed): float(getattr(r, col)) for r in g.itertuples()}

        def show(m: str, phase: str) -> str:
            return (
                f"{m} {spread(get(m, phase, 'share_within_2').values(), 2, pct=True)} of σ in "
                f"[½,2], mean log10σ {spread(get(m, phase, 'mean_log10_sv').values())}"
            )

        setup = (
            f"byte-LM residual stacks, d_model {cfg.d_model}, {cfg.nhead} heads, context "
            f"{cfg.context} (Jacobians {cfg.context * cfg.d_model}×{cfg.context * cfg.d_model}), "
            f"{cfg.examples} examples, {cfg.steps} Adam steps at lr {cfg.lr:g} before the trained "
            f"spectrum, {'enwik8' if cfg.path else 'stdlib byte corpus'}, seeds "
            f"{', '.join(map(str, sorted(set(s['seed']))))}"
        )
        deep, shallow = pn[-1], pn[0]
        far = every({k: -v for k, v in get(deep, "init", "share_within_2").items()}, -0.5)
        grows = len(pn) > 1 and every(
            get(deep, "init", "std_log10_sv"), get(shallow, "init", "std_log10_sv")
        )
        why = []
        if not far:
            why.append(f"{deep} has ≥ 50% of σ in [½,2] at init on some seed")
        if not grows:
            why.append(f"the spread of log10σ does not grow from {shallow} to {deep} on every seed")
        rows = [
            Claim(
                claim="Deep Post-LN Transformers are far from dynamical isometry at init, and "
                "further with depth",
                paper="Post-LN 4 → 64 layers: σ spread over many decades, far from 1 (Fig. 5a)",
                paper_setup="Post-LN Transformer encoders of 4, 12, 64 layers, Xavier init",
                setup=setup,
                measured="at init: " + "; ".join(show(m, "init") for m in pn),
                verdict=verdict(far and grows, partly=far or grows),
                rule="; ".join(why)
                or f"{deep} < 50% of σ in [½,2] and a wider spread than {shallow}, every seed",
            )
        ]
        if "trained" in set(s["phase"]):
            for r in rz:
                same = [m for m in pn if _depth(m) == _depth(r)]
                row = self._trained_claim(cfg, setup, r, same[0] if same else deep, get, show)
                if len(rz) > 1:  # several ReZero depths: each row says which
                    row = dataclasses.replace(row, claim=f"{row.claim} (at {_depth(r)} layers)")
                rows.append(row)
        return rows

    @staticmethod
    def _trained_claim(cfg, setup: str, r: str, deep: str, get, show) -> Claim:
        """ReZero stack ``r`` stays near isometry after training; Post-LN ``deep`` does not."""
        mean_ok = all(
            abs(x) <= math.log10(2.0) for x in get(r, "trained", "mean_log10_sv").values()
        )
        closer = every(get(r, "trained", "share_within_2"), get(deep, "trained", "share_within_2"))
        why = []
        if not mean_ok:
            why.append(f"{r}'s mean log10σ leaves [log10 ½, log10 2] on some seed")
        if not closer:
            why.append(f"{r} is not closer to isometry than {deep} on every seed")
        return Claim(
            claim="ReZero stays close to dynamical isometry during training (mean σ ≈ 1), "
            "unlike Post-LN at the same depth",
            paper="64-layer ReZero encoder before and during training: λ_io ≈ 1 "
            "(Fig. 5b); at init it is the identity by construction (α = 0)",
            paper_setup="64-layer ReZero Transformer encoder",
            setup=setup,
            measured=f"after {cfg.steps} steps: "
            + "; ".join(show(m, "trained") for m in (r, deep))
            + f" (at init {r} is the identity by construction: "
            + f"{spread(get(r, 'init', 'share_within_2').values(), 3, pct=True)} in [½,2])",
            verdict=verdict(mean_ok and closer, partly=mean_ok or closer),
            rule="; ".join(why)
            or "ReZero's mean log10σ within log10 2 and more σ in [½,2] than Post-LN, every seed",
        )


def _depth(model: str) -> int:
    return int(model.rsplit("-", 1)[1])
