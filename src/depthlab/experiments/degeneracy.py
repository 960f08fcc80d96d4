"""``degeneracy``: deep networks are hard to train because their weight products degenerate, not
because gradients vanish (Orhan & Pitkow 2018, "Skip Connections Eliminate Singularities",
arXiv 1701.09175; Saxe et al. 2013, arXiv 1312.6120; Pennington et al. 2017, arXiv 1711.04735).

Three parts:

* ``train``: a 30-layer linear net ``y = W_30 … W_1 x`` learns a random linear map (teacher
  regression, MSE, SGD with momentum) from three inits: standard Gaussian ``N(0, 1/n)`` ("Fold
  0"), the same with every matrix folded once ("Fold 1", rank n/2: *more* degenerate), and
  orthogonal (the least degenerate). Orhan's code multiplies ``x @ W`` with ``W`` of shape
  (in, out), so "copy the upper half onto the lower half" folds the *input* rows, which is what
  the ``linear`` model's ``init="fold:k"`` does (:func:`~depthlab.models.linear.fold_`; each
  layer then sums the two halves of its input). The claim: Fold 1 has *larger* gradient norms
  (w.r.t. the block activations) yet trains *worse* than Fold 0; orthogonal has smaller
  gradients and trains best — the gradient norm does not explain trainability, degeneracy does.
  As in the article, the gradient norms are reported at step 0 and during training (after a few
  epochs) separately, over ten seeds; the rule is judged on every seed, and a run that diverged
  is shown as diverged, never averaged in.
* ``product``: the singular values of ``W_k … W_1`` for k = 1, 10, 100 random matrices spread
  over orders of magnitude as k grows (the product degenerates), while with skip connections
  ``(I + W_k/√k) … (I + W_1/√k)`` (SkipInit's α = 1/√d) they do not collapse.
* the effective rank (exp of the entropy of the normalised singular values) of those products,
  with and without skips, from :mod:`depthlab.diagnostics`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, finite, fmt, train, verdict
from depthlab.experiments.rules import every, spread

INIT_LABEL = {"fold:0": "Fold 0", "fold:1": "Fold 1", "orthogonal": "Ortho"}


@dataclass(frozen=True)
class Config:
    inits: tuple[str, ...] = ("fold:0", "fold:1", "orthogonal")
    depth: int = 30  # layers of the trained linear net
    width: int = 32
    steps: int = 300
    lr: float = 0.01  # SGD, momentum 0.9
    batch_size: int = 64
    n_train: int = 1024
    seeds: tuple[int, ...] = tuple(range(10))
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N
    product_depths: tuple[int, ...] = (1, 10, 100)
    product_width: int = 64


@EXPERIMENTS.register()
class Degeneracy(Experiment):
    name = "degeneracy"
    zero_ok = ("seeds",)
    version = 2

    def check(self, cfg: Config) -> None:
        from depthlab.models.linear import parse_init

        for init in cfg.inits:
            parse_init(init)

    title = "Fold-0/Fold-1/orthogonal deep linear nets: gradient norm vs trainability"
    paper = "Orhan & Pitkow 2018, arXiv 1701.09175; Saxe et al. 2013, arXiv 1312.6120"
    columns = (
        "part", "init", "seed", "step", "train_loss", "grad_norm", "diverged",
        "depth", "scheme", "index", "singular_value", "effective_rank",
    )  # fmt: skip
    Config = Config
    presets = {
        "smoke": Config(steps=150, seeds=(0, 1), product_depths=(1, 10), product_width=16),
        "quick": Config(),
        "full": Config(width=128, steps=5000, seeds=tuple(range(10)), product_width=256),
    }

    def cells(self, cfg: Config) -> list[dict]:
        out = [
            {
                "part": "train",
                "init": init,
                "seed": s,
                "depth": cfg.depth,
                "width": cfg.width,
                "steps": cfg.steps,
                "lr": cfg.lr,
                "batch_size": cfg.batch_size,
                "n_train": cfg.n_train,
                "scheme": "noskip",
            }
            for init in cfg.inits
            for s in cfg.seeds
        ]
        out += [
            {
                "part": "product",
                "init": "standard",
                "seed": 0,
                "depth": d,
                "width": cfg.product_width,
                "scheme": scheme,
            }
            for d in cfg.product_depths
            for scheme in ("noskip", "skipinit")
        ]
        return out

    def run_cell(self, cell: dict) -> list[dict]:
        if cell["part"] == "train":
            return self._train(cell)
        return self._product(cell)

    @staticmethod
    def _train(cell: dict) -> list[dict]:
        import torch
        import torch.nn.functional as F

        import depthlab as dl
        from depthlab.data import create_dataset
        from depthlab.diagnostics import gradient_norms
        from depthlab.train.loop import resolve_device

        torch.manual_seed(cell["seed"])
        w = cell["width"]
        data = create_dataset("synthetic", kind="teacher", dim=w, n=cell["n_train"], data_seed=0)
        init = cell["init"]
        model = dl.create_model(
            "linear", depth=cell["depth"], width=w, init="standard" if init == "fold:0" else init
        )
        model.to(resolve_device(cell.get("device", "cpu")))  # step 0 is measured there too
        xb, yb = data.x_train[:256], data.y_train[:256]
        norms: dict[int, float] = {}

        def grad_norm(step: int, m: torch.nn.Module, _hist: object = None) -> None:
            """‖∂L/∂h‖ over every block output h, on a fixed batch, on the cell's device."""
            dev = next(m.parameters()).device
            df = gradient_norms(m, xb.to(dev), yb.to(dev), loss_fn=F.mse_loss)
            act = df[df["kind"] == "activation"]["norm"].to_numpy(float)
            norms[step] = float(np.sqrt(np.sum(act**2))) if len(act) else math.nan
            m.zero_grad(set_to_none=True)

        grad_norm(0, model)
        hist = train(
            model, data, cell, callbacks=[grad_norm], optimizer="sgd", momentum=0.9,
            eval_every=max(1, cell["steps"] // 10), divergence_factor=None,
        )  # fmt: skip
        out = []
        for rec in hist.records:
            loss = rec.get("train_loss")
            step = int(rec["step"])
            if loss is None and step not in norms:
                continue
            out.append(
                {"step": step, "train_loss": finite(loss), "grad_norm": norms.pop(step, math.nan)}
            )
        out += [{"step": s, "train_loss": math.nan, "grad_norm": g} for s, g in norms.items()]
        for r in out:
            r["diverged"] = bool(hist.diverged)
        return out

    @staticmethod
    def _product(cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.diagnostics import effective_rank, layer_maps, product_singular_values

        torch.manual_seed(cell["seed"])
        d = cell["depth"]
        opts = {"alpha_init": "1/sqrt(d)"} if cell["scheme"] == "skipinit" else None
        model = dl.create_model(
            "linear", depth=d, width=cell["width"], init="standard", scheme=cell["scheme"],
            scheme_options=opts,
        )  # fmt: skip
        sv = product_singular_values(layer_maps(model), [d])[d]  # of M_d … M_1, descending
        er = effective_rank(sv, singular_values=True)
        sv = sv / sv[0] if sv[0] > 0 else sv
        return [
            {"index": i, "singular_value": float(v), "effective_rank": er} for i, v in enumerate(sv)
        ]

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        tr = df[df["part"] == "train"]
        if "diverged" not in tr:
            tr = tr.assign(diverged=False)
        ok = tr[~tr["diverged"].astype(bool)]
        fig, axes = plt.subplots(1, 4, figsize=(17, 3.4))
        stats = self.per_seed(tr) if len(tr) else pd.DataFrame(columns=["init"])
        for k, (init, g) in enumerate(ok.groupby("init", sort=False)):
            label = INIT_LABEL.get(init, init)
            n_div = int(tr[tr["init"] == init].groupby("seed")["diverged"].any().sum())
            if n_div:
                label += f" ({n_div} diverged, not shown)"
            loss = g.dropna(subset=["train_loss"]).pivot_table(
                index="step", columns="seed", values="train_loss"
            )
            m, sd = loss.mean(axis=1), loss.std(axis=1).fillna(0.0)
            (line,) = axes[0].plot(loss.index, m, label=label)
            axes[0].fill_between(loss.index, (m - sd).clip(lower=1e-12), m + sd,
                                 color=line.get_color(), alpha=0.2)  # fmt: skip
            st = stats[stats["init"] == init]
            for ax, col in ((axes[1], "grad0"), (axes[2], "grad_train")):
                vals = st[col].dropna()
                sd_ = float(vals.std()) if len(vals) > 1 else 0.0
                ax.errorbar([k], [vals.mean()], yerr=[sd_], fmt="o", color=line.get_color(),
                            capsize=4, label=label)  # fmt: skip
        axes[0].set_yscale("log")
        axes[0].set_title(f"{cfg.depth}-layer linear net: training loss (mean ± sd)", fontsize=9)
        axes[0].set_xlabel("step")
        axes[1].set_title("‖∂L/∂h‖ at step 0 (before training; mean ± sd)", fontsize=9)
        axes[2].set_title("‖∂L/∂h‖ during training (mean ± sd)", fontsize=9)
        for ax in axes[:3]:
            ax.legend(fontsize=7)
        for ax in axes[1:3]:
            ax.set_xticks([])
            ax.set_yscale("log")
        pr = df[df["part"] == "product"]
        for (d, scheme), g in pr.groupby(["depth", "scheme"], sort=False):
            ls = "-" if scheme == "noskip" else "--"
            axes[3].plot(g["index"], g["singular_value"], ls, label=f"{int(d)} layers, {scheme}")
        axes[3].set_yscale("log")
        axes[3].set_title("singular values of the product (÷ largest)", fontsize=9)
        axes[3].set_xlabel("index")
        axes[3].legend(fontsize=6)
        return [save_fig(fig, out_dir / "degeneracy.png")]

    @staticmethod
    def final_losses(tr: pd.DataFrame, last: int = 10) -> dict[str, float]:
        """Per init: the training loss averaged over the last ``last`` logged steps and the
        seeds that did not diverge."""
        if "diverged" in tr:
            tr = tr[~tr["diverged"].astype(bool)]
        tr = tr.dropna(subset=["train_loss"])
        return {
            i: float(g.groupby("seed")["train_loss"].apply(lambda v: v.tail(last).mean()).mean())
            for i, g in tr.groupby("init")
        }

    @staticmethod
    def per_seed(tr: pd.DataFrame, last: int = 10) -> pd.DataFrame:
        """Per init × seed: final loss (inf if diverged), ‖∂L/∂h‖ at step 0 and its mean over
        the evaluations during training (NaN if diverged), and the divergence flag."""
        rows = []
        if "diverged" not in tr:
            tr = tr.assign(diverged=False)
        for (init, seed), g in tr.groupby(["init", "seed"], sort=False):
            div = bool(g["diverged"].astype(bool).any())
            loss = g.dropna(subset=["train_loss"])["train_loss"].tail(last).mean()
            g0 = g[g["step"] == 0]["grad_norm"].dropna()
            during = g[g["step"] > 0]["grad_norm"].dropna()
            rows.append(
                {
                    "init": init,
                    "seed": int(seed),
                    "diverged": div,
                    "loss": math.inf if div else float(loss),
                    "grad0": float(g0.iloc[0]) if len(g0) else math.nan,
                    "grad_train": math.nan if div or not len(during) else float(during.mean()),
                }
            )
        return pd.DataFrame(rows)

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        tr = df[df["part"] == "train"]
        rows = []
        inits = set(tr["init"])
        if {"fold:0", "fold:1"} <= inits:
            st = self.per_seed(tr)

            def col(init: str, c: str) -> dict[int, float]:
                g = st[st["init"] == init]
                return {int(r.seed): float(getattr(r, c)) for r in g.itertuples()}

            def neg(d: dict[int, float]) -> dict[int, float]:
                return {k: -v for k, v in d.items()}

            f0, f1, ot = "fold:0", "fold:1", "orthogonal"
            grad_up = every(col(f1, "grad_train"), col(f0, "grad_train"))
            worse = every(col(f1, "loss"), col(f0, "loss"))
            rules = {
                "Fold 1's gradient norm during training is above Fold 0's": grad_up,
                "Fold 1 ends with a higher loss than Fold 0": worse,
            }
            if ot in inits:
                rules["orthogonal ends with a lower loss than Fold 0"] = every(
                    neg(col(ot, "loss")), neg(col(f0, "loss"))
                )
                rules["orthogonal's gradient norm during training is below Fold 0's"] = every(
                    neg(col(ot, "grad_train")), neg(col(f0, "grad_train"))
                )

            def show(init: str) -> str:
                g = st[st["init"] == init]
                ok = g[~g["diverged"]]
                n = int(g["diverged"].sum())
                tail = f", {n}/{len(g)} diverged" if n else ""
                return (
                    f"{INIT_LABEL.get(init, init)} loss {spread(ok['loss'])}, grad at step 0 "
                    f"{spread(g['grad0'].dropna())}, during training {spread(ok['grad_train'])}"
                    f"{tail}"
                )

            failed = [k for k, v in rules.items() if not v]
            n_seeds = st["seed"].nunique()
            rows.append(
                Claim(
                    claim="Fold 1 has larger gradient norms than Fold 0 yet trains worse; "
                    "orthogonal has smaller gradients and trains best",
                    paper="Fold 1 worse with larger grads; Ortho best with smaller grads "
                    "(gradients after a few epochs)",
                    paper_setup="30-layer linear net learning a linear map, 10 runs",
                    setup=f"linear net, {cfg.depth} layers × width {cfg.width}, teacher "
                    f"regression (n = {cfg.n_train}), SGD lr {cfg.lr:g} momentum 0.9, batch "
                    f"{cfg.batch_size}, {cfg.steps} steps, {n_seeds} seeds",
                    measured=f"after {cfg.steps} steps (‖∂L/∂h‖ on a fixed batch): "
                    + "; ".join(show(i) for i in cfg.inits if i in inits),
                    verdict=verdict(not failed, partly=grad_up or worse),
                    rule=("not on every seed: " + "; ".join(failed))
                    if failed
                    else "every part holds on every seed",
                )
            )
        pr = df[df["part"] == "product"]
        if len(pr):
            spreads = {}
            for (d, scheme), g in pr.groupby(["depth", "scheme"]):
                sv = g["singular_value"].to_numpy(float)
                pos = sv[sv > 0]
                spreads[(int(d), scheme)] = (
                    float(np.log10(pos.max() / pos.min())) if len(pos) else math.nan,
                    float(g["effective_rank"].iloc[0]),
                )
            dmax = max(d for d, _ in spreads)
            dmin = min(d for d, _ in spreads)
            ns_lo, ns_hi = spreads[(dmin, "noskip")], spreads[(dmax, "noskip")]
            sk_hi = spreads.get((dmax, "skipinit"), (math.nan, math.nan))
            widens = ns_hi[0] > ns_lo[0] + 1  # at least a decade wider
            skips = math.isfinite(sk_hi[0]) and sk_hi[0] < ns_hi[0] and sk_hi[1] > ns_hi[1]
            rows.append(
                Claim(
                    claim="Products of random matrices degenerate with depth "
                    "(singular values spread); skip connections break the degeneracy",
                    paper="spectra of 1, 10, 100-layer products widen (Saxe et al.)",
                    measured=f"log10(σmax/σmin) of a product of {dmin}: {fmt(ns_lo[0], 2)}, of "
                    f"{dmax}: {fmt(ns_hi[0], 2)} (with skips {fmt(sk_hi[0], 2)}); effective "
                    f"rank at {dmax}: {fmt(ns_hi[1], 3)} vs {fmt(sk_hi[1], 3)} with skips",
                    verdict=verdict(widens and skips, partly=widens or skips),
                    paper_setup="products of random Gaussian matrices (Saxe et al.)",
                    setup=f"products of {', '.join(map(str, cfg.product_depths))} random "
                    f"{cfg.product_width}×{cfg.product_width} N(0, 1/n) matrices, one draw each; "
                    "skips: (I + W/√d) factors",
                    rule=""
                    if widens and skips
                    else (
                        "the spectrum does not widen by a decade with depth; " if not widens else ""
                    )
                    + (
                        ""
                        if skips
                        else "skips do not narrow the spectrum and raise the effective rank"
                    ),
                )
            )
        return rows
