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
  (w.r.t. the block activations, averaged over training) yet trains *worse* than Fold 0;
  orthogonal has smaller gradients and trains best — the gradient norm does not explain
  trainability, degeneracy does.
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
    seeds: tuple[int, ...] = (0, 1, 2)
    product_depths: tuple[int, ...] = (1, 10, 100)
    product_width: int = 64


@EXPERIMENTS.register()
class Degeneracy(Experiment):
    name = "degeneracy"
    zero_ok = ("seeds",)

    def check(self, cfg: Config) -> None:
        from depthlab.models.linear import parse_init

        for init in cfg.inits:
            parse_init(init)

    title = "Fold-0/Fold-1/orthogonal deep linear nets: gradient norm vs trainability"
    paper = "Orhan & Pitkow 2018, arXiv 1701.09175; Saxe et al. 2013, arXiv 1312.6120"
    columns = (
        "part", "init", "seed", "step", "train_loss", "grad_norm",
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

        torch.manual_seed(cell["seed"])
        w = cell["width"]
        data = create_dataset("synthetic", kind="teacher", dim=w, n=cell["n_train"], data_seed=0)
        init = cell["init"]
        model = dl.create_model(
            "linear", depth=cell["depth"], width=w, init="standard" if init == "fold:0" else init
        )
        xb, yb = data.x_train[:256], data.y_train[:256]
        norms: dict[int, float] = {}

        def grad_norm(step: int, m: torch.nn.Module, _hist: object = None) -> None:
            """‖∂L/∂h‖ over every block output h, on a fixed batch."""
            df = gradient_norms(m, xb, yb, loss_fn=F.mse_loss)
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
        fig, axes = plt.subplots(1, 3, figsize=(13, 3.4))
        for init, g in tr.groupby("init", sort=False):
            curve = g.dropna(subset=["train_loss"]).groupby("step")["train_loss"].mean()
            axes[0].plot(curve.index, curve.values, label=INIT_LABEL.get(init, init))
            gn = g.dropna(subset=["grad_norm"]).groupby("step")["grad_norm"].mean()
            axes[1].plot(gn.index, gn.values, marker="o", label=INIT_LABEL.get(init, init))
        axes[0].set_yscale("log")
        axes[0].set_title(f"{cfg.depth}-layer linear net: training loss")
        axes[1].set_yscale("log")
        axes[1].set_title("gradient norm (w.r.t. activations)")
        for ax in axes[:2]:
            ax.set_xlabel("step")
            ax.legend(fontsize=7)
        pr = df[df["part"] == "product"]
        for (d, scheme), g in pr.groupby(["depth", "scheme"], sort=False):
            ls = "-" if scheme == "noskip" else "--"
            axes[2].plot(g["index"], g["singular_value"], ls, label=f"{int(d)} layers, {scheme}")
        axes[2].set_yscale("log")
        axes[2].set_title("singular values of the product (÷ largest)")
        axes[2].set_xlabel("index")
        axes[2].legend(fontsize=6)
        return [save_fig(fig, out_dir / "degeneracy.png")]

    @staticmethod
    def final_losses(tr: pd.DataFrame, last: int = 10) -> dict[str, float]:
        """Per init: the training loss averaged over the last ``last`` logged steps and seeds."""
        tr = tr.dropna(subset=["train_loss"])
        return {
            i: float(g.groupby("seed")["train_loss"].apply(lambda v: v.tail(last).mean()).mean())
            for i, g in tr.groupby("init")
        }

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        tr = df[df["part"] == "train"]
        rows = []
        inits = set(tr["init"])
        if {"fold:0", "fold:1"} <= inits:
            final_loss = self.final_losses(tr)
            final_grad = {  # mean over the evaluations during training (step > 0) and seeds
                i: float(g[g["step"] > 0]["grad_norm"].mean()) for i, g in tr.groupby("init")
            }
            f0, f1 = "fold:0", "fold:1"
            ok1 = final_grad[f1] > final_grad[f0] and final_loss[f1] > final_loss[f0]
            parts = [
                f"{INIT_LABEL[i]} loss {fmt(final_loss[i], 2)}, grad {fmt(final_grad[i], 2)}"
                for i in cfg.inits
                if i in final_loss
            ]
            rows.append(
                Claim(
                    claim="Fold 1 has larger gradient norms than Fold 0 yet trains worse; "
                    "orthogonal has smaller gradients and trains best",
                    paper="Fold 1 worse with larger grads; Ortho best with smaller grads",
                    measured=f"after {cfg.steps} steps (grad = mean ‖∂L/∂h‖ during training): "
                    + "; ".join(parts),
                    verdict=verdict(
                        ok1
                        and "orthogonal" in final_loss
                        and final_loss["orthogonal"] < final_loss[f0]
                        and final_grad["orthogonal"] < final_grad[f1],
                        partly=ok1 or final_loss[f1] > final_loss[f0],
                    ),
                )
            )
        pr = df[df["part"] == "product"]
        if len(pr):
            spread = {}
            for (d, scheme), g in pr.groupby(["depth", "scheme"]):
                sv = g["singular_value"].to_numpy(float)
                pos = sv[sv > 0]
                spread[(int(d), scheme)] = (
                    float(np.log10(pos.max() / pos.min())) if len(pos) else math.nan,
                    float(g["effective_rank"].iloc[0]),
                )
            dmax = max(d for d, _ in spread)
            dmin = min(d for d, _ in spread)
            ns_lo, ns_hi = spread[(dmin, "noskip")], spread[(dmax, "noskip")]
            sk_hi = spread.get((dmax, "skipinit"), (math.nan, math.nan))
            ok = ns_hi[0] > ns_lo[0] + 1 and (math.isnan(sk_hi[1]) or sk_hi[1] > ns_hi[1])
            rows.append(
                Claim(
                    claim="Products of random matrices degenerate with depth "
                    "(singular values spread); skip connections break the degeneracy",
                    paper="spectra of 1, 10, 100-layer products widen (Saxe et al.)",
                    measured=f"log10(σmax/σmin) of a product of {dmin}: {fmt(ns_lo[0], 2)}, of "
                    f"{dmax}: {fmt(ns_hi[0], 2)} (with skips {fmt(sk_hi[0], 2)}); effective "
                    f"rank at {dmax}: {fmt(ns_hi[1], 3)} vs {fmt(sk_hi[1], 3)} with skips",
                    verdict=verdict(ok, partly=ns_hi[0] > ns_lo[0]),
                )
            )
        return rows
