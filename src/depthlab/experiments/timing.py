"""What a sweep should take, from training steps timed on this machine's device.

:mod:`depthlab.experiments.cost` predicts a cell's time from its FLOPs and kernel launches at
an assumed rate; this module measures it instead. For every cell whose network
:meth:`Experiment.cell_model` names (an MLP, a CIFAR ResNet or a Transformer LM) with a budget
in steps or epochs, :func:`cell_step` describes one training step of that network — its sizes,
batch, input shape, activation checkpointing, memory layout and the device the cell would run
on — and :func:`time_step` builds it on that device and times a few steps of forward,
cross-entropy, backward and the optimizer's update (SGD with momentum, Adam for a Transformer
LM, as the experiments train them), on random inputs of the cell's shape, so no data set is
read. A cell then takes about (its steps) × (that step's median time). Cells that train the
same network share one timing (:class:`StepTimes`), so a whole preset costs a few steps per
distinct network.

A cell's network is built with the scheme and options the experiment builds it with
(:meth:`Experiment.cell_scheme`: a frozen-gate control is timed frozen, so its skipped blocks
cost nothing, and a Fixup arm without a rule as that arm) and timed with the cell's optimizer
(:meth:`Experiment.cell_optimizer`); where an experiment does not say, a stand-in per model
(:data:`STAND_IN`: BatchNorm for a ResNet, the costliest of the usual arms; ReZero for an MLP;
Pre-LN for a Transformer). Evaluation passes, data loading, start-up and the early end of a run
that diverges are left out, so the figure is a lower bound for small cells and an upper bound
for arms that diverge.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from depthlab.experiments.cost import examples

#: the scheme a network is timed under when its cell names none that depthlab registers
STAND_IN = {"resnet": "batchnorm", "mlp": "rezero", "transformer-lm": "prenorm"}
#: the vocabulary of depthlab's byte-level Transformer LMs
VOCAB = 256


@dataclass(frozen=True)
class Step:
    """One training step of a cell's network, as :func:`time_step` builds and times it."""

    model: str
    sizes: tuple[tuple[str, Any], ...]  # constructor sizes, sorted (hashable)
    batch: int
    shape: tuple[int, ...]  # one example: (C, H, W) image, (in_dim,) vector, (context,) tokens
    scheme: str
    checkpointing: int = 0
    channels_last: bool = False
    device: str = "cpu"
    options: tuple[tuple[str, Any], ...] = ()  # scheme options, sorted (hashable)
    optimizer: str = "sgd"  # sgd (momentum 0.9, weight decay 5e-4) | adam | adamw | adagrad

    def label(self) -> str:
        """``resnet depth=1004 width=1 (skipinit learnable=False), batch 64 of 1×8×8``."""
        sizes = " ".join(f"{k}={v}" for k, v in self.sizes if k != "in_channels")
        ck = f", {self.checkpointing} checkpoint segments" if self.checkpointing else ""
        shape = "×".join(map(str, self.shape))
        scheme = " ".join([self.scheme, *(f"{k}={v}" for k, v in self.options)])
        return f"{self.model} {sizes} ({scheme}), batch {self.batch} of {shape}{ck}"


def _device(name: str) -> str:
    from depthlab.train.loop import resolve_device

    return str(resolve_device(name))


def cell_step(exp: Any, cell: dict[str, Any]) -> Step | None:
    """The :class:`Step` a training cell of ``exp`` repeats; None where it has no network this
    module builds or no budget in steps or epochs."""
    spec = exp.cell_model(cell)
    if spec is None or examples(cell) is None:
        return None
    model, kw, batch, *rest = spec
    if model not in STAND_IN:
        return None
    kw = dict(kw)
    if model == "resnet":
        shape = tuple(rest[0]) if rest else (3, 32, 32)
        kw["in_channels"] = shape[0]
    elif model == "mlp":
        shape = (int(kw.get("in_dim", kw.get("width", 64))),)
        kw["in_dim"] = shape[0]
    else:
        shape = (int(kw.get("context", 128)),)
    scheme, options = exp.cell_scheme(cell) or (STAND_IN[model], {})
    optimizer = exp.cell_optimizer(cell)
    return Step(
        model=model,
        sizes=tuple(sorted(kw.items())),
        batch=int(cell.get("batch_size", batch)),
        shape=shape,
        scheme=scheme,
        checkpointing=int(cell.get("checkpointing", 0) or 0),
        channels_last=bool(cell.get("channels_last", False)) and model == "resnet",
        device=_device(str(cell.get("device", "cpu"))),
        options=tuple(sorted((k, _frozen(v)) for k, v in options.items())),
        optimizer=optimizer,
    )


def _frozen(value: Any) -> Any:
    """A scheme option as a hashable value (a list as a tuple)."""
    return tuple(value) if isinstance(value, list) else value


def cell_steps(cell: dict[str, Any]) -> float | None:
    """Optimizer steps of a cell: its examples over its batch (None: no budget read)."""
    n = examples(cell)
    return None if n is None else n / max(1, int(cell.get("batch_size", 64)))


def build_step(step: Step, seed: int = 0) -> tuple[Any, Callable[[], float]]:
    """``(model, one_step)``: the network of ``step`` on its device with its optimizer and a
    fixed random batch (seeded; the global random state is not touched); ``one_step()`` runs
    one training step and returns its loss."""
    import torch
    import torch.nn.functional as F

    import depthlab as dl
    from depthlab.train.config import TrainConfig
    from depthlab.train.optim import make_optimizer, optimizer_step

    device = torch.device(step.device)
    g = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = dl.create_model(
            step.model, scheme=step.scheme, scheme_options=dict(step.options) or None,
            **dict(step.sizes),
        ).to(device)  # fmt: skip
    if step.checkpointing:
        model.blocks.checkpoint_segments = step.checkpointing
    if step.model == "transformer-lm":
        x = torch.randint(0, VOCAB, (step.batch, *step.shape), generator=g).to(device)
        y = torch.randint(0, VOCAB, (step.batch, *step.shape), generator=g).to(device)
    else:
        x = torch.randn(step.batch, *step.shape, generator=g).to(device)
        y = torch.randint(0, 10, (step.batch,), generator=g).to(device)
    if step.optimizer == "sgd":
        cfg = TrainConfig(optimizer="sgd", lr=0.01, momentum=0.9, weight_decay=5e-4)
    else:
        cfg = TrainConfig(optimizer=step.optimizer, lr=1e-3)
    if step.channels_last:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    opt = make_optimizer(model, cfg)

    def one_step() -> float:
        opt.zero_grad(set_to_none=True)
        out = model(x)
        loss = F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
        loss.backward()
        optimizer_step(opt)
        return float(loss.detach())

    return model, one_step


def time_step(step: Step, repeats: int = 3, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` training steps of ``step`` after ``warmup`` untimed ones
    (on a GPU, each timed step ends with ``torch.cuda.synchronize``)."""
    import torch

    model, one_step = build_step(step)
    cuda = step.device.startswith("cuda")

    def timed() -> float:
        t0 = time.perf_counter()
        one_step()
        if cuda:
            torch.cuda.synchronize(step.device)
        return time.perf_counter() - t0

    for _ in range(warmup):
        timed()
    seconds = statistics.median(timed() for _ in range(max(1, repeats)))
    del model
    return seconds


class StepTimes:
    """Seconds of cells from their timed steps; each distinct :class:`Step` is timed once."""

    def __init__(
        self, repeats: int = 3, warmup: int = 1, log: Callable[[str], None] | None = None
    ) -> None:
        self.repeats, self.warmup, self.log = repeats, warmup, log
        self.times: dict[Step, float] = {}  # seconds per step, per network timed

    def step_seconds(self, step: Step) -> float:
        """The median seconds of one training step of ``step`` (timed on first use)."""
        if step not in self.times:
            self.times[step] = time_step(step, self.repeats, self.warmup)
            if self.log is not None:
                self.log(f"  timed {step.label()} on {step.device}: {self.times[step]:.3g} s/step")
        return self.times[step]

    def seconds(self, exp: Any, cell: dict[str, Any]) -> float | None:
        """The training time of one cell (its steps × its network's step); None where the
        cell has no :class:`Step`."""
        step, n = cell_step(exp, cell), cell_steps(cell)
        if step is None or n is None:
            return None
        return n * self.step_seconds(step)
