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
    PRIOR_S,
    TRAIN_SIZE,
    Eta,
    Work,
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
