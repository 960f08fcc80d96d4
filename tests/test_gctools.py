"""The cyclic collector kept off model building and the training loop (depthlab.gctools)."""

from __future__ import annotations

import functools
import gc
import sys

import pytest

import depthlab as dl
from depthlab.gctools import LOOP_FULL_EVERY, frozen, paused
from depthlab.train import TrainConfig


@pytest.fixture(autouse=True)
def _collector_restored():
    """Each test starts and ends with the collector on, nothing frozen and its thresholds."""
    thresholds = gc.get_threshold()
    gc.enable()
    gc.unfreeze()
    yield
    gc.enable()
    gc.unfreeze()
    gc.set_threshold(*thresholds)


def test_paused_turns_the_collector_off_and_back_on():
    with paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_paused_leaves_a_disabled_collector_disabled_and_restores_on_error():
    gc.disable()
    with paused():
        assert not gc.isenabled()
    assert not gc.isenabled()
    gc.enable()
    with pytest.raises(ValueError), paused():
        raise ValueError("boom")
    assert gc.isenabled()


def test_frozen_freezes_what_exists_and_unfreezes_after():
    before = [object() for _ in range(3)] + [[]]  # a tracked container made before
    with frozen():
        assert gc.get_freeze_count() > 0
        assert not any(before[-1] is o for o in gc.get_objects())  # frozen: not scanned
    assert gc.get_freeze_count() == 0
    assert any(before[-1] is o for o in gc.get_objects())


def _full_collections(make) -> int:
    """How many full (generation-2) collections run while ``make()`` runs."""
    full = []

    def cb(phase, info):
        if phase == "start" and info["generation"] == 2:
            full.append(1)

    gc.callbacks.append(cb)
    try:
        make()
    finally:
        gc.callbacks.remove(cb)
    return len(full)


def test_frozen_makes_full_collections_rare_and_restores_the_thresholds():
    # more new survivors than the process's tracked objects (≥ 10⁶: ~1,400 young collections),
    # so that CPython's quarter rule would let full collections run on any host
    n = max(500_000, len(gc.get_objects()) // 2)

    def survivors():
        junk = [[[i]] for i in range(n)]
        del junk

    gc.set_threshold(700, 10, 10)
    if sys.version_info < (3, 14):  # (3.14's incremental collector has no such threshold)
        assert _full_collections(survivors) > 0  # CPython's thresholds: full collections run
    with frozen():
        assert gc.get_threshold() == (700, 10, LOOP_FULL_EVERY)
        assert _full_collections(survivors) == 0
    assert gc.get_threshold() == (700, 10, 10)
    gc.set_threshold(700, 10, 5000)  # a caller's higher threshold is kept
    with pytest.raises(ValueError), frozen():
        assert gc.get_threshold() == (700, 10, 5000)
        raise ValueError("boom")
    assert gc.get_threshold() == (700, 10, 5000) and gc.get_freeze_count() == 0


def test_frozen_leaves_a_callers_freeze_alone():
    gc.freeze()
    gc.set_threshold(700, 10, 10)
    count = gc.get_freeze_count()
    late = [[]]  # made after the caller's freeze: not frozen by the block either
    with frozen():
        assert gc.get_freeze_count() == count
        assert gc.get_threshold() == (700, 10, 10)
        assert any(late[0] is o for o in gc.get_objects())
    assert gc.get_freeze_count() == count


def test_create_model_builds_with_the_collector_off_and_turns_it_back_on(monkeypatch):
    seen = []
    real = dl.models.MODELS.get("mlp").__init__

    @functools.wraps(real)  # keeps the signature create_model checks options against
    def spy(self, *args, **kwargs):
        seen.append(gc.isenabled())
        real(self, *args, **kwargs)

    monkeypatch.setattr(dl.models.MODELS.get("mlp"), "__init__", spy)
    dl.create_model("mlp", depth=3, width=8, in_dim=64)
    assert seen == [False]
    assert gc.isenabled()


def test_training_loop_runs_with_the_model_frozen_and_unfreezes_after():
    model = dl.create_model("mlp", depth=4, width=16, in_dim=64, scheme="rezero")
    weight = next(model.parameters())
    seen = []

    def cb(step, m, hist):
        ids = {id(o) for o in gc.get_objects()}
        frozen_now = gc.get_freeze_count() > 0 and gc.get_threshold()[2] >= LOOP_FULL_EVERY
        seen.append((frozen_now, id(m) in ids, id(weight) in ids))

    hist = dl.train(
        model, "digits", TrainConfig(steps=6, eval_every=3, batch_size=16), callbacks=[cb]
    )
    assert len(hist.records) > 0 and seen
    assert all(s == (True, False, False) for s in seen)  # frozen: neither is scanned
    assert gc.get_freeze_count() == 0 and gc.isenabled()
    assert any(o is model for o in gc.get_objects())
