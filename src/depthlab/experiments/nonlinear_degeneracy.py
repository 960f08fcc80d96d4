"""``nonlinear-degeneracy``: the degeneracy article's nonlinear half — deep random nonlinear
networks lose dimensions, skip connections stop it, and orthogonal hard-tanh nets at criticality
keep their Jacobian spectrum at 1.

Three parts, all at initialisation (nothing is trained):

* ``fold`` — Duvenaud, Rippel, Adams & Ghahramani 2014, "Avoiding pathologies in very deep
  networks" (arXiv 1402.5836, Figs 4–5): a grid of 2-D inputs pushed through a deep composition of
  random smooth maps ``ℝ² → ℝ²``. Each layer is a draw from a GP with a squared-exponential
  kernel (lengthscale 1, variance 1), approximated by ``fold_features`` random Fourier features
  (Rahimi & Recht 2007): ``f(x) = √(2/H) A cos(Ωx + β)``, Ω ~ N(0, 1), β ~ U(0, 2π),
  A ~ N(0, 1). Without skips the image folds into thin filaments: the input-output Jacobian
  (2×2 at each grid point) becomes rank one, measured by the ratio of its two singular values
  ``s₂/s₁`` (median over the grid). With skips, ``x + f(x)/√L`` (SkipInit's α = 1/√depth), the
  ratio stays of order one.
* ``rank`` — the participation ratio ``(Σλ)²/Σλ²`` of the covariance of each hidden layer's
  representation of a batch of Gaussian inputs, through depthlab MLP blocks (default init) with
  ReLU, tanh and linear units, without skips (``noskip``: ``W σ(x)``) and with them (SkipInit
  with α = 1/√depth, fixed at init). Claim: dimensions are lost with depth, faster with ReLU
  than with tanh or linear units, and skips stop it. Reported as PR(L)/PR(0).
* ``spectrum`` — Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep
  learning through dynamical isometry" (arXiv 1711.04735, Figs 1–2): no-skip MLP blocks
  ``h ↦ W φ(h) + b`` at the critical point (:func:`~depthlab.diagnostics.criticality.
  critical_point`, χ = 1 with variance fixed point ``q_star``), orthogonal or Gaussian W, input
  variance q*; the mean and variance of the eigenvalues of ``J Jᵀ`` (the paper's measure) at
  each depth. Orthogonal hard-tanh stays at mean 1, variance ≈ 0 at any depth; ReLU (even
  orthogonal) and Gaussian weights spread, the variance growing with depth. The rule reads the
  *normalized* variance ``var λ / (mean λ)²`` of each input's spectrum: at criticality the mean
  is 1 for infinite width, so it is the paper's variance there, but at a finite width the squared
  gain of one input drifts log-normally with depth/width (the mean of λ of a 100-layer width-128
  ReLU net ranged 0.36–2.6 over inputs), which the raw variance confounds with the spread. Both
  are recorded (``jjt_var``, ``jjt_nvar``).

Every rule is judged on every seed, against thresholds fixed before any run (a singular-value
ratio of 0.1, a kept participation ratio of 0.5, a ``J Jᵀ`` mean within 0.5 of 1 and variance
below 0.5).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, verdict
from depthlab.experiments.rules import every, spread

#: the no-skip image has folded where the median s₂/s₁ is below this; the skip image has not
#: where it is at or above it (an order of magnitude between the two directions)
FOLDED = 0.1
#: "skips stop it": the deepest layer keeps at least this share of the input's PR
KEPT = 0.5
#: "concentrated near 1": |mean λ − 1| and var λ (λ the eigenvalues of J Jᵀ) below this
NEAR = 0.5


@dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...] = (0, 1, 2)
    # fold (Duvenaud et al.)
    fold_depths: tuple[int, ...] = (1, 4, 16, 64)  # layers after which the image is measured
    fold_grid: int = 24  # grid points per side on [-1, 1]²
    fold_features: int = 64  # random Fourier features per layer (the GP approximation)
    # rank (participation ratio per layer)
    rank_activations: tuple[str, ...] = ("relu", "tanh", "linear")
    rank_depth: int = 64
    rank_width: int = 64
    rank_examples: int = 512
    # spectrum (Pennington et al.)
    spectrum_activations: tuple[str, ...] = ("hardtanh", "relu")
    spectrum_inits: tuple[str, ...] = ("orthogonal", "gaussian")
    spectrum_depths: tuple[int, ...] = (10, 100)
    spectrum_width: int = 128
    spectrum_examples: int = 2
    q_star: float = 1 / 64
    device: str = "cpu"  # every part is a few small matrix products: the CPU is enough


@EXPERIMENTS.register()
class NonlinearDegeneracy(Experiment):
    name = "nonlinear-degeneracy"
    title = "Deep random nonlinear nets: folding, lost dimensions, and dynamical isometry"
    paper = (
        "Duvenaud et al. 2014, arXiv 1402.5836; Pennington, Schoenholz & Ganguli 2017, "
        "arXiv 1711.04735"
    )
    zero_ok = ("seeds",)
    choices = {
        "rank_activations": ("relu", "tanh", "linear", "hardtanh", "sigmoid"),
        "spectrum_activations": ("relu", "tanh", "linear", "hardtanh"),
        "spectrum_inits": ("orthogonal", "gaussian"),
    }
    columns = (
        "part", "scheme", "activation", "init", "seed", "depth", "layer",
        "sv_ratio", "participation_ratio", "jjt_mean", "jjt_var", "jjt_nvar",
    )  # fmt: skip
    Config = Config
    presets = {
        "smoke": Config(
            seeds=(0, 1),
            fold_depths=(1, 8),
            fold_grid=8,
            fold_features=16,
            rank_depth=8,
            rank_width=16,
            rank_examples=64,
            spectrum_depths=(2, 8),
            spectrum_width=32,
        ),  # fmt: skip
        "quick": Config(),
        # the papers' depths: the folded grid and the hidden ranks through 1,000 layers, the
        # spectra at 10, 100 and 1,000 layers
        "deep": Config(
            seeds=(0, 1),
            fold_depths=(1, 16, 256, 1000),
            rank_depth=1000,
            spectrum_depths=(10, 100, 1000),
        ),  # fmt: skip
        "full": Config(
            seeds=tuple(range(5)),
            fold_depths=(1, 4, 16, 64, 256),
            fold_grid=48,
            fold_features=256,
            rank_depth=256,
            rank_width=256,
            rank_examples=2048,
            spectrum_depths=(10, 100, 1000),
            spectrum_width=512,
        ),  # fmt: skip
    }

    def check(self, cfg: Config) -> None:
        from depthlab.diagnostics.criticality import critical_point

        for act in cfg.spectrum_activations:
            critical_point(act, cfg.q_star)  # a clear error where none exists

    def cell_model(self, cell: dict) -> None:
        return None  # small matrices only

    def cells(self, cfg: Config) -> list[dict]:
        out = [
            {
                "part": "fold",
                "scheme": s,
                "seed": seed,
                "depth": max(cfg.fold_depths),
                "depths": ",".join(map(str, sorted(cfg.fold_depths))),
                "grid": cfg.fold_grid,
                "features": cfg.fold_features,
            }  # fmt: skip
            for seed in cfg.seeds
            for s in ("noskip", "skip")
        ]
        out += [
            {
                "part": "rank",
                "scheme": s,
                "activation": a,
                "seed": seed,
                "depth": cfg.rank_depth,
                "width": cfg.rank_width,
                "examples": cfg.rank_examples,
            }  # fmt: skip
            for seed in cfg.seeds
            for a in cfg.rank_activations
            for s in ("noskip", "skipinit")
        ]
        out += [
            {
                "part": "spectrum",
                "scheme": "noskip",
                "activation": a,
                "init": init,
                "seed": seed,
                "depth": max(cfg.spectrum_depths),
                "depths": ",".join(map(str, sorted(cfg.spectrum_depths))),
                "width": cfg.spectrum_width,
                "examples": cfg.spectrum_examples,
                "q_star": cfg.q_star,
            }  # fmt: skip
            for seed in cfg.seeds
            for a in cfg.spectrum_activations
            for init in cfg.spectrum_inits
        ]
        return out

    def run_cell(self, cell: dict) -> list[dict]:
        return {"fold": _fold, "rank": _rank, "spectrum": _spectrum}[cell["part"]](cell)

    # -- figures --------------------------------------------------------------------------
    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        paths = []
        pts = df[(df["part"] == "fold") & df["u"].notna()] if "u" in df else df.iloc[:0]
        if len(pts):
            depths = sorted(set(pts["depth_shown"].astype(int)))
            fig, axes = plt.subplots(2, len(depths), figsize=(2.6 * len(depths), 5.2))
            axes = np.atleast_2d(axes)
            for r, s in enumerate(("noskip", "skip")):
                for c, d in enumerate(depths):
                    g = pts[(pts["scheme"] == s) & (pts["depth_shown"] == d)]
                    ax = axes[r, c]
                    ax.scatter(g["u"], g["v"], c=g["x0"] + 2 * g["y0"], s=3, cmap="viridis")
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ax.set_title(f"{s}, {d} layer(s)", fontsize=8)
            fig.suptitle("image of a 2-D grid through random GP layers (seed 0)", fontsize=9)
            paths.append(save_fig(fig, out_dir / "fold.png"))
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
        fold = _fold_stats(df)
        for s, g in fold.groupby("scheme"):
            st = g.groupby("depth")["sv_ratio"].agg(["mean", "min", "max"])
            (line,) = axes[0].plot(st.index, st["mean"], marker="o", label=s)
            axes[0].vlines(st.index, st["min"], st["max"], color=line.get_color())
        axes[0].axhline(FOLDED, color="k", lw=0.6, ls=":")
        axes[0].set(xscale="log", yscale="log", xlabel="layers",
                    title="fold: median s₂/s₁ of the 2×2 Jacobian")  # fmt: skip
        rk = df[(df["part"] == "rank") & df["participation_ratio"].notna()]
        for (a, s), g in rk.groupby(["activation", "scheme"]):
            st = g.groupby("layer")["participation_ratio"].mean()
            axes[1].plot(st.index, st, ls="-" if s == "noskip" else "--", label=f"{a}, {s}")
        axes[1].set(yscale="log", xlabel="layer", title="rank: participation ratio (mean)")
        sp = df[(df["part"] == "spectrum") & df["jjt_nvar"].notna()]
        for (a, i), g in sp.groupby(["activation", "init"]):
            st = g.groupby("depth")["jjt_nvar"].mean()
            axes[2].plot(st.index, st.clip(lower=1e-12), marker="o", label=f"{a}, {i}")
        axes[2].axhline(NEAR, color="k", lw=0.6, ls=":")
        axes[2].set(
            xscale="log",
            yscale="log",
            xlabel="depth",
            title=f"spectrum: var of J Jᵀ eigenvalues at criticality (q*={cfg.q_star:g})",
        )
        for ax in axes:
            ax.legend(fontsize=6)
            ax.title.set_fontsize(8)
        paths.append(save_fig(fig, out_dir / "nonlinear_degeneracy.png"))
        return paths

    # -- claims ---------------------------------------------------------------------------
    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        rows = []
        seeds = ", ".join(map(str, sorted(set(df["seed"].astype(int))))) if len(df) else ""
        fold = _fold_stats(df)
        if {"noskip", "skip"} <= set(fold["scheme"]):
            dmax = int(fold["depth"].max())
            last = fold[fold["depth"] == dmax]
            ns = _by_seed(last[last["scheme"] == "noskip"], "sv_ratio")
            sk = _by_seed(last[last["scheme"] == "skip"], "sv_ratio")
            folds = _all(ns, lambda v: v < FOLDED)
            keeps = _all(sk, lambda v: v >= FOLDED)
            why = []
            if not folds:
                why.append(f"the no-skip image keeps a median s₂/s₁ ≥ {FOLDED} on some seed")
            if not keeps:
                why.append(f"the skip image's median s₂/s₁ falls below {FOLDED} on some seed")
            rows.append(
                Claim(
                    claim="Without skips, deep random nets fold a 2-D input into thin filaments "
                    "(a rank-one Jacobian); with skips they do not",
                    paper="deep GP's image concentrates on 1-D filaments; input-connected "
                    "nets keep 2-D structure (Figs 4–5)",
                    paper_setup="compositions of 2-D GP draws (SE kernel), 1 to 20+ layers",
                    setup=f"2-D GP layers ({cfg.fold_features} random Fourier features, SE "
                    f"kernel), {cfg.fold_grid}² grid on [-1, 1]², depths "
                    f"{', '.join(map(str, cfg.fold_depths))}, skips x + f(x)/√L, seeds {seeds}; "
                    "skips, not the paper's input connections",
                    measured=f"median s₂/s₁ at {dmax} layers: no skip {spread(ns.values())}, "
                    f"skip {spread(sk.values())}",
                    verdict=verdict(folds and keeps),
                    rule="; ".join(why)
                    or f"no-skip ratio < {FOLDED} and skip ratio ≥ {FOLDED} on every seed",
                )
            )
        rank = _rank_stats(df)
        if len(rank) and "relu" in set(rank["activation"]):

            def kept(a: str, s: str) -> dict[int, float]:
                g = rank[(rank["activation"] == a) & (rank["scheme"] == s)]
                return _by_seed(g, "kept")

            relu = kept("relu", "noskip")
            others = [a for a in ("tanh", "linear") if a in set(rank["activation"])]
            faster = bool(others) and all(every(kept(a, "noskip"), relu) for a in others)
            relu_skip = kept("relu", "skipinit")
            stops = every(relu_skip, relu) and _all(relu_skip, lambda v: v >= KEPT)
            why = []
            if not faster:
                why.append(
                    f"ReLU does not keep less of its PR than {'/'.join(others)} on every seed"
                )
            if not stops:
                why.append(f"with skips ReLU does not keep ≥ {KEPT} of its PR (and more than "
                           "without) on every seed")  # fmt: skip
            shown = "; ".join(
                f"{a} {spread(kept(a, 'noskip').values())} "
                f"(skips {spread(kept(a, 'skipinit').values())})"
                for a in ("relu", *others)
            )
            rows.append(
                Claim(
                    claim="Hidden representations lose dimensions with depth, faster with ReLU "
                    "than with tanh or linear units; skip connections stop it",
                    paper="qualitative (the degeneracy article; Saxe et al. 2013; Orhan & Pitkow "
                    "2018)",
                    paper_setup="deep random nets at initialisation",
                    setup=f"MLP blocks W σ(x), {cfg.rank_depth} blocks × width {cfg.rank_width}, "
                    f"default (He) init, {cfg.rank_examples} Gaussian inputs; skips: SkipInit "
                    f"α = 1/√{cfg.rank_depth}; seeds {seeds}",
                    measured=f"PR(layer {cfg.rank_depth}) / PR(input): {shown}",
                    verdict=verdict(faster and stops, partly=faster or stops),
                    rule="; ".join(why)
                    or f"ReLU keeps the least on every seed; skips keep ≥ {KEPT} on every seed",
                )
            )
        spec = df[(df["part"] == "spectrum") & df["jjt_nvar"].notna()] if len(df) else df
        if len(spec):
            rows += self._spectrum_claim(spec, cfg, seeds)
        return rows

    @staticmethod
    def _spectrum_claim(spec: pd.DataFrame, cfg: Config, seeds: str) -> list[Claim]:
        have = set(zip(spec["activation"], spec["init"], strict=True))
        if ("hardtanh", "orthogonal") not in have:
            return []
        dmin, dmax = int(spec["depth"].min()), int(spec["depth"].max())

        def at(a: str, init: str, d: int, col: str) -> dict[int, float]:
            g = spec[(spec["activation"] == a) & (spec["init"] == init) & (spec["depth"] == d)]
            return _by_seed(g, col)

        depths = sorted(set(spec["depth"].astype(int)))
        iso = all(
            _all(at("hardtanh", "orthogonal", d, "jjt_mean"), lambda v: abs(v - 1) < NEAR)
            and _all(at("hardtanh", "orthogonal", d, "jjt_nvar"), lambda v: v < NEAR)
            for d in depths
        )
        parts = {
            "orthogonal hard-tanh stays at mean 1, normalized variance < 0.5 at every depth": iso
        }
        if ("relu", "orthogonal") in have:
            hi = at("relu", "orthogonal", dmax, "jjt_nvar")
            lo = at("relu", "orthogonal", dmin, "jjt_nvar")
            key = f"orthogonal ReLU's var/mean² grows from {dmin} to {dmax} layers, > {NEAR}"
            parts[key] = every(hi, lo) and every(hi, NEAR)
        if ("hardtanh", "gaussian") in have:
            gauss = at("hardtanh", "gaussian", dmax, "jjt_nvar")
            orth = at("hardtanh", "orthogonal", dmax, "jjt_nvar")
            key = (
                f"Gaussian hard-tanh's var/mean² at {dmax} layers exceeds orthogonal's by > {NEAR}"
            )
            parts[key] = every(gauss, orth, NEAR)
        failed = [k for k, v in parts.items() if not v]

        def show(a: str, init: str) -> str:
            if (a, init) not in have:
                return ""
            return f"{a} {init}: " + ", ".join(
                f"{d} layers mean {spread(at(a, init, d, 'jjt_mean').values())} var/mean² "
                f"{spread(at(a, init, d, 'jjt_nvar').values())}"
                for d in depths
            )

        shown = "; ".join(x for x in (show(a, i) for a, i in sorted(have)) if x)
        return [
            Claim(
                claim="At criticality, orthogonal hard-tanh nets are dynamically isometric "
                "(J Jᵀ spectrum at 1, independent of depth); ReLU nets and Gaussian weights "
                "spread with depth",
                paper="orthogonal hard-tanh: spectrum depth-independent around 1; ReLU and "
                "Gaussian: variance grows ∝ depth (Figs 1–2)",
                paper_setup="fully connected nets, width 1,000, depths up to 1,000 (Fig. 2: "
                "L = 8 to 512), q* = 1/64 … 1/2",
                setup=f"no-skip MLP blocks W φ(h) + b, width {cfg.spectrum_width}, depths "
                f"{', '.join(map(str, depths))}, q* = {cfg.q_star:g}, "
                f"{cfg.spectrum_examples} inputs per seed, seeds {seeds}; narrower than the "
                "paper's",
                measured=f"J Jᵀ eigenvalues (per input; mean over inputs): {shown}",
                verdict=verdict(not failed, partly=iso and len(failed) < len(parts) - 1),
                rule=("not on every seed: " + "; ".join(failed))
                if failed
                else "every part holds on every seed",
            )
        ]


# -- the cells ---------------------------------------------------------------------------
def fold_trace(points, seed: int, features: int, depth: int, skip: bool):
    """Yield ``(layer, image, jacobian)`` after each of ``depth`` random 2-D GP layers applied to
    ``points`` (N, 2) float64: the image (N, 2) and the accumulated input-output Jacobian
    (N, 2, 2), computed in closed form. The layers depend only on ``seed`` (not on the points),
    so two calls with the same seed apply the same random map."""
    import torch

    g = torch.Generator().manual_seed(int(seed))
    x = points.to(torch.float64)
    jac = torch.eye(2, dtype=torch.float64).expand(len(x), 2, 2).clone()
    s = 1 / math.sqrt(depth)
    for layer in range(1, depth + 1):
        omega = torch.randn(features, 2, generator=g, dtype=torch.float64)
        beta = 2 * math.pi * torch.rand(features, generator=g, dtype=torch.float64)
        amp = torch.randn(2, features, generator=g, dtype=torch.float64) * math.sqrt(2 / features)
        z = x @ omega.T + beta  # (N, H)
        y = torch.cos(z) @ amp.T  # f(x), one GP draw per output dimension
        jf = torch.einsum("oh,nh,hi->noi", amp, -torch.sin(z), omega)  # A diag(−sin z) Ω
        if skip:
            x, jl = x + s * y, torch.eye(2, dtype=torch.float64) + s * jf
        else:
            x, jl = y, jf
        jac = jl @ jac
        yield layer, x, jac


def _fold(cell: dict) -> list[dict]:
    """Push a grid through ``depth`` random 2-D GP layers; the median ratio of the two singular
    values of the accumulated 2×2 Jacobian at each listed depth, and (seed 0) the image."""
    import torch

    n = int(cell["grid"])
    shown = {int(d) for d in str(cell["depths"]).split(",")}
    lin = torch.linspace(-1, 1, n, dtype=torch.float64)
    x0 = torch.cartesian_prod(lin, lin)  # (n², 2)
    out = []
    trace = fold_trace(x0, int(cell["seed"]), int(cell["features"]), int(cell["depth"]),
                       cell["scheme"] == "skip")  # fmt: skip
    for layer, x, jac in trace:
        if layer not in shown:
            continue
        sv = torch.linalg.svdvals(jac)  # (N, 2), descending
        ratio = (sv[:, 1] / sv[:, 0].clamp_min(1e-300)).median()
        out.append({"depth": layer, "sv_ratio": float(ratio)})
        if int(cell["seed"]) == 0:
            out += [
                {
                    "depth": layer,
                    "depth_shown": layer,
                    "point": i,
                    "x0": float(a),
                    "y0": float(b),
                    "u": float(u),
                    "v": float(v),
                }  # fmt: skip
                for i, (a, b, u, v) in enumerate(torch.cat([x0, x], 1).tolist())
            ]
    return out


def _rank(cell: dict) -> list[dict]:
    """Participation ratio of each block's output over a batch of Gaussian inputs."""
    import torch

    import depthlab as dl
    from depthlab.diagnostics import participation_ratio

    torch.manual_seed(int(cell["seed"]))
    d, w = int(cell["depth"]), int(cell["width"])
    opts = {"alpha_init": "1/sqrt(d)"} if cell["scheme"] == "skipinit" else None
    model = dl.create_model(
        "mlp", depth=d, width=w, in_dim=w, scheme=cell["scheme"], activation=cell["activation"],
        scheme_options=opts,
    )  # fmt: skip
    x = torch.randn(int(cell["examples"]), w, dtype=torch.float64)
    model = model.double()
    out = [{"layer": 0, "participation_ratio": participation_ratio(x)}]
    with torch.no_grad():
        for i, blk in enumerate(model.blocks, 1):
            x = blk(x)
            out.append({"layer": i, "participation_ratio": participation_ratio(x)})
    return out


def _spectrum(cell: dict) -> list[dict]:
    """Mean and variance of the eigenvalues of J Jᵀ of the first d blocks at criticality."""
    import torch

    import depthlab as dl
    from depthlab.diagnostics import jacobian_spectrum
    from depthlab.diagnostics.criticality import critical_point, jjt_moments

    torch.manual_seed(int(cell["seed"]))
    d, w, q = int(cell["depth"]), int(cell["width"]), float(cell["q_star"])
    sw, sb = critical_point(cell["activation"], q)
    model = dl.create_model(
        "mlp", depth=d, width=w, in_dim=w, scheme="noskip", activation=cell["activation"]
    ).double()
    with torch.no_grad():
        for blk in model.blocks:
            (lin,) = [m for m in blk.modules() if isinstance(m, torch.nn.Linear)]
            if cell["init"] == "orthogonal":
                torch.nn.init.orthogonal_(lin.weight, gain=sw)
            else:
                torch.nn.init.normal_(lin.weight, 0.0, sw / math.sqrt(w))
            if lin.bias is not None:
                torch.nn.init.normal_(lin.bias, 0.0, sb) if sb > 0 else lin.bias.zero_()
    blocks = list(model.blocks)
    x0 = torch.randn(int(cell["examples"]), w, dtype=torch.float64) * math.sqrt(q)
    out = []
    for depth in sorted(int(k) for k in str(cell["depths"]).split(",")):

        def stack(x: torch.Tensor, n: int = depth) -> torch.Tensor:
            for blk in blocks[:n]:
                x = blk(x)
            return x

        sv = jacobian_spectrum(stack, x0, method="dense")
        per = [jjt_moments(g["singular_value"].to_numpy()) for _, g in sv.groupby("example")]
        out.append(
            {
                "depth": depth,
                "jjt_mean": float(np.mean([m for m, _ in per])),
                "jjt_var": float(np.mean([v for _, v in per])),
                "jjt_nvar": float(np.mean([v / m**2 if m > 0 else math.inf for m, v in per])),
            }
        )
    return out


# -- helpers -----------------------------------------------------------------------------
def _by_seed(g: pd.DataFrame, col: str) -> dict[int, float]:
    return {int(r.seed): float(getattr(r, col)) for r in g.itertuples()}


def _fold_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per scheme × seed × depth: the median singular-value ratio."""
    if not len(df) or "sv_ratio" not in df:
        return pd.DataFrame(columns=["scheme", "seed", "depth", "sv_ratio"])
    f = df[(df["part"] == "fold") & df["sv_ratio"].notna()]
    return f[["scheme", "seed", "depth", "sv_ratio"]].reset_index(drop=True)


def _rank_stats(df: pd.DataFrame) -> pd.DataFrame:
    """Per activation × scheme × seed: PR at the last layer over PR of the input (``kept``)."""
    if not len(df) or "participation_ratio" not in df:
        return pd.DataFrame(columns=["activation", "scheme", "seed", "kept"])
    r = df[(df["part"] == "rank") & df["participation_ratio"].notna()]
    rows = []
    for (a, s, seed), g in r.groupby(["activation", "scheme", "seed"]):
        g = g.sort_values("layer")
        pr = g["participation_ratio"].to_numpy(float)
        first, last = pr[0], pr[-1]
        rows.append({"activation": a, "scheme": s, "seed": int(seed),
                     "kept": last / first if first > 0 else math.nan})  # fmt: skip
    return pd.DataFrame(rows, columns=["activation", "scheme", "seed", "kept"])


def _all(d: dict[int, float], pred) -> bool:
    """``pred`` holds on every seed (False when there is none or a value is NaN)."""
    return bool(d) and all(math.isfinite(v) and pred(v) for v in d.values())
