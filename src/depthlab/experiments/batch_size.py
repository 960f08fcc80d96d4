"""``batch-size``: where BatchNorm beats SkipInit (De & Smith 2020, arXiv 2002.10444, Figs 5–6).

SkipInit matches BN at small batch sizes; BN's advantage appears at large batch, where it
tolerates (and needs) larger learning rates. For each scheme × batch size × seed, a grid of
learning rates (fixed a priori) is trained for the same number of epochs on a convolutional
ResNet (the paper's networks are pre-activation Wide-ResNets; pre-activation basic blocks here,
for every scheme) with SGD, momentum 0.9, no
clipping; we report the best test accuracy over the grid and the learning rate that achieved it.
Every rule is judged per seed: an effect counts only where its sign holds on every seed and, for
the accuracy gap, where its mean over seeds exceeds two standard errors.

A second part (``part="tiny"``) tests the BN article's caveat that BN hurts when the batch is
too small, while LayerNorm (per-sample statistics; Ba et al. 2016, arXiv 1607.06450) and
SkipInit (no normalization) do not depend on the batch: BN, LN and SkipInit at batches of 2, 4
and 8 against a reference batch, all for the same number of epochs, with the learning-rate grid
scaled linearly with the batch size (``lr = base_lr × batch / tiny_ref_batch``, the small-batch
regime of De & Smith's Fig. 5 and Goyal et al. 2017, arXiv 1706.02677).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, finite, fmt, train, verdict
from depthlab.experiments.rules import every, mean_sd, spread
from depthlab.registry import DepthlabError


@dataclass(frozen=True)
class Config:
    schemes: tuple[str, ...] = ("batchnorm", "skipinit")
    batch_sizes: tuple[int, ...] = (32, 128, 512)
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3)  # learning-rate grid (SGD, momentum 0.9)
    epochs: float = 4.0  # same number of epochs for every batch size
    depth: int = 8  # CIFAR ResNet depth 6n+2
    width: int = 1  # channel multiplier
    seeds: tuple[int, ...] = (0, 1, 2)
    #: the tiny-batch part: schemes, batch sizes, the reference batch they are compared with,
    #: the base lr grid (scaled by batch / tiny_ref_batch) and the epochs; tiny_schemes=()
    #: leaves the part out
    tiny_schemes: tuple[str, ...] = ("batchnorm", "layernorm", "skipinit")
    tiny_batch_sizes: tuple[int, ...] = (2, 4, 8)
    tiny_ref_batch: int = 32
    tiny_lrs: tuple[float, ...] = (0.03, 0.1, 0.3)
    tiny_epochs: float = 1.0
    data_dir: str = ""  # a CIFAR-10 python folder: CIFAR-10 (3×32×32) instead of digits
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N


@EXPERIMENTS.register()
class BatchSize(Experiment):
    name = "batch-size"
    zero_ok = ("seeds",)
    empty_ok = ("tiny_schemes",)
    choices = {
        "schemes": ("batchnorm", "skipinit", "fixup", "rezero"),
        "tiny_schemes": ("batchnorm", "layernorm", "skipinit", "fixup", "rezero"),
    }
    version = 3
    title = "BN vs SkipInit across batch sizes: best accuracy and optimal learning rate"
    paper = "De & Smith 2020, arXiv 2002.10444, Figs 5–6"
    columns = ("part", "scheme", "batch_size", "lr", "base_lr", "seed", "test_accuracy", "diverged")
    Config = Config
    presets = {
        "smoke": Config(
            batch_sizes=(32, 256),
            lrs=(0.03, 0.3),
            epochs=1.0,
            seeds=(0, 1),
            tiny_batch_sizes=(4,),
            tiny_lrs=(0.1,),
            tiny_epochs=0.25,
        ),  # fmt: skip
        "quick": Config(),
        # the same grid on a ResNet-20 (quick: ResNet-8), two seeds
        "deep": Config(depth=20, seeds=(0, 1)),
        # De & Smith's Figs. 5–6: Wide-ResNet-16-4 on CIFAR-10, batch 64 to 4,096, an lr grid,
        # 200 epochs at every batch size
        "full": Config(
            batch_sizes=(64, 256, 1024, 4096),
            lrs=(0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0),
            epochs=200.0,
            depth=16,
            width=4,
            tiny_epochs=10.0,
            tiny_lrs=(0.01, 0.03, 0.1, 0.3),
        ),
    }
    needs = {"full": ("data_dir",)}

    def check(self, cfg: Config) -> None:
        from depthlab.models.resnet import check_resnet_depth

        check_resnet_depth(cfg.depth, "depth")
        if cfg.data_dir:
            from depthlab.data.cifar10 import find_folder

            find_folder(cfg.data_dir)
        if cfg.tiny_schemes and cfg.tiny_ref_batch in cfg.tiny_batch_sizes:
            raise DepthlabError(
                f"batch-size: tiny_ref_batch={cfg.tiny_ref_batch} is also in tiny_batch_sizes; "
                "the reference batch must differ from the tiny ones"
            )

    def cells(self, cfg: Config) -> list[dict]:
        data = {"data_dir": cfg.data_dir} if cfg.data_dir else {}  # digits cells keep their hash
        main = [
            {
                "part": "main",
                "scheme": s,
                "batch_size": b,
                "lr": lr,
                "epochs": cfg.epochs,
                "depth": cfg.depth,
                "width": cfg.width,
                "seed": seed,
                **data,
            }  # fmt: skip
            for seed in cfg.seeds
            for s in cfg.schemes
            for b in cfg.batch_sizes
            for lr in cfg.lrs
        ]
        tiny = [
            {
                "part": "tiny",
                "scheme": s,
                "batch_size": b,
                "lr": base * b / cfg.tiny_ref_batch,
                "base_lr": base,
                "epochs": cfg.tiny_epochs,
                "depth": cfg.depth,
                "width": cfg.width,
                "seed": seed,
                **data,
            }  # fmt: skip
            for seed in cfg.seeds
            for s in cfg.tiny_schemes
            for b in (*cfg.tiny_batch_sizes, cfg.tiny_ref_batch)
            for base in cfg.tiny_lrs
        ]
        return main + tiny

    def cell_model(self, cell: dict) -> tuple[str, dict, int, tuple[int, ...]]:
        shape = (3, 32, 32) if cell.get("data_dir") else (1, 8, 8)
        kwargs = {"depth": cell["depth"], "width": cell["width"], "in_channels": shape[0]}
        return "resnet", kwargs, cell["batch_size"], shape

    def run_cell(self, cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.data import create_dataset

        torch.manual_seed(cell["seed"])
        if cell.get("data_dir"):
            data = create_dataset("cifar10", data_dir=cell["data_dir"])
        else:
            data = create_dataset("digits")
        steps = max(1, math.ceil(cell["epochs"] * data.num_train() / cell["batch_size"]))
        model = dl.create_model(
            "resnet", depth=cell["depth"], width=cell["width"], scheme=cell["scheme"],
            in_channels=data.input_shape[0], variant="preact",
        )  # fmt: skip
        hist = train(
            model, data, cell, steps=steps,
            scalar_lr_mult=0.1 if cell["scheme"] == "fixup" else 1.0,
        )  # fmt: skip
        s = hist.summary
        return [
            {
                "base_lr": cell.get("base_lr", cell["lr"]),
                "steps": steps,
                "test_accuracy": finite(s.get("test_accuracy")),
                "final_train_loss": finite(s.get("final_train_loss")),
                "diverged": bool(hist.diverged),
            }
        ]

    @staticmethod
    def best(df: pd.DataFrame, part: str = "main") -> pd.DataFrame:
        """Per scheme × batch size × seed of ``part``: best accuracy over the lr grid
        (diverged = 0) and the lr achieving it (the smallest such lr on a tie)."""
        d = df.copy()
        if "seed" not in d:
            d["seed"] = 0
        if "part" not in d:
            d["part"] = "main"
        d = d[d["part"].fillna("main") == part]
        d["acc"] = d["test_accuracy"].fillna(0.0).where(~d["diverged"].astype(bool), 0.0)
        d = d.sort_values(["scheme", "batch_size", "seed", "lr"])
        idx = d.groupby(["scheme", "batch_size", "seed"])["acc"].idxmax()
        return d.loc[idx, ["scheme", "batch_size", "seed", "lr", "acc"]].reset_index(drop=True)

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        paths = []
        best = self.best(df)
        if len(best):
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
            for k, (s, g) in enumerate(best.groupby("scheme", sort=False)):
                st = _stats(g)
                x = st.index.to_numpy() * (1 + 0.04 * (k - 0.5))  # equal values stay visible
                style = dict(marker="os^v"[k % 4], ls="-" if s == "batchnorm" else "--", label=s)
                (line,) = axes[0].plot(x, st["acc"], **style)
                axes[0].vlines(x, st["lo"], st["hi"], color=line.get_color(), lw=1)
                axes[1].plot(x, st["lr"], color=line.get_color(), **style)
                axes[1].vlines(x, st["lr_lo"], st["lr_hi"], color=line.get_color(), lw=1)
            labels = ("best test accuracy (mean, min–max)", "optimal learning rate (median, range)")
            for ax, lab in zip(axes, labels, strict=True):
                ax.set_xscale("log", base=2)
                ax.set_xlabel("batch size")
                ax.set_ylabel(lab, fontsize=8)
            axes[1].set_yscale("log")
            axes[0].legend(fontsize=7)
            fig.suptitle(f"{len(set(best['seed']))} seeds", fontsize=8)
            paths.append(save_fig(fig, out_dir / "batch_size.png"))
        tiny = self.best(df, "tiny")
        if len(tiny):
            fig, ax = plt.subplots(figsize=(4.8, 3.4))
            for k, (s, g) in enumerate(tiny.groupby("scheme", sort=False)):
                st = _stats(g)
                x = st.index.to_numpy() * (1 + 0.04 * (k - 1))
                (line,) = ax.plot(x, st["acc"], marker="os^v"[k % 4], label=s)
                ax.vlines(x, st["lo"], st["hi"], color=line.get_color(), lw=1)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size (lr grid scaled with the batch)")
            ax.set_ylabel("best test accuracy (mean, min–max)", fontsize=8)
            ax.legend(fontsize=7)
            ax.set_title(f"tiny batches, {cfg.tiny_epochs:g} epoch(s), "
                         f"{len(set(tiny['seed']))} seeds", fontsize=8)  # fmt: skip
            paths.append(save_fig(fig, out_dir / "batch_size_tiny.png"))
        return paths

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        return self._main_claim(df, cfg) + self._tiny_claim(df, cfg)

    def _main_claim(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        best = self.best(df)
        small, large = min(cfg.batch_sizes), max(cfg.batch_sizes)
        have = set(zip(best["scheme"], best["batch_size"], strict=True))
        if not {("batchnorm", large), ("skipinit", large), ("batchnorm", small)} <= have:
            return []

        def get(s: str, b: int, col: str) -> dict[int, float]:
            g = best[(best["scheme"] == s) & (best["batch_size"] == b)]
            return {int(r.seed): float(getattr(r, col)) for r in g.itertuples()}

        def gap(b: int) -> dict[int, float]:
            bn, si = get("batchnorm", b, "acc"), get("skipinit", b, "acc")
            return {k: bn[k] - si[k] for k in bn if k in si}

        g_small, g_large = gap(small), gap(large)
        grows = {k: g_large[k] - g_small[k] for k in g_large if k in g_small}
        m, sd = mean_sd(grows.values())
        se = sd / math.sqrt(len(grows)) if grows else math.nan
        advantage = every(grows, 0.0) and every(g_large, 0.0) and m > 2 * se
        lr_bn, lr_si = get("batchnorm", large, "lr"), get("skipinit", large, "lr")
        lr_larger = every(lr_bn, lr_si)
        why = []
        if not advantage:
            why.append(
                "the BN−SkipInit gap does not grow from the smallest to the largest batch on every "
                "seed by more than 2 standard errors"
            )
        if not lr_larger:
            why.append("BN's optimal lr at the largest batch is not above SkipInit's on every seed")

        def lrs(d: dict[int, float]) -> str:
            return "/".join(fmt(d[k], 2) for k in sorted(d))

        return [
            Claim(
                claim="BN's advantage over SkipInit appears at large batch size, where BN "
                "tolerates larger learning rates",
                paper="equal at small batch; BN better and higher optimal lr at large batch",
                paper_setup="Wide-ResNet-16-4, CIFAR-10, batch 64 to 4,096, lr grid, fixed epochs",
                setup=f"pre-activation conv ResNet-{cfg.depth} ({16 * cfg.width} channels first), "
                f"{_data(cfg)}, SGD momentum 0.9, batch {', '.join(map(str, cfg.batch_sizes))}, "
                f"lr grid {', '.join(fmt(x, 2) for x in cfg.lrs)}, {cfg.epochs:g} epochs, seeds "
                f"{', '.join(map(str, sorted(set(best['seed']))))}; "
                + ("the paper's data" if cfg.data_dir else "smaller than the paper's"),
                measured=f"BN−SkipInit best acc: batch {small} {spread(g_small.values())}, batch "
                f"{large} {spread(g_large.values())}; optimal lr at batch {large} (per seed) BN "
                f"{lrs(lr_bn)} vs SkipInit {lrs(lr_si)}",
                verdict=verdict(advantage and lr_larger, partly=advantage or lr_larger),
                rule="; ".join(why)
                or "the gap grows on every seed (mean > 2 SE) and BN's optimal lr is higher on "
                "every seed",
            )
        ]

    def _tiny_claim(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        best = self.best(df, "tiny")
        if not len(best):
            return []
        ref = cfg.tiny_ref_batch
        smallest = min(cfg.tiny_batch_sizes)
        others = [s for s in ("layernorm", "skipinit") if s in set(best["scheme"])]
        have = set(zip(best["scheme"], best["batch_size"], strict=True))
        need = {(s, b) for s in ("batchnorm", *others) for b in (ref, smallest)}
        if not others or not need <= have:
            return []

        def acc(s: str, b: int) -> dict[int, float]:
            g = best[(best["scheme"] == s) & (best["batch_size"] == b)]
            return {int(r.seed): float(r.acc) for r in g.itertuples()}

        def drop(s: str) -> dict[int, float]:
            a_ref, a_small = acc(s, ref), acc(s, smallest)
            return {k: a_ref[k] - a_small[k] for k in a_ref if k in a_small}

        d_bn = drop("batchnorm")
        d_other = {s: drop(s) for s in others}
        m_bn, sd_bn = mean_sd(d_bn.values())
        # BN itself must lose accuracy: on every seed, mean drop > 2 standard errors
        bn_hurt = every(d_bn, 0.0) and m_bn > 2 * sd_bn / math.sqrt(len(d_bn))
        worst_other = {k: max(d[k] for d in d_other.values() if k in d) for k in d_bn}
        excess = {k: d_bn[k] - worst_other[k] for k in d_bn}
        m, sd = mean_sd(excess.values())
        se = sd / math.sqrt(len(excess)) if excess else math.nan
        bn_worse = all(every(d_bn, d) for d in d_other.values()) and m > 2 * se
        # "does not degrade": a mean drop below 2 accuracy points, fixed before any run
        steady = {s: mean_sd(d.values())[0] < TINY_STEADY for s, d in d_other.items()}
        why = []
        if not bn_hurt:
            why.append(
                f"BN does not lose accuracy from batch {ref} to {smallest} on every seed by "
                "more than 2 standard errors"
            )
        if not bn_worse:
            why.append(
                f"BN's drop does not exceed {' and '.join(others)}'s on every seed by more "
                "than 2 standard errors"
            )
        why += [
            f"{s} loses {mean_sd(d_other[s].values())[0]:.3f} on average (≥ {TINY_STEADY})"
            for s, ok in steady.items()
            if not ok
        ]
        seeds = ", ".join(map(str, sorted(set(best["seed"]))))
        return [
            Claim(
                claim="BN hurts when the batch is too small; LayerNorm and SkipInit do not "
                "depend on the batch size",
                paper="qualitative: BN's statistics are noisy at tiny batches (the BN article; "
                "Ioffe 2017, arXiv 1702.03275); LN normalizes each sample",
                paper_setup="not a single figure; De & Smith 2020 Fig. 5 shows SkipInit steady "
                "down to batch 64 on CIFAR-10",
                setup=f"pre-activation conv ResNet-{cfg.depth} ({16 * cfg.width} channels first), "
                f"{_data(cfg)}, SGD momentum 0.9, batch "
                f"{', '.join(map(str, sorted(cfg.tiny_batch_sizes)))} vs {ref}, lr grid "
                f"{', '.join(fmt(x, 2) for x in cfg.tiny_lrs)} × batch/{ref}, "
                f"{cfg.tiny_epochs:g} epoch(s), seeds {seeds}; smaller than any paper's",
                measured=f"best-accuracy drop from batch {ref} to {smallest}: BN "
                f"{spread(d_bn.values())}, "
                + ", ".join(f"{s} {spread(d.values())}" for s, d in d_other.items()),
                verdict=verdict(bn_hurt and bn_worse and all(steady.values()), partly=bn_hurt),
                rule="; ".join(why)
                or f"BN loses accuracy and more than {' and '.join(others)} on every seed "
                f"(means > 2 SE); theirs average below {TINY_STEADY}",
            )
        ]


def _stats(g: pd.DataFrame) -> pd.DataFrame:
    return g.groupby("batch_size").agg(
        acc=("acc", "mean"), lo=("acc", "min"), hi=("acc", "max"),
        lr=("lr", "median"), lr_lo=("lr", "min"), lr_hi=("lr", "max"),
    )  # fmt: skip


#: the largest mean accuracy drop (reference batch → smallest tiny batch) that counts as "does
#: not depend on the batch size"; fixed before any run
TINY_STEADY = 0.02


def _data(cfg: Config) -> str:
    """The data set a config trains on, as the setup column names it."""
    return "CIFAR-10 3×32×32" if cfg.data_dir else "digits 1×8×8"
