"""``path-variance``: how much of a deep residual network's output variance flows through short
paths (De & Smith 2020, "Batch Normalization Biases Residual Blocks Towards the Identity Function
in Deep Networks", arXiv 2002.10444, Fig. 3).

Unrolling ``x_{i+1} = x_i + α_i f_i(x_i)`` gives 2^d paths; a path through k branches carries
variance ∏ α_i² over its branches. With α_i = 1 the share of length k is Binomial(d, 1/2) (mean
d/2); with α = 1/√d it is Binomial(d, 1/(d+1)) (mean ≈ 1); in a normalized net, branch i is
downscaled by ~1/√i and most variance comes from short paths (paper: 97% from paths through ≤ 15
branches at d = 10,000). The numbers come from :func:`depthlab.path_variance` — an analytic model
(infinite width, independent paths), which is what the paper's 97% is.

Beside it, the same quantity **measured on real networks** with
:func:`depthlab.path_decomposition` (exact sums over paths, float64), at several widths and
depths, over seeds:

* ``batchnorm``: a deep linear residual MLP with BatchNorm in every branch, frozen at one batch's
  statistics (so the network is linear and the path sums are exact). BN divides each branch by
  the spread of the whole stream, itself the sum of the earlier paths: the branches are not
  independent of the skip path, and paths of different lengths come out correlated;
* ``fixed``: the control — the same linear MLP without BN, branch i scaled by the analytic
  model's 1/√i (independent random branches, no feedback), which should match the analytic
  model within the spread over seeds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, fmt, verdict

#: real networks measured with path_decomposition (see the module docstring)
NETS = ("batchnorm", "fixed")
VARIANTS = {  # label -> (scheme, alpha) for depthlab.path_variance
    "batchnorm": ("batchnorm", None),
    "alpha=1": ("plain", 1.0),
    "alpha=1/sqrt(d)": ("skipinit", "1/sqrt(d)"),
}


def pct(x: float) -> str:
    """A share as a percentage; tiny shares as '<0.01%'."""
    return "<0.01%" if 0 <= x < 1e-4 else f"{fmt(100 * x, 3)}%"


@dataclass(frozen=True)
class Config:
    depths: tuple[int, ...] = (10, 100, 1000, 10000)  # numbers of residual blocks d
    variants: tuple[str, ...] = tuple(VARIANTS)  # batchnorm, alpha=1, alpha=1/sqrt(d)
    short: int = 15  # "short path" threshold k of the claim
    # -- the real networks (path_decomposition) --
    nets: tuple[str, ...] = NETS  # batchnorm (BN frozen at the batch), fixed (1/√i, no BN)
    measured_depths: tuple[int, ...] = (10, 100, 1000)  # residual blocks of the real networks
    widths: tuple[int, ...] = (32, 128)
    batch: int = 128  # examples the variances are taken over
    max_k: int = 20  # path sums up to this length (≥ short); the rest is the (exact) tail
    seeds: tuple[int, ...] = (0, 1, 2)


@EXPERIMENTS.register()
class PathVariance(Experiment):
    name = "path-variance"
    choices = {"variants": tuple(VARIANTS), "nets": NETS}
    limits = {"depth": 10**7}  # analytic: no network is built (measured_depths: the default)

    title = "share of output variance by path length (BN vs α=1 vs α=1/√d)"
    paper = "De & Smith 2020, arXiv 2002.10444, Fig. 3"
    columns = (
        "part", "depth", "variant", "path_length", "share", "cdf", "width", "seed", "net_share",
        "cross", "cross_share", "tail_share", "mean_path_length",
    )  # fmt: skip
    version = 2
    Config = Config
    presets = {
        "smoke": Config(
            depths=(10, 100, 1000),
            measured_depths=(10, 30),
            widths=(16,),
            batch=32,
            max_k=15,
            seeds=(0, 1),
        ),  # fmt: skip
        "quick": Config(),
        "full": Config(
            depths=(10, 100, 1000, 10000, 100000),
            measured_depths=(10, 100, 1000, 10000),
            widths=(64, 256),
            batch=256,
            max_k=40,
        ),  # fmt: skip
    }

    def check(self, cfg: Config) -> None:
        from depthlab.registry import DepthlabError

        if cfg.max_k < cfg.short:
            raise DepthlabError(
                f"max_k ({cfg.max_k}) must be ≥ short ({cfg.short}): the measured share of paths "
                f"≤ {cfg.short} needs every path sum up to that length"
            )

    def cells(self, cfg: Config) -> list[dict]:
        analytic = [
            {"part": "analytic", "depth": d, "variant": v} for d in cfg.depths for v in cfg.variants
        ]
        measured = [
            {
                "part": "measured",
                "depth": d,
                "variant": f"real {net}",
                "width": w,
                "batch": cfg.batch,
                "max_k": cfg.max_k,
                "seed": seed,
            }  # fmt: skip
            for d in cfg.measured_depths
            for w in cfg.widths
            for net in cfg.nets
            for seed in cfg.seeds
        ]
        return analytic + measured

    def cell_model(self, cell: dict) -> tuple[str, dict, int] | None:
        if cell["part"] != "measured":
            return None
        kw = {"depth": cell["depth"], "width": cell["width"], "in_dim": cell["width"]}
        return "mlp", kw, cell["batch"] * (cell["max_k"] + 2)

    def run_cell(self, cell: dict) -> list[dict]:
        if cell["part"] == "measured":
            return _measure(cell)
        from depthlab.diagnostics.paths import path_variance

        scheme, alpha = VARIANTS[cell["variant"]]
        d = int(cell["depth"])
        if alpha == "1/sqrt(d)":
            alpha = 1 / math.sqrt(d)
        df = path_variance(d, scheme=scheme, alpha=alpha)
        return df[["path_length", "share", "cdf"]].to_dict("records")

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        analytic = _part(df, "analytic")
        depths = sorted(analytic["depth"].unique())
        fig, axes = plt.subplots(1, len(depths), figsize=(3.2 * len(depths), 3), squeeze=False)
        for ax, d in zip(axes[0], depths, strict=True):
            for v, g in analytic[analytic["depth"] == d].groupby("variant"):
                ax.plot(g["path_length"], g["share"], label=v)
            ax.set_xscale("symlog", linthresh=1)
            ax.set_title(f"d = {d}")
            ax.set_xlabel("path length k")
        axes[0][0].set_ylabel("share of variance")
        axes[0][0].legend(fontsize=7)
        paths = [save_fig(fig, out_dir / "path_variance.png")]
        measured = _part(df, "measured")
        if len(measured):
            paths.append(self._measured_figure(measured, analytic, out_dir))
        return paths

    @staticmethod
    def _measured_figure(measured: pd.DataFrame, analytic: pd.DataFrame, out_dir: Path) -> Path:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        d = int(measured["depth"].max())
        fig, (ax, bx) = plt.subplots(1, 2, figsize=(9, 3.4))
        at = measured[measured["depth"] == d]
        for (v, w), g in at.groupby(["variant", "width"]):
            st = g.groupby("path_length")["share"].agg(["mean", "min", "max"])
            (line,) = ax.plot(st.index, st["mean"], label=f"{v}, width {int(w)}")
            ax.fill_between(st.index, st["min"], st["max"], color=line.get_color(), alpha=0.2)
        from depthlab.diagnostics.paths import path_variance

        ref = path_variance(d, "batchnorm")
        ax.plot(ref["path_length"], ref["share"], "k--", label="analytic (BN)")
        ax.set_xlim(0, min(60, int(measured["path_length"].max())))
        ax.set_xlabel("path length k")
        ax.set_ylabel("share of the diagonal variance")
        ax.set_title(f"d = {d}: mean and min–max over seeds", fontsize=9)
        ax.legend(fontsize=6)
        per_run = measured.groupby(["variant", "width", "depth", "seed"])["cross_share"].first()
        for (v, w), g in per_run.reset_index().groupby(["variant", "width"]):
            st = g.groupby("depth")["cross_share"].agg(["mean", "min", "max"])
            (line,) = bx.plot(st.index, st["mean"], marker="o", label=f"{v}, width {int(w)}")
            bx.vlines(st.index, st["min"], st["max"], color=line.get_color())
        bx.axhline(0, color="k", lw=0.5)
        bx.set_xscale("log")
        bx.set_xlabel("depth d (residual blocks)")
        bx.set_ylabel("cross terms / Var(output)")
        bx.set_title("paths of different lengths: correlation", fontsize=9)
        bx.legend(fontsize=6)
        return save_fig(fig, out_dir / "path_decomposition.png")

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        analytic = _part(df, "analytic")
        d = int(analytic["depth"].max())
        at = analytic[analytic["depth"] == d]

        def cdf(variant: str) -> float:
            g = at[(at["variant"] == variant) & (at["path_length"] <= cfg.short)]
            return float(g["share"].sum()) if len(g) else math.nan

        bn, one, inv = cdf("batchnorm"), cdf("alpha=1"), cdf("alpha=1/sqrt(d)")
        short_bn = bn >= SHORT_SHARE
        long_one = math.isfinite(one) and one < 0.01
        ok = short_bn and long_one
        why = []
        if not short_bn:
            why.append(f"BN's share of paths ≤ {cfg.short} is below {SHORT_SHARE:.0%}")
        if not long_one:
            why.append(f"α=1's share of paths ≤ {cfg.short} is not below 1% (or was not computed)")
        rows = [
            Claim(
                claim="In a normalized ResNet most output variance flows through short paths; "
                "with α=1 through paths of length ≈ d/2 (the analytic path model)",
                paper="97% from paths ≤ 15 branches (d=10,000)",
                measured=f"d={d}: share of paths ≤ {cfg.short}: BN {pct(bn)}, α=1 {pct(one)}, "
                f"α=1/√d {pct(inv)}",
                verdict=verdict(ok, partly=short_bn or long_one),
                paper_setup="BN ResNet at init, d = 10,000 residual branches; the figure is "
                "computed from the analytic model (independent paths, infinite width)",
                setup=f"the same analytic model (the path-length law of each scheme), d = "
                f"{', '.join(f'{x:,}' for x in cfg.depths)}; exact, no seeds"
                + ("" if d >= 10_000 else f"; judged at d = {d:,}, not 10,000"),
                rule="; ".join(why) or f"BN ≥ {SHORT_SHARE:.0%} on short paths and α=1 < 1%",
            )
        ]
        measured = _part(df, "measured")
        if len(measured):
            rows += _measured_claims(measured, analytic, cfg)
        return rows


#: "most variance through short paths": at least this share through ≤ ``short`` branches
SHORT_SHARE = 0.9
#: "independent paths": the cross terms between path lengths within ± this share of Var(output)
CROSS_SMALL = 0.1


def _part(df: pd.DataFrame, part: str) -> pd.DataFrame:
    """The analytic or the measured rows (records without a ``part`` column are analytic)."""
    if "part" not in df.columns:
        return df if part == "analytic" else df.iloc[:0]
    return df[df["part"] == part]


def _runs(measured: pd.DataFrame, short: int) -> pd.DataFrame:
    """One row per measured run: net, depth, width, seed, the diagonal share of paths ≤ short,
    the cross terms and the mean path length."""
    out = []
    for (v, d, w, seed), g in measured.groupby(["variant", "depth", "width", "seed"]):
        out.append({
            "variant": v, "depth": int(d), "width": int(w), "seed": int(seed),
            "short": float(g.loc[g["path_length"] <= short, "share"].sum()),
            "cross": float(g["cross_share"].iloc[0]), "mean": float(g["mean_path_length"].iloc[0]),
            "tail": float(g["tail_share"].iloc[0]),
        })  # fmt: skip
    return pd.DataFrame(out)


def _within(values: list[float], target: float) -> bool:
    """``target`` within three standard errors of the mean of ``values`` (the spread over seeds;
    at least two seeds needed)."""
    if len(values) < 2:
        return False
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((x - mean) ** 2 for x in values) / (len(values) - 1))
    return abs(mean - target) <= 3 * sd / math.sqrt(len(values)) + 1e-9


def _measured_claims(measured: pd.DataFrame, analytic: pd.DataFrame, cfg: Config) -> list[Claim]:
    from depthlab.diagnostics.paths import path_summary, path_variance
    from depthlab.experiments.rules import spread

    runs = _runs(measured, cfg.short)
    d = int(runs["depth"].max())
    at = runs[runs["depth"] == d]
    setup = (
        f"linear residual MLPs, widths {', '.join(map(str, cfg.widths))}, d = "
        f"{', '.join(f'{x:,}' for x in cfg.measured_depths)} (judged at {d:,}), batch "
        f"{cfg.batch}, seeds {', '.join(map(str, cfg.seeds))}; dl.path_decomposition (exact, "
        f"float64; path sums to k ≤ {cfg.max_k}, the tail exact)"
        + ("" if d >= 10_000 else "; smaller than the paper's d = 10,000")
    )
    rows = []
    bn = at[at["variant"] == "real batchnorm"]
    if len(bn):
        parts, short_ok, indep_ok = [], True, True
        for w, g in bn.groupby("width"):
            parts.append(
                f"width {w}: paths ≤ {cfg.short} {spread(g['short'])}, cross terms "
                f"{spread(g['cross'])} of Var(y), mean path length {spread(g['mean'])}"
            )
            short_ok &= bool((g["short"] >= SHORT_SHARE).all())
            indep_ok &= bool((g["cross"].abs() <= CROSS_SMALL).all())
        why = []
        if not short_ok:
            why.append(
                f"the share through ≤ {cfg.short} branches is below {SHORT_SHARE:.0%} on some seed"
            )
        if not indep_ok:
            why.append(
                f"the cross terms between path lengths exceed {CROSS_SMALL:.0%} of the output "
                "variance on some seed"
            )
        rows.append(
            Claim(
                claim="In a normalized ResNet most output variance flows through short, "
                "independent paths — measured on real BN networks",
                paper="97% from paths ≤ 15 branches (d=10,000), from the analytic model",
                paper_setup="BN ResNet at init, d = 10,000; the analytic model, not a network",
                setup="BN in every branch, frozen at the batch's statistics; " + setup,
                measured=f"d={d:,}: " + "; ".join(parts),
                verdict=verdict(short_ok and indep_ok, partly=short_ok or indep_ok),
                rule="; ".join(why)
                or f"≥ {SHORT_SHARE:.0%} through ≤ {cfg.short} branches and cross terms within "
                f"±{CROSS_SMALL:.0%} of Var(output), on every seed and width",
            )
        )
    fixed = at[at["variant"] == "real fixed"]
    if len(fixed):
        target = path_summary(path_variance(d, "batchnorm"))["mean_path_length"]
        parts, ok = [], True
        for w, g in fixed.groupby("width"):
            parts.append(
                f"width {w}: mean path length {spread(g['mean'])}, cross terms {spread(g['cross'])}"
            )
            ok &= _within(list(g["mean"]), target) and _within(list(g["cross"]), 0.0)
        rows.append(
            Claim(
                claim="Control: a residual net whose branches are independent and scaled 1/√i "
                "follows the analytic path model",
                paper="the analytic model (independent paths, w_i = 1/i)",
                paper_setup="analytic",
                setup="no BN, branch i scaled by 1/√i; " + setup,
                measured=f"d={d:,}: analytic mean path length {fmt(target, 4)}; "
                + "; ".join(parts),
                verdict=verdict(ok),
                rule=""
                if ok
                else "the mean path length is not the analytic one, or the cross "
                "terms are not 0, within 3 standard errors over seeds on every width",
            )
        )
    return rows


def _measure(cell: dict) -> list[dict]:
    """One real network of the cell, decomposed into its path sums."""
    import torch

    import depthlab as dl

    torch.manual_seed(cell["seed"])
    d, w = int(cell["depth"]), int(cell["width"])
    if cell["variant"] == "real batchnorm":
        model = dl.create_model(
            "mlp", depth=d, width=w, in_dim=w, scheme="batchnorm", activation="linear"
        )
    else:
        model = dl.create_model(
            "mlp", depth=d, width=w, in_dim=w, scheme="skipinit", activation="linear",
            scheme_options={"learnable": False},
        )  # fmt: skip
        with torch.no_grad():
            for i, blk in enumerate(dl.residual_blocks(model), 1):
                blk.gate.alpha.fill_(1 / math.sqrt(i))
    x = torch.randn(int(cell["batch"]), w)
    df = dl.path_decomposition(model, x, max_k=int(cell["max_k"]))
    a = df.attrs
    return [
        {
            "path_length": int(r.path_length),
            "share": float(r.share),
            "cdf": float(r.cdf),
            "net_share": float(r.net_share),
            "cross": float(r.cross),
            "cross_share": float(a["cross_share"]),
            "tail_share": float(a["tail_share"]),
            "mean_path_length": float(a["mean_path_length"]),
        }  # fmt: skip
        for r in df.itertuples()
    ]
