"""``depth-sweep``: which residual schemes train at depth without normalization.

SkipInit (De & Smith 2020, arXiv 2002.10444, Tables 1–2): ``x + α f(x)`` with α = 0 trains
1,000-layer residual networks like BatchNorm does, while α = 1 (``plain``) and the
variance-preserving ``(x + f(x))/√2`` (``scaled``) fail at depth. Fixup (Zhang et al. 2019,
arXiv 1901.09321, Fig. 3) trains 10,000-layer ResNets as well as BN at the default learning rate.

Here every scheme × depth × seed trains a **convolutional** CIFAR ResNet (basic blocks, m = 2
weight layers per branch, so Fixup's L^(-1/(2m-2)) rescale applies), each claim on its paper's
network (``variant="paper"``, the default):

* Fixup on the **post-activation** ResNet of its Fig. 3 and reference code (He et al. 2015,
  arXiv 1512.03385: σ after each sum, option-A shortcuts, fan-out He init, every reference
  scalar); its BN baseline there is the reference's BN ResNet, whose last BN of every branch
  starts at γ = 0 (``zero_init_residual``);
* SkipInit, α = 1 (``plain``), ``scaled`` and ReZero on the **pre-activation** ResNet of
  SkipInit's paper (He et al. 2016, arXiv 1603.05027);
* BatchNorm and the control on both, so that every arm is compared with BN and the control on
  its own network.

``variant="postact"`` or ``"preact"`` runs every scheme on that one network instead. Data: the
digits images (1×8×8; CIFAR-10 with ``data_dir``), a fixed budget with one recipe, Fixup's:
SGD lr 0.1, momentum 0.9, weight decay 5e-4, no gradient clipping and no warm-up (neither paper
used them); Fixup's scalars at lr/10 as in its reference code. The schemes are run as in their
papers:

* ``skipinit``: no normalization, biases, α = 0 learnable;
* ``fixup``: the three Fixup rules;
* ``rezero``: ReZero's ResNet, which keeps BatchNorm in the branches and gates them by α = 0
  (``branch_norm="batchnorm"``) — so it is not the SkipInit block again;
* ``frozen`` (the control): the SkipInit network with its gates fixed at 0, i.e. the stem and the
  classifier only. A scheme "trains at depth" only where it beats this control: otherwise its
  depth is unused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import pandas as pd

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, finite, train, verdict
from depthlab.experiments.rules import accuracy_or_zero, contrast, every, spread
from depthlab.registry import DepthlabError

SCHEMES = ("batchnorm", "skipinit", "fixup", "rezero", "frozen", "plain", "scaled")
#: the normalization-free schemes of the "keep up with BN" claim
FREE = ("skipinit", "fixup")
BAD = ("plain", "scaled")
#: scheme label -> (registered scheme, options)
BUILD = {
    "batchnorm": ("batchnorm", {}),
    "skipinit": ("skipinit", {}),
    "fixup": ("fixup", {}),
    "rezero": ("rezero", {"branch_norm": "batchnorm"}),
    "frozen": ("skipinit", {"learnable": False}),
    "plain": ("plain", {}),
    "scaled": ("scaled", {}),
    "noskip": ("noskip", {}),
    # not in the claims; arms to run beside them (``--set schemes=...``)
    "nf": ("nf", {}),
    "admin": ("admin", {}),
}
#: the network of each variant, as the setup column names it
NETS = {
    "postact": "post-activation conv ResNet (He et al. 2015, option-A shortcuts; Fixup's "
    "reference network)",
    "preact": "pre-activation conv ResNet (He et al. 2016, projection shortcuts; SkipInit's)",
}
#: extra scheme options on the post-activation net: its BN ResNet is the reference code's, with
#: γ = 0 in the last BN of every branch (Goyal et al. 2017)
POSTACT_OPTIONS = {"batchnorm": {"zero_init_residual": True}}
#: variant="paper": the networks each scheme runs on (its paper's; BN and the control on both)
PAPER_VARIANTS = {"fixup": ("postact",), "batchnorm": ("preact", "postact")}
PAPER_VARIANTS["frozen"] = PAPER_VARIANTS["batchnorm"]


def variants_of(scheme: str, variant: str) -> tuple[str, ...]:
    """The networks ``scheme`` runs on under the config's ``variant``."""
    if variant != "paper":
        return (variant,)
    return PAPER_VARIANTS.get(scheme, ("preact",))


#: learning-rate schedule keys a cell may carry (skipinit-depth's), passed to the training run
SCHEDULE_KEYS = ("schedule", "milestones", "step_gamma")
#: the digits training split (examples), for the setup's epoch count
DIGITS_TRAIN = 1438
#: "as well as BN": within this many accuracy points of BN on every seed
KEEP_UP = 0.05
#: "fails": diverged, or this far below BN on every seed
FAIL = 0.10


@dataclass(frozen=True)
class Config:
    schemes: tuple[str, ...] = SCHEMES
    depths: tuple[int, ...] = (8, 20, 56)  # CIFAR ResNet depth 6n+2
    width: int = 1  # channel multiplier k (16k, 32k, 64k channels)
    #: paper: each scheme on its paper's network (Fixup post-activation, the others
    #: pre-activation; BN and the control on both); postact | preact: all on that one
    variant: str = "paper"
    steps: int = 100  # training budget (SGD steps; ≈ 4.5 epochs of digits at batch 64)
    batch_size: int = 64
    lr: float = 0.1  # Fixup's default (its Fig. 3 uses the BN learning rate)
    weight_decay: float = 5e-4
    grad_clip: float = 0.0  # 0: off (neither paper clipped)
    data_dir: str = ""  # a CIFAR-10 python folder: CIFAR-10 (3×32×32) instead of digits
    #: the arms run at the deepest depth ("scheme" or "scheme:variant"; empty: every arm), so
    #: that a 10,000-layer row can hold only the arms of the claim made there
    top_schemes: tuple[str, ...] = ()
    #: the depths the claims are judged at (empty: the deepest)
    judge_depths: tuple[int, ...] = ()
    #: NHWC convolutions (faster on a CPU; the same function, float rounding may differ)
    channels_last: bool = True
    checkpointing: int = 0  # activation checkpointing segments of each net's blocks (0: off)
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N


@EXPERIMENTS.register()
class DepthSweep(Experiment):
    name = "depth-sweep"
    title = "accuracy after a fixed budget: conv ResNets × schemes × depth, vs BN and a control"
    paper = (
        "De & Smith 2020, arXiv 2002.10444, Tables 1–2; Zhang et al. 2019, arXiv 1901.09321, Fig. 3"
    )
    columns = (
        "scheme", "variant", "depth", "seed", "test_accuracy", "final_train_loss", "diverged",
        "diverged_step", "wall_time_s",
    )  # fmt: skip
    version = 4
    choices = {"schemes": tuple(BUILD), "variant": ("paper", "postact", "preact")}
    zero_ok = ("grad_clip", "seeds", "weight_decay", "checkpointing")
    empty_ok = ("top_schemes", "judge_depths")
    Config = Config
    needs = {"full": ("data_dir",)}
    presets = {
        "smoke": Config(
            schemes=("batchnorm", "skipinit", "frozen", "plain"),
            depths=(8, 14),
            steps=30,
            seeds=(0, 1),
        ),
        "quick": Config(),
        # Fixup's Fig. 3 protocol at its depths (≈ 10, 100, 1,000, 10,000 layers), one epoch of
        # digits (22 steps of 64) at the default lr 0.1; every arm to 1,004 layers (SkipInit's
        # depth), BN, Fixup and the control (all post-activation, Fig. 3's net) at 10,004
        "deep": Config(
            depths=(14, 110, 1004, 10_004),
            steps=22,
            top_schemes=("batchnorm:postact", "fixup", "frozen:postact"),
            judge_depths=(1004, 10_004),
            seeds=(0, 1),
        ),  # fmt: skip
        # Fixup's Fig. 3 on CIFAR-10: ≈ 10 to 10,000 layers, one epoch (390 steps of 128) at
        # the default lr 0.1, every arm at every depth
        "full": Config(
            depths=(14, 110, 1004, 10_004),
            steps=390,
            batch_size=128,
            judge_depths=(1004, 10_004),
            checkpointing=100,
        ),
    }

    def check(self, cfg: Config) -> None:
        from depthlab.models.resnet import check_resnet_depth

        for d in cfg.depths:
            check_resnet_depth(d, "depths")
        if cfg.data_dir:
            from depthlab.data.cifar10 import find_folder

            find_folder(cfg.data_dir)
        arms = {f"{s}:{v}" for s in BUILD for v in NETS} | set(BUILD)
        bad = [x for x in cfg.top_schemes if x not in arms]
        if bad:
            raise DepthlabError(
                f"top_schemes: unknown arm(s) {', '.join(bad)}; use a scheme name "
                f"({', '.join(BUILD)}) or scheme:variant (variant: {', '.join(NETS)})"
            )
        if not self.cells(cfg):
            raise DepthlabError("no cell left: top_schemes keeps none of the schemes run")
        missing = [x for x in cfg.judge_depths if x not in cfg.depths]
        if missing:
            raise DepthlabError(
                f"judge_depths {missing} are not among depths {list(cfg.depths)}; judge at "
                "depths that are run"
            )

    def cells(self, cfg: Config) -> list[dict]:
        top = max(cfg.depths)
        return [c for c in self._all_cells(cfg) if c["depth"] < top or _on_top(c, cfg.top_schemes)]

    def _all_cells(self, cfg: Config) -> list[dict]:
        return [
            {
                "scheme": s,
                "depth": d,
                "width": cfg.width,
                "variant": v,
                "steps": cfg.steps,
                "batch_size": cfg.batch_size,
                "lr": cfg.lr,
                "weight_decay": cfg.weight_decay,
                "grad_clip": cfg.grad_clip,
                "data_dir": cfg.data_dir,
                "channels_last": cfg.channels_last,
                **({"checkpointing": cfg.checkpointing} if cfg.checkpointing else {}),
                "seed": seed,
            }  # fmt: skip
            for d in cfg.depths
            for seed in cfg.seeds
            for s in cfg.schemes
            for v in variants_of(s, cfg.variant)
        ]

    def cell_model(self, cell: dict) -> tuple[str, dict, int, tuple[int, ...]]:
        kwargs = {"depth": cell["depth"], "width": cell["width"], "variant": cell["variant"]}
        shape = (3, 32, 32) if cell["data_dir"] else (1, 8, 8)
        batch = cell["batch_size"]
        segments = int(cell.get("checkpointing", 0))
        if segments:  # activations kept: 1/s of the blocks at a time and the s segment inputs
            blocks = max(1, (cell["depth"] - 2) // 2)
            batch = max(1, math.ceil(batch * min(1.0, 1 / segments + segments / blocks)))
        return "resnet", {**kwargs, "in_channels": shape[0]}, batch, shape

    def cell_scheme(self, cell: dict) -> tuple[str, dict]:
        scheme, options = BUILD[cell["scheme"]]
        if cell["variant"] == "postact":
            options = {**options, **POSTACT_OPTIONS.get(cell["scheme"], {})}
        return scheme, options

    def run_cell(self, cell: dict) -> list[dict]:
        import torch

        import depthlab as dl
        from depthlab.data import create_dataset

        torch.manual_seed(cell["seed"])
        if cell["data_dir"]:
            data = create_dataset("cifar10", data_dir=cell["data_dir"])
        else:
            data = create_dataset("digits")
        scheme, options = self.cell_scheme(cell)
        model = dl.create_model(
            "resnet", depth=cell["depth"], width=cell["width"], scheme=scheme,
            scheme_options=options or None, in_channels=data.input_shape[0],
            variant=cell["variant"],
        )  # fmt: skip
        hist = train(
            model,
            data,
            cell,
            weight_decay=cell["weight_decay"],
            grad_clip=cell["grad_clip"] or None,
            scalar_lr_mult=0.1 if scheme == "fixup" else 1.0,
            channels_last=bool(cell.get("channels_last", False)),
            checkpointing=int(cell.get("checkpointing", 0)),
            **{k: cell[k] for k in SCHEDULE_KEYS if k in cell},
        )
        s = hist.summary
        return [
            {
                "test_accuracy": finite(s.get("test_accuracy")),
                "final_train_loss": finite(s.get("final_train_loss")),
                "diverged": bool(hist.diverged),
                "diverged_step": hist.diverged_step if hist.diverged_step is not None else -1,
                "wall_time_s": finite(s.get("wall_time_s")),
            }
        ]

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        d = accuracy_or_zero(df)
        fig, ax = plt.subplots(figsize=(6.4, 4))
        markers = dict(zip(BUILD, "osD^v*Px", strict=False))
        both = d["variant"].nunique() > 1
        groups = d.groupby(["scheme", "variant"], sort=False)
        for k, ((s, v), g) in enumerate(groups):
            st = g.groupby("depth")["acc"].agg(["mean", "min", "max"]).sort_index()
            x = st.index.to_numpy() * (1 + 0.03 * (k - 3))  # offset so equal lines stay visible
            label = s + (f" ({v})" if both else "")
            (line,) = ax.plot(
                x, st["mean"], marker=markers.get(s, "o"),
                ls="--" if s == "frozen" else (":" if both and v == "postact" else "-"),
                label=label + (" (control: gates fixed at 0)" if s == "frozen" else ""),
            )  # fmt: skip
            ax.vlines(x, st["min"], st["max"], color=line.get_color(), lw=1)
            div = g[g["diverged"].astype(bool)].groupby("depth").size()
            if len(div):
                ax.plot(
                    div.index.to_numpy() * (1 + 0.03 * (k - 3)), [0.0] * len(div), "x",
                    color=line.get_color(), ms=10,
                )  # fmt: skip
        ax.set_xscale("log")
        depths = sorted(set(d["depth"]))
        ax.set_xticks(depths, [str(x) for x in depths])
        ax.minorticks_off()
        ax.set_xlabel("depth (ResNet layers, 6n+2)")
        ax.set_ylabel(f"test accuracy after {cfg.steps} steps")
        ax.set_title(
            f"mean and min–max over {len(cfg.seeds)} seeds; × = a diverged seed", fontsize=9
        )
        ax.legend(fontsize=7)
        return [save_fig(fig, out_dir / "depth_sweep.png")]

    def setup(self, cfg: Config, depth: int) -> str:
        data = "CIFAR-10" if cfg.data_dir else "digits 1×8×8"
        epochs = cfg.steps * cfg.batch_size / (50_000 if cfg.data_dir else DIGITS_TRAIN)
        top = max(cfg.depths)
        arms = f"; at depth {top} only {', '.join(cfg.top_schemes)}" if cfg.top_schemes else ""
        than = "smaller data and budget than" if top >= 10_000 else "smaller than"
        if cfg.variant == "paper":
            net = (
                "conv ResNets with basic blocks: Fixup on the post-activation net of its "
                "reference code (option-A shortcuts; its BN with γ = 0 in each branch's last BN, "
                "as the reference), the others on SkipInit's pre-activation net, BN and the "
                "control on both"
            )
        else:
            net = NETS[cfg.variant] + ", every scheme"
        return (
            f"{net}; depths {', '.join(map(str, cfg.depths))} "
            f"(judged at {depth}), {16 * cfg.width}/{32 * cfg.width}/{64 * cfg.width} channels, "
            f"{data}, SGD lr {cfg.lr:g} momentum 0.9 wd {cfg.weight_decay:g} batch "
            f"{cfg.batch_size}, {'no clipping' if not cfg.grad_clip else f'clip {cfg.grad_clip:g}'}"
            f", {cfg.steps} steps ({epochs:.2g} epochs), seeds {', '.join(map(str, cfg.seeds))}"
            f"{arms}; {than} the papers' (1,000 / 10,000 layers, CIFAR-10, 200 epochs / 1 epoch)"
        )

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        """The claims at each of ``judge_depths`` (default: the deepest depth run)."""
        d = accuracy_or_zero(df)
        if "variant" not in d.columns:
            d["variant"] = "preact"
        depths = [x for x in cfg.judge_depths if (d["depth"] == x).any()]
        out = []
        for depth in depths or [int(d["depth"].max())]:
            rows = self._claims_at(d[d["depth"] == depth], cfg, int(depth))
            if len(depths) > 1:  # several judged depths: each row says which
                rows = [replace(c, claim=f"{c.claim} (at {depth:,} layers)") for c in rows]
            out += rows
        return out

    def _claims_at(self, at: pd.DataFrame, cfg: Config, depth: int) -> list[Claim]:

        def net(s: str) -> str:
            """The network ``s`` ran on (its first, where it ran on both)."""
            vs = [
                v
                for v in ("preact", "postact")
                if ((at["scheme"] == s) & (at["variant"] == v)).any()
            ]
            return vs[0] if vs else "preact"

        def rows(s: str, v: str) -> pd.DataFrame:
            return at[(at["scheme"] == s) & (at["variant"] == v)]

        def acc(s: str, v: str | None = None) -> dict[int, float]:
            g = rows(s, v or net(s))
            return {int(r.seed): float(r.acc) for r in g.itertuples()}

        def show(s: str, v: str | None = None) -> str:
            v = v or net(s)
            a = acc(s, v)
            both = at[at["scheme"] == s]["variant"].nunique() > 1
            label = s + (f" ({v})" if both or s in ("batchnorm", "frozen") else "")
            if not a:
                return f"{label} n/a"
            n = int(rows(s, v)["diverged"].astype(bool).sum())
            return f"{label} {spread(a.values())}" + (f" ({n}/{len(a)} diverged)" if n else "")

        setup = self.setup(cfg, depth)
        out = []
        bad = [s for s in BAD if acc(s)]
        if bad:
            out.append(self._fail_claim(cfg, depth, setup, bad, acc, net, show))
        free = [s for s in FREE if acc(s)]
        if free:
            out.append(self._keep_up_claim(cfg, depth, setup, free, acc, net, show))
        rz_net = net("rezero")
        rz = {k: float(v) for k, v in _loss(rows("rezero", rz_net)).items()}
        if rz:
            bnl = _loss(rows("batchnorm", rz_net))
            faster = every({k: -v for k, v in rz.items()}, {k: -v for k, v in bnl.items()})
            out.append(
                Claim(
                    claim="ReZero's gates (α = 0 on a BN ResNet) converge faster than the BN "
                    "ResNet",
                    paper="ResNet-56 converges 32% faster with ReZero",
                    paper_setup="ResNet-56, CIFAR-10",
                    setup=setup,
                    measured=f"depth {depth}, final training loss: ReZero "
                    f"{spread(rz.values())}, BN {spread(bnl.values())}",
                    verdict=verdict(faster),
                    rule="" if faster else "ReZero's training loss is not below BN's on every seed",
                )
            )
        return out

    @staticmethod
    def _fail_claim(cfg, depth, setup, bad, acc, net, show) -> Claim:
        """plain and scaled fail at ``depth`` where BN trains (SkipInit's Table 2)."""
        ref = net(bad[0])  # the network the plain/scaled claim is judged on
        bn, ctrl = acc("batchnorm", ref), acc("frozen", ref)
        bn_trains = every(bn, ctrl) if ctrl else False
        fails = {s: all(x < bn.get(k, math.nan) - FAIL for k, x in acc(s).items()) for s in bad}
        v1, why1 = contrast(bn_trains, all(fails.values()), "BN", " and ".join(bad))
        if bn_trains and any(fails.values()) and not all(fails.values()):
            v1 = verdict(False, partly=True)
            why1 = ", ".join(s for s, f in fails.items() if not f) + " did not fail on every seed"
        return Claim(
            claim="Without normalization, α=1 (plain) and 1/√2 scaling (scaled) fail at depth "
            "where BN trains",
            paper="plain and scaled fail at 1,000 layers, BN trains (Table 2)",
            paper_setup="Wide-ResNet (pre-activation), CIFAR-10, 1,000 layers, SGD, batch 64",
            setup=setup,
            measured=f"depth {depth}, test accuracy: "
            + ", ".join(show(s, ref) for s in ("batchnorm", *bad, "frozen")),
            verdict=v1,
            rule=why1
            or f"BN beats the control on every seed; each of {', '.join(bad)} is "
            f"{FAIL:g} below BN (or diverged) on every seed (on the {ref} net)",
        )

    @staticmethod
    def _keep_up_claim(cfg, depth, setup, free, acc, net, show) -> Claim:
        """SkipInit and Fixup keep up with BN at ``depth``, each on its own net."""
        reasons, ok = [], []
        for s in free:
            v = net(s)
            bn_s, ctrl_s = acc("batchnorm", v), acc("frozen", v)
            bn_ok = every(bn_s, ctrl_s) if ctrl_s else False
            keeps = all(x >= bn_s.get(k, math.nan) - KEEP_UP for k, x in acc(s).items())
            beats = every(acc(s), ctrl_s)
            if not bn_ok:
                reasons.append(f"BN does not beat the frozen-gate control on the {v} net")
            if not beats:
                reasons.append(f"{s} does not beat the frozen-gate control on every seed")
            elif not keeps:
                reasons.append(f"{s} is more than {KEEP_UP:g} below BN on some seed")
            if bn_ok and beats and keeps:
                ok.append(s)
        shown = []
        for s in free:
            for x in ("batchnorm", s, "frozen"):
                item = show(x, net(s))
                if item not in shown:
                    shown.append(item)
        if list(free) == ["skipinit"]:  # SkipInit's Table 1 alone (skipinit-depth)
            claim = "SkipInit (no normalization) trains at depth as well as BatchNorm"
            paper = "SkipInit ≈ BN at 1,000 layers (Table 1)"
            paper_setup = "n-2 Wide-ResNets, 16 to 1,000 layers, pre-activation, CIFAR-10, 200 "
            paper_setup += "epochs, batch 64"
        else:
            claim = "SkipInit and Fixup (no normalization) train at depth as well as BatchNorm"
            paper = "SkipInit ≈ BN at 1,000 layers (Table 1); Fixup ≈ BN at 10,000 (Fig. 3)"
            paper_setup = (
                "Wide-ResNet 1,000 layers, pre-activation (SkipInit); post-activation ResNet to "
                "10,000 layers, accuracy after 1 epoch at lr 0.1 (Fixup); CIFAR-10"
            )
        return Claim(
            claim=claim,
            paper=paper,
            paper_setup=paper_setup,
            setup=setup,
            measured=f"depth {depth}, test accuracy: " + ", ".join(shown),
            verdict=verdict(len(ok) == len(free) > 0, partly=bool(ok)),
            rule="; ".join(reasons)
            or f"within {KEEP_UP:g} of BN on its own net on every seed and above that net's "
            "control on every seed",
        )


def _on_top(cell: dict, top: tuple[str, ...]) -> bool:
    """Whether ``cell`` is one of the arms ``top`` keeps at the deepest depth (empty: all)."""
    return not top or cell["scheme"] in top or f"{cell['scheme']}:{cell['variant']}" in top


def _loss(g: pd.DataFrame) -> dict[int, float]:
    """Final training loss per seed (inf for a diverged run) of one arm's rows."""
    return {
        int(r.seed): (math.inf if bool(r.diverged) else float(r.final_train_loss))
        for r in g.itertuples()
    }
