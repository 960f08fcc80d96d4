"""The work of a training cell, counted from its config alone: FLOPs and kernel launches.

What a sweep's ETA and ``benchmarks/estimate_full.py`` (the ``full`` presets on a GPU) predict
from. For a cell whose network :meth:`Experiment.cell_model` names, with a budget in ``steps``
or ``epochs``:

* FLOPs: 6 × the forward multiply-adds of one example × the examples processed (forward 2,
  backward 4), × 4/3 where the cell recomputes activations (``checkpointing``). Multiply-adds:
  an MLP ``depth·w² + in·w + w·classes``; a CIFAR ResNet ``Σ_stages n · 2 · 9 c² · HW/4^s``; a
  Transformer LM per token ``depth·(4d² + 2·d·ff + 2·T·d) + d·vocab``.
* Launches: 3 kernels per module per step (forward, two backward), with
  :func:`depthlab.resources.estimate`'s module count — what sets the pace of a narrow
  10,000-layer network, whatever its FLOPs.

A cell takes about ``FLOPs / rate + launches × launch`` seconds; the rate and the cost of a
launch are the machine's (:func:`seconds`). Cells without a network or a budget this module
reads (spectra, analytic models, staged growth) have no work (None).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from depthlab.resources import estimate

#: training examples of the data sets a cell may read
TRAIN_SIZE = {"cifar10": 50_000, "digits": 1_438}
#: one CPU core running a cell (the ETA's prior; measured cells rescale it): a 3×3
#: convolution's training rate on one core of a current x86 CPU, and eager PyTorch's cost per
#: kernel, forward or backward
CPU_FLOPS = 100e9
CPU_LAUNCH_S = 15e-6


@dataclass(frozen=True)
class Work:
    """What one cell computes: ``flops`` in all, ``launches`` (kernels) in all."""

    flops: float
    launches: float

    def seconds(self, flops_per_s: float = CPU_FLOPS, launch_s: float = CPU_LAUNCH_S) -> float:
        """The time at ``flops_per_s`` plus ``launch_s`` per kernel."""
        return self.flops / flops_per_s + self.launches * launch_s


def macs_per_example(model: str, kw: dict, shape: tuple[int, ...] | None) -> float | None:
    """Forward multiply-adds of one example (see the module docstring); None: unknown model."""
    depth = int(kw.get("depth", 8))
    if model in ("mlp", "linear"):
        w, d_in = int(kw.get("width", 256)), int(kw.get("in_dim", kw.get("width", 64)))
        return depth * w * w + d_in * w + w * 10
    if model == "resnet":
        k = int(kw.get("width", 1))
        h, w_ = (shape[-2], shape[-1]) if shape else (32, 32)
        n = max(1, (depth - 2) // 6)
        return sum(n * 2 * 9 * (16 * k * 2**s) ** 2 * h * w_ / 4**s for s in range(3))
    if model == "transformer-lm":
        d, t = int(kw.get("d_model", 128)), int(kw.get("context", 128))
        ff = int(kw.get("dim_feedforward", 4 * d))
        return t * (depth * (4 * d * d + 2 * d * ff + 2 * t * d) + d * 256)
    return None


def examples(cell: dict[str, Any]) -> float | None:
    """Training examples a cell processes (steps × batch, or epochs × its data set's size)."""
    batch = int(cell.get("batch_size", 64))
    if "steps" in cell:
        return float(cell["steps"]) * batch
    if "epochs" in cell:
        data = "cifar10" if cell.get("data_dir") else "digits"
        return float(cell["epochs"]) * TRAIN_SIZE[data]
    return None


def cell_work(exp: Any, cell: dict[str, Any]) -> Work | None:
    """The :class:`Work` of one cell of experiment ``exp``; None where it is not counted.

    A frozen-gate control on a CPU (:func:`branches_skipped`) runs none of its blocks'
    branches: its work is the rest of the network (an MLP's input and output layers; a
    ResNet's stem, shortcuts and head, counted as no FLOPs) and one module per block."""
    spec = exp.cell_model(cell)
    if spec is None:
        return None
    model, kw, batch, *shape = spec
    one = shape[0] if shape else None
    macs, n = macs_per_example(model, kw, one), examples(cell)
    est = estimate(model, kw, one)
    if macs is None or n is None or est is None:
        return None
    modules = est.modules
    if model in ("mlp", "resnet") and branches_skipped(exp, cell):
        depth = int(kw.get("depth", 8))
        if model == "mlp":  # the input and output layers: the net with no blocks
            macs = macs_per_example(model, {**kw, "depth": 0}, one)
            modules = MLP_MODULES + depth
        else:
            macs, modules = 0.0, RESNET_MODULES + 3 * max(1, (depth - 2) // 6)
    recompute = 4 / 3 if cell.get("checkpointing") else 1.0
    steps = n / max(1, int(cell.get("batch_size", batch)))
    return Work(6 * macs * n * recompute, 3 * modules * steps * recompute)


#: the modules of an MLP and of a CIFAR ResNet outside their blocks (stem, head; the ResNet's
#: pooling and stage shortcuts), as :func:`depthlab.resources.estimate` counts them: a net's
#: count less its blocks', which are the difference to the net with one more block (MLP) or
#: one more per stage (ResNet, depth 8 → 14)
MLP_MODULES = 2 * estimate("mlp", {"depth": 1}).modules - estimate("mlp", {"depth": 2}).modules
RESNET_MODULES = (
    2 * estimate("resnet", {"depth": 8}).modules - estimate("resnet", {"depth": 14}).modules
)


def branches_skipped(exp: Any, cell: dict[str, Any]) -> bool:
    """Whether the cell's network skips its blocks' branches: a gate fixed at α = 0
    (``learnable=False`` with ``skipinit`` or ``rezero``, whose gates start at 0) on a CPU, where
    :meth:`depthlab.nn.Residual.branch_unused` leaves the branch out (on a GPU it runs)."""
    scheme, options = exp.cell_scheme(cell) or (None, {})
    if scheme not in ("skipinit", "rezero") or options.get("learnable", True) is not False:
        return False
    if float(options.get("alpha_init", 0.0)) != 0.0:
        return False
    device = str(cell.get("device", "cpu"))
    if device == "auto":
        import torch

        return not torch.cuda.is_available()
    return device == "cpu"


#: how much predicted work (seconds) the prior rate counts for, beside the measured cells, when
#: an ETA rescales the prediction of an experiment none of whose cells has finished yet
PRIOR_S = 1000.0


class Eta:
    """The seconds cells still to run will take, from the cells that have run.

    A cell with :class:`Work` is predicted at ``Work.seconds()`` × its experiment's measured
    ratio (the finished cells' wall time over their predicted time); before any of its
    experiment's cells has finished, at the ratio of all finished cells, shrunk towards 1 by
    :data:`PRIOR_S` seconds of prior (the machine's rate at :data:`CPU_FLOPS` and
    :data:`CPU_LAUNCH_S`). A cell without work: its experiment's mean cell, else the mean of
    all finished cells. Cheap cells (a diverged run stops early; a frozen control skips its
    blocks) pull a ratio down, so the figure is an estimate, not a bound."""

    def __init__(self, flops_per_s: float = CPU_FLOPS, launch_s: float = CPU_LAUNCH_S) -> None:
        self.rate = (flops_per_s, launch_s)
        self.walls: dict[str, list[float]] = {}  # every finished cell's seconds, per experiment
        self.measured: dict[str, float] = {}  # seconds of the finished cells with work
        self.predicted: dict[str, float] = {}  # their predicted seconds

    def add(self, name: str, work: Work | None, wall: float) -> None:
        """A finished cell of experiment ``name`` took ``wall`` seconds."""
        self.walls.setdefault(name, []).append(wall)
        if work is not None:
            self.measured[name] = self.measured.get(name, 0.0) + wall
            self.predicted[name] = self.predicted.get(name, 0.0) + work.seconds(*self.rate)

    def timed(self, name: str) -> bool:
        """Whether a cell of experiment ``name`` has finished."""
        return bool(self.walls.get(name))

    def seconds(self, name: str, work: Work | None) -> float:
        """The predicted seconds of one cell of experiment ``name`` with ``work``."""
        if work is not None:
            own = self.predicted.get(name, 0.0)
            if own > 0:
                ratio = self.measured[name] / own
            else:
                total = sum(self.predicted.values())
                ratio = (sum(self.measured.values()) + PRIOR_S) / (total + PRIOR_S)
            return work.seconds(*self.rate) * ratio
        walls = self.walls.get(name) or [w for ws in self.walls.values() for w in ws]
        return sum(walls) / len(walls) if walls else 0.0
