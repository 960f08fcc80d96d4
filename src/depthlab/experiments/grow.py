"""``grow``: add layers to a trained ReZero network (Bachlechner et al. 2020, "ReZero is All You
Need: Fast Convergence at Large Depth", arXiv 2003.04887: the technique "also makes it possible
to add new layers to an existing trained network").

A ReZero MLP is trained at the first depth, grown to each further depth by
:func:`depthlab.grow` (new blocks with α = 0 spread evenly between the trained ones), and trained
on — through ``depthlab.train(..., resume=True, grow=(n, "even"))``, the path of
``depthlab train --resume --grow``: the optimizer state of the old parameters is kept, the data
stream continues. Against it, the same final network is trained from scratch for the same
compute, counted in block-steps (Σ depth × steps): ``⌈Σ_k d_k s_k / d_final⌉`` steps.

Two rows: the function is unchanged at each growth (the test loss just after growing equals the
loss just before, to 1e-6 relative) and training then goes on lowering it; and the grown network
against the one trained from scratch at equal compute (which the article does not measure).
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, finite, verdict
from depthlab.experiments.rules import every, mean_sd, spread

#: the largest relative change of the test loss at a growth that counts as "unchanged" (float32
#: evaluation of the same function; inserting x + 0 changes nothing, so this is generous)
SAME = 1e-6


@dataclass(frozen=True)
class Config:
    depths: tuple[int, ...] = (8, 32, 128)  # blocks at each stage (increasing)
    stage_steps: tuple[int, ...] = (200, 100, 100)  # steps trained at each stage
    width: int = 64
    batch_size: int = 64
    optimizer: str = "adam"
    lr: float = 0.001
    eval_every: int = 50
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N


@EXPERIMENTS.register()
class Grow(Experiment):
    name = "grow"
    title = "growing a trained ReZero network: unchanged function, then vs training from scratch"
    paper = "Bachlechner et al. 2020, arXiv 2003.04887 (adding layers to a trained network)"
    zero_ok = ("seeds",)
    choices = {"optimizer": ("adam", "adamw", "sgd", "adagrad")}
    columns = ("arm", "seed", "stage", "depth", "step", "compute", "test_loss", "test_accuracy")
    Config = Config
    presets = {
        "smoke": Config(
            depths=(2, 6), stage_steps=(20, 10), width=16, eval_every=10, seeds=(0, 1)
        ),  # fmt: skip
        "quick": Config(),
        # grown to 1,024 blocks (8 → 128 → 1,024), against 1,024 blocks from scratch
        "deep": Config(depths=(8, 128, 1024), seeds=(0, 1)),
        "full": Config(
            depths=(32, 128, 512, 2048),
            stage_steps=(1000, 500, 500, 500),
            width=256,
            eval_every=100,
            seeds=(0, 1, 2, 3, 4),
        ),  # fmt: skip
    }

    def check(self, cfg: Config) -> None:
        from depthlab.registry import DepthlabError

        if len(cfg.depths) < 2 or len(cfg.depths) != len(cfg.stage_steps):
            raise DepthlabError(
                "grow: depths needs at least two stages and one stage_steps value per depth, got "
                f"depths={list(cfg.depths)}, stage_steps={list(cfg.stage_steps)}"
            )
        if any(b <= a for a, b in zip(cfg.depths, cfg.depths[1:], strict=False)):
            raise DepthlabError(f"grow: depths must increase, got {list(cfg.depths)}")
        if any(s % cfg.eval_every for s in cfg.stage_steps):
            raise DepthlabError(
                f"grow: every stage_steps value must be a multiple of eval_every={cfg.eval_every} "
                "(the loss is measured at each growth)"
            )

    def cells(self, cfg: Config) -> list[dict]:
        base = {
            "depths": ",".join(map(str, cfg.depths)),
            "stage_steps": ",".join(map(str, cfg.stage_steps)),
            "depth": max(cfg.depths), "width": cfg.width, "batch_size": cfg.batch_size,
            "optimizer": cfg.optimizer, "lr": cfg.lr, "eval_every": cfg.eval_every,
        }  # fmt: skip
        return [{"arm": a, **base, "seed": s} for s in cfg.seeds for a in ("grown", "scratch")]

    def cell_model(self, cell: dict) -> tuple[str, dict, int]:
        return "mlp", {"depth": cell["depth"], "width": cell["width"]}, cell["batch_size"]

    def run_cell(self, cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.data import create_dataset
        from depthlab.train import TrainConfig

        depths = [int(d) for d in cell["depths"].split(",")]
        steps = [int(s) for s in cell["stage_steps"].split(",")]
        compute = sum(d * s for d, s in zip(depths, steps, strict=True))
        data = create_dataset("digits")
        torch.manual_seed(cell["seed"])
        kw = dict(
            batch_size=cell["batch_size"], optimizer=cell["optimizer"], lr=cell["lr"],
            eval_every=cell["eval_every"], seed=cell["seed"], device=cell.get("device", "cpu"),
            divergence_factor=None,
        )  # fmt: skip
        out: list[dict] = []

        def collect(hist, stage: int, depth: int, first: int, done: int) -> None:
            for r in hist.records:
                if r.get("eval") and first <= r["step"]:
                    out.append({
                        "stage": stage, "depth": depth, "step": int(r["step"]),
                        "compute": done + depth * (int(r["step"]) - first),
                        "test_loss": finite(r.get("test_loss")),
                        "test_accuracy": finite(r.get("test_accuracy")),
                    })  # fmt: skip

        if cell["arm"] == "scratch":
            n = math.ceil(compute / depths[-1])
            model = dl.create_model("mlp", depth=depths[-1], width=cell["width"], scheme="rezero")
            hist = dl.train(model, data, TrainConfig(steps=n, **kw), quiet=True)
            collect(hist, 0, depths[-1], 0, 0)
            return out
        model = dl.create_model("mlp", depth=depths[0], width=cell["width"], scheme="rezero")
        with tempfile.TemporaryDirectory(prefix="depthlab-grow-") as tmp:
            total, done = 0, 0
            for k, (d, s) in enumerate(zip(depths, steps, strict=True)):
                grow = None if k == 0 else (d - depths[k - 1], "even")
                first, total = total, total + s
                cfg = TrainConfig(steps=total, checkpoint_every=0, **kw)
                hist = dl.train(model, data, cfg, out_dir=Path(tmp), quiet=True,
                                resume=k > 0, grow=grow)  # fmt: skip
                if k:  # the growth step: its first eval is the grown model at the same step
                    before = out[-1]
                    after = next(r for r in hist.records if r.get("eval") and r["step"] == first)
                    out.append({**before, "stage": k, "depth": d, "kind": "grown",
                                "test_loss": finite(after.get("test_loss")),
                                "test_accuracy": finite(after.get("test_accuracy"))})  # fmt: skip
                    before["kind"] = "before"
                collect(hist, k, d, first + (1 if k else 0), done)
                done += d * s
        return out

    # -- figures and claims ---------------------------------------------------------------
    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for arm, g in df.groupby("arm"):
            st = g.groupby("compute")
            for ax, col in zip(axes, ("test_loss", "test_accuracy"), strict=True):
                m = st[col].mean()
                (line,) = ax.plot(m.index, m, marker="." if arm == "grown" else None, label=arm)
                ax.fill_between(m.index, st[col].min(), st[col].max(), alpha=0.2,
                                color=line.get_color())  # fmt: skip
        done = 0
        for d, s in zip(cfg.depths[:-1], cfg.stage_steps[:-1], strict=False):
            done += d * s
            for ax in axes:
                ax.axvline(done, color="k", lw=0.5, ls=":")
        for ax, lab in zip(axes, ("test loss", "test accuracy"), strict=True):
            ax.set_xlabel("compute (block-steps)")
            ax.set_ylabel(lab)
            ax.legend(fontsize=7)
        axes[0].set_yscale("log")
        fig.suptitle(
            f"ReZero MLP grown {' → '.join(map(str, cfg.depths))} blocks vs {cfg.depths[-1]} "
            "from scratch (mean, min–max over seeds; dotted: growths)", fontsize=8,
        )  # fmt: skip
        return [save_fig(fig, out_dir / "grow.png")]

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        if not len(df) or "arm" not in df or not {"grown", "scratch"} <= set(df["arm"]):
            return []
        g = df[df["arm"] == "grown"]
        seeds = sorted(set(df["seed"].astype(int)))
        kind = g["kind"] if "kind" in g else pd.Series(index=g.index, dtype=object)
        before = g[kind == "before"]
        after = g[kind == "grown"]
        change: dict[int, float] = {}
        keeps_training: dict[int, bool] = {}
        for seed in seeds:
            b = before[before["seed"] == seed].sort_values("stage")
            a = after[after["seed"] == seed].sort_values("stage")
            if not len(a) or len(a) != len(b):
                continue
            rel = (a["test_loss"].to_numpy() - b["test_loss"].to_numpy()) / b[
                "test_loss"
            ].to_numpy()
            change[seed] = float(max(abs(rel)))
            ok = True
            for r in a.itertuples():  # the loss at the end of the stage begun by this growth
                stage = g[(g["seed"] == seed) & (g["stage"] == r.stage)]
                ok = ok and float(stage.sort_values("step")["test_loss"].iloc[-1]) < r.test_loss
            keeps_training[seed] = ok
        unchanged = len(change) == len(seeds) and all(v <= SAME for v in change.values())
        trains = len(keeps_training) == len(seeds) and all(keeps_training.values())
        setup = (
            f"ReZero MLP width {cfg.width}, digits, {cfg.optimizer} lr {cfg.lr:g}, batch "
            f"{cfg.batch_size}; grown {' → '.join(map(str, cfg.depths))} blocks (new blocks "
            f"spread evenly) after {' + '.join(map(str, cfg.stage_steps))} steps; seeds "
            f"{', '.join(map(str, seeds))}"
        )
        why = []
        if not unchanged:
            why.append(f"the test loss moved by more than {SAME:g} (relative) at a growth")
        if not trains:
            why.append("training after a growth did not lower the test loss on every seed")
        rows = [
            Claim(
                claim="New α = 0 layers added to a trained ReZero network leave its function "
                "unchanged, and training continues",
                paper="possible (stated, no figure)",
                paper_setup="ReZero networks (no experiment reported)",
                setup=setup,
                measured=f"largest relative test-loss change at a growth: "
                f"{spread(change.values())}; loss lowered after every growth on "
                f"{sum(keeps_training.values())}/{len(seeds)} seeds",
                verdict=verdict(unchanged and trains, partly=unchanged),
                rule="; ".join(why)
                or f"unchanged to {SAME:g} at every growth, lower after every stage, every seed",
            )
        ]

        def final(arm: str, col: str) -> dict[int, float]:
            a = df[df["arm"] == arm].sort_values("compute")
            return {int(s): float(x[col].iloc[-1]) for s, x in a.groupby("seed")}

        grown, scratch = final("grown", "test_loss"), final("scratch", "test_loss")
        better = every({k: -v for k, v in grown.items()}, {k: -v for k, v in scratch.items()})
        m, _ = mean_sd(scratch[k] - grown[k] for k in grown if k in scratch)
        acc_g, acc_s = final("grown", "test_accuracy"), final("scratch", "test_accuracy")
        rows.append(
            Claim(
                claim="A network grown from a trained shallow one reaches a lower test loss than "
                "the same network trained from scratch with the same compute",
                paper="not measured in the article (our comparison)",
                paper_setup="—",
                setup=setup + f"; scratch: {cfg.depths[-1]} blocks for the same block-steps",
                measured=f"final test loss grown {spread(grown.values())} vs scratch "
                f"{spread(scratch.values())}; accuracy {spread(acc_g.values())} vs "
                f"{spread(acc_s.values())}",
                verdict=verdict(better, partly=m > 0),
                rule="" if better else "the grown net's final test loss is not lower on every seed",
            )
        )
        return rows
