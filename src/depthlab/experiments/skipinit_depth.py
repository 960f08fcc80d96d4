"""``skipinit-depth``: SkipInit's Tables 1–2 — n-2 Wide-ResNets from 16 to 1,000 layers.

De & Smith 2020, "Batch Normalization Biases Residual Blocks Towards the Identity Function in
Deep Networks" (arXiv 2002.10444): **Table 1** trains pre-activation n-2 Wide-ResNets (Zagoruyko
& Komodakis 2016, arXiv 1605.07146: 16 stem channels, then 32/64/128 = 16k/32k/64k with k = 2,
1×1 projection shortcuts, depth n = 6N+4 counted as WRN counts it) of depth 16 to 1,000 with
BatchNorm, and without normalization when each residual branch ends in a scalar α initialised
to 0 (SkipInit, biases in the convolutions); both train at 1,000 layers. **Table 2**: without
normalization, α = 1 (``plain``) and rescaling each merge by 1/√2 (``scaled``) do not train at
depth.

The arms are depth-sweep's (:mod:`depthlab.experiments.depth_sweep`) on the Wide-ResNet:
``batchnorm``, ``skipinit``, ``plain``, ``scaled`` and the control ``frozen`` (SkipInit's net with
its gates fixed at 0: stem, projection shortcuts and classifier only — a scheme "trains at
depth" only where it beats it), every arm at the same fixed budget and recipe (SGD momentum 0.9,
weight decay 5e-4, batch 64, no clipping, no warm-up) and each at its best learning rate of a
grid fixed in advance (``lrs``, default 0.01, 0.03, 0.1: the best test accuracy over the grid,
per arm, depth and seed; a diverged run counts 0), as the paper compares each net at its best
learning rate. The claims and their rules are depth-sweep's on those best runs, judged at the
deepest depth (``judge_depths`` for more); the measured column names the lr chosen per seed.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from depthlab.experiments import depth_sweep
from depthlab.experiments.base import EXPERIMENTS
from depthlab.experiments.rules import accuracy_or_zero
from depthlab.registry import DepthlabError

#: SkipInit's Table 1–2 arms (the control last)
ARMS = ("batchnorm", "skipinit", "plain", "scaled", "frozen")
#: CIFAR-10's training split (examples), for the setup's epoch count
CIFAR_TRAIN = 50_000
VARIANT_NAMES = {"preact": "pre-activation", "postact": "post-activation"}


@dataclass(frozen=True)
class Config(depth_sweep.Config):
    schemes: tuple[str, ...] = ARMS
    depths: tuple[int, ...] = (16, 40, 100)  # Wide-ResNet depth n = 6N+4
    width: int = 2  # the widening factor k of an n-k Wide-ResNet
    variant: str = "preact"  # SkipInit's pre-activation net
    steps: int = 100
    #: constant | step (× step_gamma at the milestones, fractions of the run) | cosine
    schedule: str = "constant"
    milestones: tuple[float, ...] = (0.3, 0.6, 0.8)
    step_gamma: float = 0.2
    #: a learning-rate grid, fixed in advance: every arm × depth × seed runs each, and its best
    #: test accuracy over the grid is judged (the paper reports each net at its best lr);
    #: empty: ``lr`` alone
    lrs: tuple[float, ...] = (0.01, 0.03, 0.1)


@EXPERIMENTS.register()
class SkipInitDepth(depth_sweep.DepthSweep):
    name = "skipinit-depth"
    title = "SkipInit Tables 1–2: n-2 Wide-ResNets to 1,000 layers, BN vs α = 0 vs α = 1 vs 1/√2"
    paper = "De & Smith 2020, arXiv 2002.10444, Tables 1–2"
    version = 1
    choices = {
        **depth_sweep.DepthSweep.choices,
        "variant": ("preact", "postact"),
        "schedule": ("constant", "step", "cosine"),
    }
    Config = Config
    empty_ok = (*depth_sweep.DepthSweep.empty_ok, "lrs")
    presets = {
        "smoke": Config(depths=(16, 28), steps=20, seeds=(0, 1), lrs=(0.03, 0.1)),
        "quick": Config(),
        # Table 1's depths (16, 100, 1,000) at k = 2, every arm, two digits epochs (45 steps
        # of 64), each arm at its best lr of the grid
        "deep": Config(depths=(16, 100, 1000), steps=45, seeds=(0, 1)),
        # the paper's data and length: CIFAR-10, 200 epochs at batch 64 (156,250 steps); the
        # step schedule of the Wide-ResNet paper (lr × 0.2 at 30%, 60% and 80% of the run)
        "full": Config(
            depths=(16, 100, 1000),
            steps=200 * CIFAR_TRAIN // 64,
            schedule="step",
        ),
    }

    def check(self, cfg: Config) -> None:
        bad = [d for d in cfg.depths if not isinstance(d, int) or d < 10 or d % 6 != 4]
        if bad:
            raise DepthlabError(
                f"depths {bad}: a Wide-ResNet depth is n = 6N+4 with N ≥ 1 (e.g. 16, 28, 40, "
                "100, 1000); for the CIFAR ResNets' 6n+2 use depth-sweep"
            )
        if any(not x > 0 for x in cfg.lrs):
            raise DepthlabError(f"lrs must be positive learning rates, got {list(cfg.lrs)}")
        if not 0 < cfg.step_gamma <= 1:
            raise DepthlabError(f"step_gamma must be in (0, 1], got {cfg.step_gamma}")
        if any(not 0 < m < 1 for m in cfg.milestones) or list(cfg.milestones) != sorted(
            cfg.milestones
        ):
            raise DepthlabError(
                f"milestones must be increasing fractions of the run in (0, 1), got "
                f"{list(cfg.milestones)}"
            )
        super().check(cfg)

    def _all_cells(self, cfg: Config) -> list[dict]:
        cells = super()._all_cells(cfg)
        if cfg.lrs:
            cells = [{**c, "lr": lr} for c in cells for lr in cfg.lrs]
        if cfg.schedule == "constant":
            return cells
        extra = {"schedule": cfg.schedule}
        if cfg.schedule == "step":
            extra |= {"milestones": list(cfg.milestones), "step_gamma": cfg.step_gamma}
        return [{**c, **extra} for c in cells]

    @staticmethod
    def best(df: pd.DataFrame) -> pd.DataFrame:
        """One row per arm × network × depth × seed: the run of the lr grid with the best test
        accuracy (diverged = 0; the smallest lr on a tie)."""
        d = accuracy_or_zero(df)
        if "variant" not in d.columns:
            d["variant"] = "preact"
        if "lr" not in d.columns:
            return d
        d = d.sort_values(["scheme", "variant", "depth", "seed", "lr"])
        idx = d.groupby(["scheme", "variant", "depth", "seed"], sort=False)["acc"].idxmax()
        return d.loc[idx].reset_index(drop=True)

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        return super().figures(self.best(df), cfg, out_dir)

    def claims(self, df: pd.DataFrame, cfg: Config) -> list:
        return super().claims(self.best(df), cfg)

    def _claims_at(self, at: pd.DataFrame, cfg: Config, depth: int) -> list:
        """depth-sweep's claims on the best runs at ``depth``, each naming the lr chosen per arm
        and seed where a grid was run."""
        claims = super()._claims_at(at, cfg, depth)
        if len(cfg.lrs) < 2 or "lr" not in at.columns:
            return claims
        chosen = "; ".join(
            f"{s} " + "/".join(f"{x:g}" for x in g.sort_values("seed")["lr"])
            for s, g in at.groupby("scheme", sort=False)
        )
        grid = ", ".join(f"{x:g}" for x in cfg.lrs)
        return [
            replace(c, measured=f"{c.measured}; best lr of {grid} per seed: {chosen}")
            for c in claims
        ]

    def setup(self, cfg: Config, depth: int) -> str:
        data, n = ("CIFAR-10", CIFAR_TRAIN) if cfg.data_dir else ("digits 1×8×8", 0)
        epochs = cfg.steps * cfg.batch_size / (n or depth_sweep.DIGITS_TRAIN)
        k = cfg.width
        schedule = {
            "constant": "constant lr",
            "cosine": "cosine schedule",
            "step": f"lr × {cfg.step_gamma:g} at "
            + "/".join(f"{m:.0%}" for m in cfg.milestones)
            + " of the run",
        }[cfg.schedule]
        lr = (
            f"lr grid {', '.join(f'{x:g}' for x in cfg.lrs)} (each arm at its best)"
            if cfg.lrs
            else f"lr {cfg.lr:g}"
        )
        smaller = "" if cfg.data_dir and epochs >= 200 else "; smaller data and budget than"
        return (
            f"{VARIANT_NAMES[cfg.variant]} n-{k} Wide-ResNets (1×1 projection shortcuts; "
            f"16/{16 * k}/{32 * k}/{64 * k} channels), n = {', '.join(map(str, cfg.depths))} "
            f"(judged at {depth}), {data}, SGD {lr} momentum 0.9 wd "
            f"{cfg.weight_decay:g} batch {cfg.batch_size}, {schedule}, "
            f"{'no clipping' if not cfg.grad_clip else f'clip {cfg.grad_clip:g}'}, "
            f"{cfg.steps} steps ({epochs:.3g} epochs), seeds {', '.join(map(str, cfg.seeds))}"
            + (
                f"{smaller} the paper's (n-2, 16–1,000 layers, CIFAR-10, 200 epochs, batch 64)"
                if smaller
                else "; the paper's data and length"
            )
        )
