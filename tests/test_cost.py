"""The work of a cell (:mod:`depthlab.experiments.cost`): FLOPs equal to what torch counts, the
examples of a budget, and the ETA's prediction from measured cells."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import depthlab as dl
from depthlab.experiments import get_experiment
from depthlab.experiments.cost import (
    CPU_FLOPS,
    CPU_LAUNCH_S,
    MLP_MODULES,
    PRIOR_S,
    RESNET_MODULES,
    TRAIN_SIZE,
    Eta,
    Work,
    branches_skipped,
    cell_work,
    examples,
    macs_per_example,
)
from depthlab.resources import estimate


def _forward_macs(model: torch.nn.Module, x: torch.Tensor) -> float:
    with FlopCounterMode(display=False) as fc:
        model(x)
    return fc.get_total_flops() / 2 / len(x)  # FLOPs = 2 × multiply-adds


@pytest.mark.parametrize(
    "name,kw,x",
    [
        ("mlp", {"depth": 5, "width": 32, "in_dim": 64}, torch.randn(2, 64)),
        (
            "transformer-lm",
            {"depth": 3, "d_model": 32, "nhead": 4, "context": 16},
            torch.randint(0, 256, (2, 16)),
        ),
    ],
)
def test_macs_equal_torchs_count_for_mlps_and_transformers(name, kw, x):
    torch.manual_seed(0)
    model = dl.create_model(name, **kw)
    assert macs_per_example(name, kw, None) == _forward_macs(model, x)


def test_resnet_macs_are_its_blocks_convolutions():
    """The count is the residual blocks' 3×3 convolutions: within 1% of everything torch counts
    in a 110-layer CIFAR ResNet on 3×32×32 (the stem, shortcuts and head are the rest)."""
    kw = {"depth": 110, "in_channels": 3}
    model = dl.create_model("resnet", **kw)
    macs, counted = (
        macs_per_example("resnet", kw, (3, 32, 32)),
        _forward_macs(model, torch.randn(2, 3, 32, 32)),
    )
    assert counted < macs < 1.01 * counted


def test_examples_of_a_budget():
    assert examples({"steps": 10, "batch_size": 32}) == 320
    assert examples({"epochs": 2.0}) == 2 * TRAIN_SIZE["digits"]
    assert examples({"epochs": 1.0, "data_dir": "/c"}) == TRAIN_SIZE["cifar10"]
    assert examples({"depth": 3}) is None


def test_cell_work_of_a_deep_fc_cell():
    """6 × forward multiply-adds × examples; 3 kernels per module per step."""
    exp = get_experiment("deep-fc")
    cell = exp.grid(exp.config("smoke"))[0]
    name, kw, batch, *shape = exp.cell_model(cell)
    work = cell_work(exp, cell)
    n = cell["steps"] * cell["batch_size"]
    assert work.flops == 6 * macs_per_example(name, kw, None) * n
    assert work.launches == 3 * estimate(name, kw).modules * cell["steps"]
    assert work.seconds() == pytest.approx(
        work.flops / CPU_FLOPS + work.launches * CPU_LAUNCH_S, rel=1e-12
    )
    # activation checkpointing recomputes the forward pass: 4/3 of the work
    more = cell_work(exp, {**cell, "checkpointing": 10})
    assert more.flops == pytest.approx(4 / 3 * work.flops)


def test_a_frozen_control_on_a_cpu_counts_no_branch_work():
    """A gate fixed at 0 on a CPU skips its branches (``Residual.branch_unused``, checked on
    the cell's own network): the cell's work is the MLP's input and output layers and one module
    per block; on a GPU the branches run and the cell counts what the learnable arm counts."""
    exp = get_experiment("deep-fc")
    cells = exp.grid(exp.config("smoke"))
    cpu = {"device": "cpu"}  # as on a host without a GPU, whatever this one has
    frozen = {**next(c for c in cells if c["scheme"] == "frozen"), **cpu}
    rezero = {**next(c for c in cells if c["scheme"] == "rezero"), "seed": frozen["seed"], **cpu}
    name, kw, batch, *_ = exp.cell_model(frozen)
    scheme, options = exp.cell_scheme(frozen)
    model = dl.create_model(name, scheme=scheme, scheme_options=options, **kw)
    blocks = [m for m in model.modules() if isinstance(m, dl.nn.Residual)]
    assert len(blocks) == kw["depth"] and all(b.branch_unused() for b in blocks)
    assert branches_skipped(exp, frozen) and not branches_skipped(exp, rezero)
    work, full = cell_work(exp, frozen), cell_work(exp, rezero)
    steps = frozen["steps"]
    w, d_in = kw["width"], kw["in_dim"]
    assert work.flops == 6 * (d_in * w + w * 10) * steps * frozen["batch_size"]
    assert work.launches == 3 * (MLP_MODULES + kw["depth"]) * steps
    assert work.seconds() < full.seconds() / 3
    on_gpu = cell_work(exp, {**frozen, "device": "cuda"})
    assert on_gpu == cell_work(exp, {**rezero, "device": "cuda"}) == full
    # a ResNet's frozen arm: no block FLOPs, its stem/head modules and one per block
    sweep = get_experiment("depth-sweep")
    cell = {**next(c for c in sweep.grid(sweep.config("smoke")) if c["scheme"] == "frozen"), **cpu}
    n = (sweep.cell_model(cell)[1]["depth"] - 2) // 6
    got = cell_work(sweep, cell)
    assert got.flops == 0
    assert got.launches == 3 * (RESNET_MODULES + 3 * n) * cell["steps"]


class _Arm:
    """An experiment stand-in whose cells name their scheme and options directly."""

    def cell_scheme(self, cell):
        return cell["arm"]


@pytest.mark.parametrize(
    "arm,skipped",
    [
        (("skipinit", {"learnable": False}), True),
        (("rezero", {"learnable": False, "alpha_init": 0.0}), True),
        (("skipinit", {"learnable": False, "alpha_init": 0.5}), False),  # the branch counts
        (("skipinit", {}), False),
        (("plain", {"learnable": False}), False),
    ],
)
def test_only_a_gate_fixed_at_zero_skips_branches(arm, skipped):
    assert branches_skipped(_Arm(), {"arm": arm, "device": "cpu"}) is skipped
    assert branches_skipped(_Arm(), {"arm": arm, "device": "cuda:0"}) is False


def test_cells_without_a_network_have_no_work():
    exp = get_experiment("nonlinear-degeneracy")
    assert all(cell_work(exp, c) is None for c in exp.grid(exp.config("smoke")))


def test_eta_rescales_by_the_measured_ratio_per_experiment():
    ten = Work(flops=10 * CPU_FLOPS, launches=0.0)  # 10 s at the prior rate
    eta = Eta()
    assert eta.seconds("a", ten) == pytest.approx(10.0)  # nothing measured: the prior
    assert not eta.timed("a")
    eta.add("a", ten, 30.0)  # ran 3× slower than predicted
    eta.add("b", Work(flops=5 * CPU_FLOPS, launches=0.0), 5.0)
    assert eta.timed("a") and eta.seconds("a", ten) == pytest.approx(30.0)
    assert eta.seconds("b", ten) == pytest.approx(10.0)
    # an experiment with no finished cell: all finished cells' ratio, shrunk towards 1
    assert eta.seconds("c", ten) == pytest.approx(10 * (35 + PRIOR_S) / (15 + PRIOR_S))
    # no work: the experiment's mean cell, else the mean of every finished cell
    eta.add("d", None, 7.0)
    assert eta.seconds("d", None) == 7.0
    assert eta.seconds("e", None) == pytest.approx((30 + 5 + 7) / 3)
    assert Eta().seconds("x", None) == 0.0


def test_eta_of_a_deep_sweep_ranks_its_cells_by_their_work():
    """The 10,004-layer ResNets of depth-sweep's deep grid are predicted far above its
    1,004-layer ones (≈ 10× the FLOPs and modules), as they ran (≈ 400 s against ≈ 35 s)."""
    exp = get_experiment("depth-sweep")
    cells = [c for c in exp.grid(exp.config("deep")) if c["scheme"] == "batchnorm"]
    by_depth = {c["depth"]: cell_work(exp, c).seconds() for c in cells}
    assert math.isclose(by_depth[10004] / by_depth[1004], 10, rel_tol=0.05)
