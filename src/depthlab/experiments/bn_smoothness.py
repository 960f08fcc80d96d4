"""``bn-smoothness``: BatchNorm makes the loss landscape smoother, and internal covariate shift is
not the reason (Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help
Optimization?", arXiv 1805.11604; the BN article of the source set).

The same deep network without skip connections — a VGG-style conv net on the digits images and a
deep MLP on the flat digits — trains without normalization (``none``), with BatchNorm after every
weight layer (``batchnorm``) and with "noisy" BatchNorm (``noisy``: every BN output shifted and
scaled per unit by random amounts resampled at every step, :class:`~depthlab.nn.norm.NoisyBatchNorm`
— a covariate shift far larger than without BN, injected on purpose). Every ``landscape_every``
steps :func:`depthlab.loss_landscape` measures, on the current batch, how the loss and its
gradient change along the gradient over steps of 0.5, 1, 2 and 4 learning rates (the loss
range, the gradient change, the effective β-smoothness). Training is SGD with momentum 0.9 at a
base learning rate and a large one, over seeds; a run diverges when its loss becomes non-finite
or exceeds 100× its start.

Claims (the paper's Figs. 1, 2 and 4):

* with BN the loss and its gradient vary far less along the gradient (at the base lr, where
  both train);
* with BN the large learning rate stays stable where the network without BN fails;
* noisy BN trains about as well as BN, and better than no BN: the covariate shift it adds does
  not hurt, so reducing it is not how BN helps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from depthlab.experiments.base import EXPERIMENTS, Claim, Experiment, finite, verdict
from depthlab.experiments.rules import contrast, every, spread

NETS = ("vgg", "mlp")
NORMS = ("none", "batchnorm", "noisy")
#: the step sizes of the landscape probe, in learning rates
ETA_MULTIPLES = (0.5, 1.0, 2.0, 4.0)
#: "about as well as BN": within this much test accuracy on every seed
KEEP_UP = 0.05
#: "fails": diverged, or this far below BN's test accuracy
FAIL = 0.10
#: divergence: a loss above this multiple of the first step's
DIVERGE = 100.0


@dataclass(frozen=True)
class Config:
    nets: tuple[str, ...] = NETS
    norms: tuple[str, ...] = NORMS
    depth: int = 10  # weight layers before the classifier (no skips)
    width: int = 32  # conv channels / MLP features
    lrs: tuple[float, ...] = (0.02, 0.2)  # the base learning rate, then a large one (10×)
    steps: int = 200
    batch_size: int = 64
    landscape_every: int = 25
    noise_mean: float = 1.0  # noisy BN: shift U(−mean, mean) per unit and step
    noise_std: float = 2.0  # noisy BN: scale U(1, std) per unit and step
    seeds: tuple[int, ...] = (0, 1, 2)
    device: str = "auto"  # auto (CUDA when present) | cpu | cuda | cuda:N


def build(net: str, norm: str, depth: int, width: int, noise: tuple[float, float]):
    """The plain (skip-free) network: ``depth`` × (weight layer → norm → ReLU), He-initialised,
    then global pooling (conv) and a linear classifier; a max-pool halves the 8×8 images after
    the first half of the conv layers."""
    import torch
    from torch import nn

    from depthlab.nn.norm import NoisyBatchNorm, create_norm

    layout = "channels" if net == "vgg" else "features"
    layers: list[nn.Module] = []
    c_in = 1 if net == "vgg" else 64
    for i in range(depth):
        if net == "vgg":
            layers.append(nn.Conv2d(c_in, width, 3, padding=1, bias=norm == "none"))
        else:
            layers.append(nn.Linear(c_in, width, bias=norm == "none"))
        if norm == "batchnorm":
            layers.append(create_norm("batchnorm", width, layout))
        elif norm == "noisy":
            layers.append(NoisyBatchNorm(width, layout, *noise))
        layers.append(nn.ReLU())
        if net == "vgg" and i == depth // 2 - 1:
            layers.append(nn.MaxPool2d(2))
        c_in = width
    if net == "vgg":
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
    layers.append(nn.Linear(width, 10))
    model = nn.Sequential(*layers)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    m.bias.zero_()
    return model


@EXPERIMENTS.register()
class BNSmoothness(Experiment):
    name = "bn-smoothness"
    title = "BN smooths the loss landscape and allows large learning rates; noisy BN still works"
    paper = "Santurkar et al. 2018, arXiv 1805.11604, Figs. 1, 2 and 4"
    columns = (
        "net", "norm", "lr", "seed", "step", "train_loss", "loss_range", "grad_change",
        "beta", "test_accuracy", "diverged",
    )  # fmt: skip
    choices = {"nets": NETS, "norms": NORMS}
    version = 2  # noisy BN evaluates with the noise's expectation
    zero_ok = ("seeds",)
    Config = Config
    presets = {
        "smoke": Config(
            nets=("mlp",), depth=6, width=16, steps=40, landscape_every=10, seeds=(0, 1)
        ),
        "quick": Config(),
        # the same contrasts on nets 2.4× deeper (24 weight layers without skips), two seeds
        "deep": Config(depth=24, seeds=(0, 1)),
        "full": Config(depth=16, width=128, steps=3000, landscape_every=100),
    }

    def check(self, cfg: Config) -> None:
        from depthlab.registry import DepthlabError

        if cfg.noise_std < 1:
            raise DepthlabError(
                f"noise_std in experiment 'bn-smoothness' must be ≥ 1 (a scale U(1, noise_std)), "
                f"got {cfg.noise_std:g}"
            )
        if cfg.landscape_every < 1:
            raise DepthlabError(
                "landscape_every in experiment 'bn-smoothness' must be ≥ 1 (probe the landscape "
                f"every that many steps), got {cfg.landscape_every}"
            )

    def cells(self, cfg: Config) -> list[dict]:
        keys = (
            "depth", "width", "steps", "batch_size", "landscape_every", "noise_mean", "noise_std",
        )  # fmt: skip
        return [
            {"net": n, "norm": m, "lr": lr, **{k: getattr(cfg, k) for k in keys}, "seed": s}
            for n in cfg.nets
            for lr in cfg.lrs
            for s in cfg.seeds
            for m in cfg.norms
        ]

    def cell_model(self, cell: dict) -> tuple[str, dict, int] | None:
        """An MLP cell's net has the sizes of depthlab's MLP (``depth`` layers of ``width`` on
        the 64 digits pixels), which the memory check and the estimates count it as; the VGG
        cells' conv net is none of depthlab's models: not counted (None)."""
        if cell["net"] != "mlp":
            return None
        kw = {"depth": cell["depth"], "width": cell["width"], "in_dim": 64}
        return "mlp", kw, cell["batch_size"]

    def run_cell(self, cell: dict) -> list[dict]:
        import torch
        import torch.nn.functional as F

        from depthlab.data import create_dataset
        from depthlab.diagnostics.landscape import loss_landscape
        from depthlab.train.loop import resolve_device

        device = resolve_device(cell.get("device", "cpu"))
        torch.manual_seed(cell["seed"])
        data = create_dataset("digits", flat=cell["net"] == "mlp")
        model = build(
            cell["net"], cell["norm"], cell["depth"], cell["width"],
            (cell["noise_mean"], cell["noise_std"]),
        ).to(device)  # fmt: skip
        lr = cell["lr"]
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
        etas = [m * lr for m in ETA_MULTIPLES]
        out, first, diverged = [], None, False
        for step in range(cell["steps"]):
            x, y = data.train_batch(step, cell["batch_size"], cell["seed"])
            x, y = x.to(device), y.to(device)
            model.train()
            row: dict = {"step": step}
            if step % cell["landscape_every"] == 0:
                land = loss_landscape(model, x, y, etas=etas)
                a = land.attrs
                row.update(
                    loss_range=finite(a["loss_range"]),
                    grad_change=finite(a["max_grad_change"]),
                    beta=finite(a["beta_smoothness"]),
                )
            loss = F.cross_entropy(model(x), y)
            value = float(loss.detach())
            first = value if first is None else first
            if not math.isfinite(value) or value > DIVERGE * first:
                diverged = True
                out.append({**row, "train_loss": finite(value)})
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            row["train_loss"] = value
            if "loss_range" in row or step == cell["steps"] - 1:
                out.append(row)
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, y in data.test_batches(512):
                pred = model(x.to(device)).argmax(1)
                correct += int((pred == y.to(device)).sum())
                total += len(y)
        acc = correct / max(total, 1) if not diverged else math.nan
        for r in out:
            r.setdefault("loss_range", math.nan)
            r.setdefault("grad_change", math.nan)
            r.setdefault("beta", math.nan)
            r["test_accuracy"] = acc
            r["diverged"] = diverged
        return out

    def figures(self, df: pd.DataFrame, cfg: Config, out_dir: Path) -> list[Path]:
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        base = min(cfg.lrs)
        at = df[(df["lr"] == base) & df["loss_range"].notna()]
        nets = [n for n in NETS if n in set(df["net"])]
        fig, axes = plt.subplots(len(nets), 2, figsize=(9, 3 * len(nets)), squeeze=False)
        for row, net in zip(axes, nets, strict=True):
            for norm, g in at[at["net"] == net].groupby("norm"):
                for ax, col in zip(row, ("loss_range", "beta"), strict=True):
                    st = g.groupby("step")[col].agg(["mean", "min", "max"])
                    (line,) = ax.plot(st.index, st["mean"], label=norm)
                    ax.fill_between(
                        st.index, st["min"], st["max"], color=line.get_color(), alpha=0.2
                    )
            row[0].set_ylabel(f"{net}: loss range along g")
            row[1].set_ylabel(f"{net}: effective β-smoothness")
            for ax in row:
                ax.set_yscale("log")
                ax.set_xlabel("step")
            row[0].legend(fontsize=7)
        fig.suptitle(f"lr {base:g}; mean and min–max over {len(cfg.seeds)} seeds", fontsize=9)
        return [save_fig(fig, out_dir / "bn_smoothness.png")]

    def claims(self, df: pd.DataFrame, cfg: Config) -> list[Claim]:
        runs = _runs(df)
        if runs.empty:
            return []
        base, large = runs["lr"].min(), runs["lr"].max()
        setup = (
            f"skip-free nets ({', '.join(sorted(set(runs['net'])))}), {cfg.depth} weight layers × "
            f"{cfg.width}, digits, SGD momentum 0.9, lr {base:g} and {large:g}, batch "
            f"{cfg.batch_size}, {cfg.steps} steps, landscape every {cfg.landscape_every} steps "
            f"at η = {'/'.join(f'{m:g}' for m in ETA_MULTIPLES)} × lr, seeds "
            f"{', '.join(map(str, cfg.seeds))}; far smaller than the paper's (VGG, CIFAR-10)"
        )

        def get(net: str, norm: str, lr: float, col: str) -> dict[int, float]:
            g = runs[(runs["net"] == net) & (runs["norm"] == norm) & (runs["lr"] == lr)]
            return {int(r.seed): float(getattr(r, col)) for r in g.itertuples()}

        def trains(net: str, norm: str, lr: float) -> bool:
            div = get(net, norm, lr, "diverged")
            return bool(div) and not any(div.values())

        nets = sorted(set(runs["net"]))
        rows = []
        smooth, parts, why = [], [], []
        for net in nets:
            both = trains(net, "batchnorm", base) and trains(net, "none", base)
            ok = both and all(
                every({k: -v for k, v in get(net, "batchnorm", base, c).items()},
                      {k: -v for k, v in get(net, "none", base, c).items()})
                for c in ("loss_range", "beta")
            )  # fmt: skip
            smooth.append(ok)
            parts.append(
                f"{net}: loss range BN {spread(get(net, 'batchnorm', base, 'loss_range').values())}"
                f" vs none {spread(get(net, 'none', base, 'loss_range').values())}; β BN "
                f"{spread(get(net, 'batchnorm', base, 'beta').values())} vs none "
                f"{spread(get(net, 'none', base, 'beta').values())}"
            )
            if not both:
                why.append(f"{net}: not both arms trained at lr {base:g}")
            elif not ok:
                why.append(f"{net}: BN's loss range and β are not below no-BN's on every seed")
        rows.append(
            Claim(
                claim="With BN the loss and its gradient change far less along the gradient "
                "(a smoother landscape)",
                paper="BN: smaller loss variation, more predictive gradients, smaller effective "
                "β-smoothness (Fig. 4)",
                paper_setup="VGG on CIFAR-10, with and without BN, along the gradient",
                setup=setup,
                measured=f"lr {base:g}, median over training: " + "; ".join(parts),
                verdict=verdict(all(smooth), partly=any(smooth)),
                rule="; ".join(why)
                or "BN's median loss range and β below no-BN's on every seed, on every net",
            )
        )

        def fails(net: str, norm: str, lr: float) -> bool:
            """Diverged, or ``FAIL`` below BN's accuracy, on every seed."""
            bn = get(net, "batchnorm", lr, "acc")
            runs_ = get(net, norm, lr, "acc")
            div = get(net, norm, lr, "diverged")
            return bool(runs_) and all(
                div[k] or x < bn.get(k, math.nan) - FAIL for k, x in runs_.items()
            )

        stable = []
        for net in nets:
            v, _ = contrast(
                trains(net, "batchnorm", large), fails(net, "none", large), "BN", "no BN"
            )
            stable.append(v == "reproduced")
        rows.append(
            Claim(
                claim="BN keeps training stable at a large learning rate where the network "
                "without BN fails",
                paper="BN trains at lr 0.5 where the standard VGG does not (Fig. 1)",
                paper_setup="VGG on CIFAR-10, lr 0.1 and 0.5",
                setup=setup,
                measured=f"lr {large:g}: "
                + "; ".join(
                    f"{net}: BN {_div(get(net, 'batchnorm', large, 'diverged'))}, test accuracy "
                    f"{spread(get(net, 'batchnorm', large, 'acc').values())}; none "
                    f"{_div(get(net, 'none', large, 'diverged'))}, test accuracy "
                    f"{spread(get(net, 'none', large, 'acc').values())}"
                    for net in nets
                ),
                verdict=verdict(all(stable), partly=any(stable)),
                rule=""
                if all(stable)
                else "on "
                + ", ".join(n for n, s in zip(nets, stable, strict=True) if not s)
                + f": not (BN trains on every seed and no-BN diverges or is {FAIL:g} below BN "
                "on every seed)",
            )
        )
        noisy_ok, parts, why = [], [], []
        for net in nets:
            bn, noisy, none = (get(net, m, base, "acc") for m in ("batchnorm", "noisy", "none"))
            keeps = bool(noisy) and all(
                x >= bn.get(k, math.nan) - KEEP_UP for k, x in noisy.items()
            )
            beats = every(noisy, none)
            noisy_ok.append(keeps and beats)
            parts.append(
                f"{net}: BN {spread(bn.values())}, noisy BN {spread(noisy.values())}, "
                f"none {spread(none.values())}"
            )
            if not keeps:
                why.append(f"{net}: noisy BN more than {KEEP_UP:g} below BN on some seed")
            if not beats:
                why.append(f"{net}: noisy BN not above no-BN on every seed")
        rows.append(
            Claim(
                claim="BN with injected, time-varying covariate shift (noisy BN) trains about as "
                "well as BN and better than no BN",
                paper="noisy BN ≈ BN, both better than standard (Fig. 2)",
                paper_setup="VGG on CIFAR-10, noise of non-zero mean and non-unit variance "
                "(its magnitudes are a choice here, stated in our setup)",
                setup=setup
                + f"; noise U(±{cfg.noise_mean:g}) shift, U(1, {cfg.noise_std:g}) scale",
                measured=f"lr {base:g}, test accuracy (diverged = 0): " + "; ".join(parts),
                verdict=verdict(all(noisy_ok), partly=any(noisy_ok)),
                rule="; ".join(why)
                or f"noisy BN within {KEEP_UP:g} of BN and above no-BN on every seed, every net",
            )
        )
        return rows


def _div(d: dict[int, float]) -> str:
    n = int(sum(bool(v) for v in d.values()))
    return f"{n}/{len(d)} diverged" if d else "n/a"


def _runs(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run: the medians of its landscape probes, its accuracy (diverged = 0) and
    whether it diverged."""
    out = []
    for (net, norm, lr, seed), g in df.groupby(["net", "norm", "lr", "seed"]):
        div = bool(g["diverged"].astype(bool).any())
        acc = float(g["test_accuracy"].iloc[-1])
        out.append({
            "net": net, "norm": norm, "lr": float(lr), "seed": int(seed), "diverged": div,
            "acc": 0.0 if div or not math.isfinite(acc) else acc,
            "loss_range": float(g["loss_range"].median()), "beta": float(g["beta"].median()),
        })  # fmt: skip
    return pd.DataFrame(out)
