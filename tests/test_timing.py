"""Timed training steps (:mod:`depthlab.experiments.timing`): the step a cell repeats is its
network, batch and layout; the timed step really trains; each network is timed once; and
``run --dry-run --measure`` adds the timed steps up without running or writing anything."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from depthlab.experiments import cost, get_experiment, runner
from depthlab.experiments import timing as tm
from depthlab.experiments.cost import examples


def _cells(name: str, preset: str, **overrides) -> tuple:
    exp = get_experiment(name)
    cfg = dataclasses.replace(exp.presets[preset], **overrides)
    return exp, exp.grid(cfg)


def test_a_deep_fc_cell_repeats_its_own_network():
    exp, cells = _cells("deep-fc", "deep", device="cpu")
    cell = next(c for c in cells if c.get("scheme") == "rezero")
    step = tm.cell_step(exp, cell)
    sizes = dict(step.sizes)
    assert (step.model, step.scheme, step.device) == ("mlp", "rezero", "cpu")
    assert sizes["depth"] == cell["depth"] and sizes["width"] == cell["width"]
    assert step.batch == cell["batch_size"] and step.shape == (sizes["in_dim"],)
    assert tm.cell_steps(cell) == cell["steps"]


def test_a_cifar_depth_sweep_cell_keeps_its_layout_checkpointing_and_epoch():
    exp, cells = _cells("depth-sweep", "full", data_dir="cifar", device="cpu")
    cell = max(cells, key=lambda c: c["depth"])
    step = tm.cell_step(exp, cell)
    assert step.model == "resnet" and step.shape == (3, 32, 32)
    assert dict(step.sizes)["depth"] == cell["depth"]
    assert step.checkpointing == cell.get("checkpointing", 0) > 0
    assert step.channels_last == cell["channels_last"]
    assert step.batch == cell["batch_size"]  # the real batch, not the memory check's share
    assert tm.cell_steps(cell) == pytest.approx(examples(cell) / cell["batch_size"])


class _Built(Exception):
    """Raised by the recording ``create_model``: the cell's network was named."""


@pytest.mark.parametrize(
    "name", ["deep-fc", "depth-sweep", "skipinit-depth", "fixup-ablation",
             "transformer-convergence", "transformer-jacobian", "batch-size"],
)  # fmt: skip
def test_every_arm_is_timed_as_its_experiment_builds_it(name, monkeypatch):
    """The scheme and options of each cell's timed step are those ``run_cell`` passes to
    ``create_model`` (recorded, then the cell stopped): frozen-gate controls, Fixup with a rule
    left out, Post-LN with warm-up, the post-activation BN net's zero-γ option."""
    import depthlab

    seen: list[tuple] = []

    def record(model, scheme="plain", scheme_options=None, **kw):
        seen.append((model, scheme, dict(scheme_options or {})))
        raise _Built

    monkeypatch.setattr(depthlab, "create_model", record)
    exp, cells = _cells(name, "deep", device="cpu")
    checked = set()
    for cell in cells:
        step = tm.cell_step(exp, cell)
        if step is None or step in checked:
            continue
        checked.add(step)
        with pytest.raises(_Built):
            exp.run_cell({**cell, "steps": 1, "epochs": 0.01} if "epochs" in cell else cell)
        model, scheme, options = seen[-1]
        assert (step.model, step.scheme, dict(step.options)) == (model, scheme, options)
    assert len({(s.scheme, s.options) for s in checked}) >= 2


def test_the_optimizer_is_the_cells():
    for name, want in (("deep-fc", "adam"), ("transformer-convergence", "adam"),
                       ("depth-sweep", "sgd"), ("fixup-ablation", "sgd")):  # fmt: skip
        exp, cells = _cells(name, "deep", device="cpu")
        assert {tm.cell_step(exp, c).optimizer for c in cells} == {want}


def test_arms_the_experiment_does_not_name_are_timed_under_the_stand_in():
    """bn-smoothness builds its own skip-free nets: its MLP cells are timed as depthlab's MLP of
    their sizes under the stand-in scheme; its VGG cells (a conv net depthlab does not have)
    are not timed or counted at all."""
    exp, cells = _cells("bn-smoothness", "deep", device="cpu")
    for cell in cells:
        step = tm.cell_step(exp, cell)
        if cell["net"] == "vgg":
            assert step is None and cost.cell_work(exp, cell) is None
        else:
            assert (step.model, step.scheme, step.options) == ("mlp", tm.STAND_IN["mlp"], ())
            assert dict(step.sizes) == {"depth": 24, "width": 32, "in_dim": 64}


def test_a_frozen_control_is_timed_with_its_gates_fixed():
    exp, cells = _cells("depth-sweep", "deep", device="cpu")
    cell = next(c for c in cells if c["scheme"] == "frozen" and c["depth"] == 110)
    step = tm.cell_step(exp, cell)
    assert (step.scheme, step.options) == ("skipinit", (("learnable", False),))
    model, _ = tm.build_step(step)
    gates = [b for n, b in model.named_buffers() if n.endswith("gate.alpha")]
    assert len(gates) == len(model.blocks) and all(float(a) == 0.0 for a in gates)
    assert not [n for n, _ in model.named_parameters() if "gate" in n]
    # every block but the two that change the stage (a projection shortcut) is skipped
    assert sum(not b.is_identity() for b in model.blocks) == 2


@pytest.mark.parametrize(
    "step",
    [
        tm.Step("mlp", (("depth", 4), ("in_dim", 16), ("width", 32)), 64, (16,), "rezero"),
        tm.Step(
            "resnet",
            (("depth", 8), ("in_channels", 1)),
            32,
            (1, 8, 8),
            "batchnorm",
            channels_last=True,
        ),
        tm.Step(
            "transformer-lm",
            (("context", 8), ("d_model", 16), ("depth", 2), ("nhead", 2)),
            8,
            (8,),
            "prenorm",
        ),
    ],
    ids=["mlp", "resnet-nhwc", "transformer"],
)
def test_the_timed_step_is_a_training_step(step):
    """One step is forward, loss, backward and the optimizer: repeated on its fixed batch, the
    loss falls and every parameter that gets a gradient moves."""
    model, one_step = tm.build_step(step)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    losses = [one_step() for _ in range(40)]
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.7 * losses[0]
    moved = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(moved) >= len(before) // 2


def test_building_a_step_leaves_the_callers_random_state_alone():
    step = tm.Step("mlp", (("depth", 2), ("in_dim", 4), ("width", 4)), 4, (4,), "rezero")
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    tm.build_step(step)
    assert torch.equal(torch.rand(3), want)


def test_time_step_is_the_median_of_the_timed_steps(monkeypatch):
    ticks = iter([0.0, 1.0, 1.0, 3.0, 3.0, 3.5, 3.5, 7.5])  # warm-up 1 s; steps 2, 0.5, 4 s
    monkeypatch.setattr(tm.time, "perf_counter", lambda: next(ticks))
    step = tm.Step("mlp", (("depth", 2), ("in_dim", 4), ("width", 4)), 4, (4,), "rezero")
    assert tm.time_step(step, repeats=3, warmup=1) == 2.0


def test_each_network_is_timed_once_and_cells_scale_by_their_steps(monkeypatch):
    timed: list[tm.Step] = []

    def fake(step, repeats, warmup):
        timed.append(step)
        return 0.25 * dict(step.sizes)["depth"]

    monkeypatch.setattr(tm, "time_step", fake)
    exp, cells = _cells("depth-sweep", "smoke", device="cpu")
    clock = tm.StepTimes()
    got = [clock.seconds(exp, c) for c in cells]
    steps = [tm.cell_step(exp, c) for c in cells]
    assert len(timed) == len(set(timed)) == len(set(steps)) < len(cells)
    for s, c, g in zip(steps, cells, got, strict=True):
        assert g == pytest.approx(tm.cell_steps(c) * 0.25 * dict(s.sizes)["depth"])


def test_plan_with_measure_adds_the_timed_cells_up_and_writes_nothing(monkeypatch, tmp_path):
    monkeypatch.setattr(tm, "time_step", lambda step, repeats, warmup: 0.01 * step.batch)
    lines: list[str] = []
    out = tmp_path / "runs"
    total = runner.plan(
        ["deep-fc", "depth-sweep"], "smoke", {"device": "cpu"}, jobs=2, out=out,
        log=lines.append, measure=True,
    )  # fmt: skip
    want = 0.0
    for name in ("deep-fc", "depth-sweep"):
        exp, cells = _cells(name, "smoke", device="cpu")
        want += sum(tm.cell_steps(c) * 0.01 * c["batch_size"] for c in cells)
    assert total == pytest.approx(want / 2)
    assert not out.exists()
    assert any(s.startswith("  timed mlp ") for s in lines)
    assert "of training steps timed on cpu" in lines[-1]
    assert lines.index(next(s for s in lines if s.startswith("[deep-fc]"))) < lines.index(
        next(s for s in lines if s.startswith("  timed mlp "))
    )
