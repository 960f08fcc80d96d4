"""``fixup-ablation``: which of Fixup's rules a deep ResNet needs to train without normalization.

Fixup (Zhang, Dauphin & Ma 2019, "Fixup Initialization: Residual Learning Without
Normalization", arXiv 1901.09321) has four parts, each an option of the ``fixup`` scheme:

1. ``zero_init`` — the last layer of every branch and the classifier start at zero;
2. ``rescale`` — the other branch layers are He-initialised × L^(-1/(2m-2));
3. ``multiplier`` — a scalar multiplier (init 1) per branch;
4. ``biases`` — scalar biases (init 0) before each conv, activation and the classifier.

The two source articles disagree. SkipInit's (De & Smith 2020, arXiv 2002.10444, Section 4.3):
"in practice, Fixup's component 1 or component 2 alone is enough to train deep ResNet-V2s
without normalization". Fixup's: rule 2 (the rescale) is needed — zero-initialising the branches
alone does not train at the default learning rate.

Here every variant — Fixup, each rule alone, each rule left out, none (plain He init) — trains the
same conv ResNet (pre-activation by default, the ResNet-V2 of SkipInit's claim; ``variant=
"postact"`` for Fixup's reference network) on the digits images with Fixup's recipe (SGD
momentum 0.9, weight decay 5e-4, scalars at lr/10, no clipping, no warm-up) at the default
learning rate (0.1) and a large one, over seeds, beside the frozen-gate control (the SkipInit
network with its gates fixed at 0: the stem and classifier only). "Trains" means: no divergence
and a test accuracy above the control on every seed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, finite, train, verdict
from depthlab.experiments.rules import accuracy_or_zero, contrast, every, spread

RULES = ("zero_init", "rescale", "multiplier", "biases")


def _options(on: tuple[str, ...]) -> dict[str, bool]:
    return {r: r in on for r in RULES}


#: arm label -> (scheme, options)
ARMS: dict[str, tuple[str, dict]] = {
    "fixup": ("fixup", _options(RULES)),
    **{f"only-{r}": ("fixup", _options((r,))) for r in RULES},
    **{f"no-{r}": ("fixup", _options(tuple(x for x in RULES if x != r))) for r in RULES},
    "none": ("fixup", _options(())),
    "frozen": ("skipinit", {"learnable": False}),
}
#: "fails": diverged, or this far below Fixup on every seed
FAIL = 0.10


@dataclass(frozen=True)
class Config:
    arms: tuple[str, ...] = tuple(ARMS)
    depth: int = 56  # CIFAR ResNet depth 6n+2 (L = (depth-2)/2 branches of m = 2 layers)
    variant: str = "preact"  # preact: ResNet-V2 (SkipInit's claim); postact: Fixup's reference
    lrs: tuple[float, ...] = (0.1, 1.0)  # the default learning rate, then a large one
    steps: int = 60
    batch_size: int = 64
    weight_decay: float = 5e-4
    channels_last: bool = True  # NHWC convolutions (faster on a CPU; same function)
    data_dir: str = ""  # a CIFAR-10 python folder: CIFAR-10 (3×32×32) instead of digits
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N


@EXPERIMENTS.register()
class FixupAblation(Experiment):
    name = "fixup-ablation"
    title = "Fixup's rules one by one: each alone and each left out, at the default and a large lr"
    paper = (
        "Zhang et al. 2019, arXiv 1901.09321 (rules 1–3); De & Smith 2020, arXiv 2002.10444, "
        "Section 4.3 (rule 1 or 2 alone suffices)"
    )
    columns = (
        "arm", "variant", "depth", "lr", "seed", "test_accuracy", "final_train_loss", "diverged",
    )  # fmt: skip
    choices = {"arms": tuple(ARMS), "variant": ("preact", "postact")}
    zero_ok = ("seeds", "weight_decay")
    Config = Config
    presets = {
        "smoke": Config(
            arms=("fixup", "only-zero_init", "no-rescale", "frozen"),
            depth=14,
            steps=20,
            seeds=(0, 1),
        ),  # fmt: skip
        "quick": Config(
            arms=("fixup", "only-zero_init", "only-rescale", "no-rescale", "none", "frozen")
        ),
        # at depth: 1,004 layers (L = 501 branches), the quick arms, the default lr and a large one
        "deep": Config(
            arms=("fixup", "only-zero_init", "only-rescale", "no-rescale", "none", "frozen"),
            depth=1004,
            seeds=(0, 1),
        ),  # fmt: skip
        # CIFAR-10 and He et al.'s deepest CIFAR ResNet (1,202 layers), 2,000 steps of 128
        # (≈ 5 epochs: whether each variant trains, not its final error)
        "full": Config(depth=1202, steps=2000, batch_size=128),
    }
    needs = {"full": ("data_dir",)}

    def check(self, cfg: Config) -> None:
        from depthlab.models.resnet import check_resnet_depth

        check_resnet_depth(cfg.depth, "depth")
        if cfg.data_dir:
            from depthlab.data.cifar10 import find_folder

            find_folder(cfg.data_dir)

    def cells(self, cfg: Config) -> list[dict]:
        return [
            {
                "arm": a,
                "variant": cfg.variant,
                "depth": cfg.depth,
                "lr": lr,
                "steps": cfg.steps,
                "batch_size": cfg.batch_size,
                "weight_decay": cfg.weight_decay,
                "channels_last": cfg.channels_last,
                "seed": seed,
                **({"data_dir": cfg.data_dir} if cfg.data_dir else {}),  # digits: same hash
            }  # fmt: skip
            for lr in cfg.lrs
            for seed in cfg.seeds
            for a in cfg.arms
        ]

    def cell_model(self, cell: dict) -> tuple[str, dict, int, tuple[int, ...]]:
        shape = (3, 32, 32) if cell.get("data_dir") else (1, 8, 8)
        kwargs = {"depth": cell["depth"], "variant": cell["variant"], "in_channels": shape[0]}
        return "resnet", kwargs, cell["batch_size"], shape

    def cell_scheme(self, cell: dict) -> tuple[str, dict]:
        return ARMS[cell["arm"]]

    def run_cell(self, cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.data import create_dataset

        torch.manual_seed(cell["seed"])
        if cell.get("data_dir"):
            data = create_dataset("cifar10", data_dir=cell["data_dir"])
        else:
            data = create_dataset("digits")
        scheme, options = self.cell_scheme(cell)
        model = dl.create_model(
            "resnet", depth=cell["depth"], scheme=scheme, scheme_options=options,
            in_channels=data.input_shape[0], variant=cell["variant"],
        )  # fmt: skip
        hist = train(
            model,
            data,
            cell,
            weight_decay=cell["weight_decay"],
            scalar_lr_mult=0.1 if scheme == "fixup" else 1.0,
            channels_last=bool(cell.get("channels_last", False)),
        )
        s = hist.summary
        return [
            {
                "test_accuracy": finite(s.get("test_accuracy")),
                "final_train_loss": finite(s.get("final_train_loss")),
                "diverged": bool(hist.diverged),
            }
        ]

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        d = accuracy_or_zero(df)
        lrs = sorted(d["lr"].unique())
        arms = [a for a in ARMS if a in set(d["arm"])]
        fig, ax = plt.subplots(figsize=(max(6.4, 0.7 * len(arms) * len(lrs)), 3.8))
        width = 0.8 / len(lrs)
        for j, lr in enumerate(lrs):
            at = d[d["lr"] == lr]
            st = at.groupby("arm")["acc"].agg(["mean", "min", "max"]).reindex(arms)
            x = [i + (j - (len(lrs) - 1) / 2) * width for i in range(len(arms))]
            ax.bar(x, st["mean"], width, label=f"lr {lr:g}")
            ax.vlines(x, st["min"], st["max"], color="k", lw=1)
            div = at[at["diverged"].astype(bool)].groupby("arm").size().reindex(arms).fillna(0)
            for xi, n in zip(x, div, strict=True):
                if n:
                    ax.text(xi, 0.02, f"{int(n)}×div", ha="center", fontsize=6, rotation=90)
        ax.set_xticks(range(len(arms)), arms, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel(f"test accuracy after {cfg.steps} steps")
        ax.set_title(
            f"{cfg.variant} ResNet-{cfg.depth}; mean and min–max over {len(cfg.seeds)} seeds; "
            "diverged = 0",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        return [save_fig(fig, out_dir / "fixup_ablation.png")]

    def setup(self, cfg: Config) -> str:
        net = "pre-activation (ResNet-V2)" if cfg.variant == "preact" else "post-activation"
        data = "CIFAR-10 3×32×32" if cfg.data_dir else "digits 1×8×8"
        than = "shorter" if cfg.data_dir else "smaller data and shorter"
        return (
            f"{net} conv ResNet-{cfg.depth} (L = {(cfg.depth - 2) // 2} branches), {data}, "
            f"SGD momentum 0.9 wd {cfg.weight_decay:g}, scalars at lr/10, batch "
            f"{cfg.batch_size}, {cfg.steps} steps, lr {', '.join(f'{x:g}' for x in cfg.lrs)}, "
            f"seeds {', '.join(map(str, cfg.seeds))}; {than} than the papers' "
            "(ResNets of 100s–10,000 layers, CIFAR-10/ImageNet, full training)"
        )

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        d = accuracy_or_zero(df)
        lrs = sorted(d["lr"].unique())
        if not lrs:
            return []
        default = lrs[0]

        def acc(arm: str, lr: float) -> dict[int, float]:
            g = d[(d["arm"] == arm) & (d["lr"] == lr)]
            return {int(r.seed): float(r.acc) for r in g.itertuples()}

        def diverged(arm: str, lr: float) -> bool:
            g = d[(d["arm"] == arm) & (d["lr"] == lr)]
            return bool(g["diverged"].astype(bool).any())

        def trains(arm: str, lr: float) -> bool:
            a, ctrl = acc(arm, lr), acc("frozen", lr)
            return bool(a) and bool(ctrl) and not diverged(arm, lr) and every(a, ctrl)

        def show(arm: str, lr: float) -> str:
            a = acc(arm, lr)
            if not a:
                return f"{arm} n/a"
            n = int(d[(d["arm"] == arm) & (d["lr"] == lr)]["diverged"].astype(bool).sum())
            return f"{arm} {spread(a.values())}" + (f" ({n}/{len(a)} diverged)" if n else "")

        setup = self.setup(cfg)
        rows = []
        alone = [a for a in ("only-zero_init", "only-rescale") if acc(a, default)]
        if alone:
            ok = [a for a in alone if trains(a, default)]
            why = [f"{a} does not beat the control without diverging on every seed"
                   for a in alone if a not in ok]  # fmt: skip
            rows.append(
                Claim(
                    claim="Fixup's rule 1 (zero init) or rule 2 (rescale) alone trains a deep "
                    "ResNet-V2 without normalization",
                    paper="component 1 or component 2 alone suffices (SkipInit's article)",
                    paper_setup="deep ResNet-V2 (pre-activation), CIFAR-10",
                    setup=setup,
                    measured=f"lr {default:g}, test accuracy: "
                    + ", ".join(show(a, default) for a in ("fixup", *alone, "frozen")),
                    verdict=verdict(len(ok) == 2, partly=bool(ok)),
                    rule="; ".join(why)
                    + ("" if len(alone) == 2 else "; only one of the two rules was run")
                    or "each alone: no divergence and above the frozen-gate control on every seed",
                )
            )
        if acc("no-rescale", default) and acc("fixup", default):
            found = None  # an lr where Fixup trains and Fixup without the rescale fails
            fixup_trains = False
            for lr in lrs:
                if not trains("fixup", lr):
                    continue
                fixup_trains = True
                fx = acc("fixup", lr)
                fails = diverged("no-rescale", lr) or all(
                    x < fx.get(k, math.nan) - FAIL for k, x in acc("no-rescale", lr).items()
                )
                if fails:
                    found = lr
                    break
            v, why = contrast(fixup_trains, found is not None, "Fixup", "Fixup without rule 2")
            rows.append(
                Claim(
                    claim="Fixup's rule 2 (the L^(-1/(2m-2)) rescale) is necessary: without it "
                    "training fails where Fixup trains",
                    paper="rule 2 needed (Fixup's article)",
                    paper_setup="ResNets without normalization, CIFAR-10, the default lr 0.1",
                    setup=setup,
                    measured="; ".join(
                        f"lr {lr:g}: " + ", ".join(show(a, lr) for a in ("fixup", "no-rescale"))
                        for lr in lrs
                    ),
                    verdict=v,
                    rule=why
                    or f"at lr {found:g} Fixup trains and Fixup without rule 2 diverges or is "
                    f"{FAIL:g} below it on every seed",
                )
            )
        return rows
