"""Python's cyclic garbage collector kept off the hot paths of very deep models.

A 10,000-layer model is ~10⁵ Python objects (modules, their dicts, parameters). CPython's
collector runs a *full* collection — a scan of every tracked object — at every tenth collection
of its middle generation once the objects promoted to the old generation since the last full one
exceed a quarter of those it scanned then. Two places in depthlab meet that condition over and
over:

* **building** the model (every new module is a survivor): building a 10,000-layer width-64 MLP
  took 3.8 s with the collector on and 2.6 s with it paused (``benchmarks/bench_gc.py``);
* **training** a fused MLP stack (:mod:`depthlab.nn.fusion.stack`): its forward pass keeps one
  tensor per block for the backward pass, ~10⁴ short-lived objects that outlive the young
  collections, so a full collection (≈ 0.4–0.5 s at 10,000 layers) runs every few steps of
  ≈ 1.2–2 s.

:func:`paused` turns the collector off while a model is built (:func:`depthlab.create_model`);
the cycles made meanwhile are collected once it is back on. :func:`frozen` moves every object
that exists when a training loop starts (the model, its optimizer state) into the collector's
permanent generation (``gc.freeze()``) for the loop's duration, so that the full collections the
loop still triggers scan only the objects made since. Those still ran every step or two (the
quarter rule above compares the step's survivors with an old generation that freezing emptied:
≈ 70 full collections of ≈ 0.07 s in 100 steps of a 10,000-layer ReZero MLP), and each found
nothing to free — a step's tensors are freed by their reference counts. So inside the block a
full collection also waits for :data:`LOOP_FULL_EVERY` middle-generation collections instead of
CPython's 10; the young collections, which reclaim the step's cycles, run as before. Neither
changes what is computed.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager

#: middle-generation collections between full ones inside :func:`frozen` (CPython's default: 10)
LOOP_FULL_EVERY = 1000


@contextmanager
def paused() -> Iterator[None]:
    """The cyclic collector off inside the block, back on after it if it was on."""
    was_on = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_on:
            gc.enable()


@contextmanager
def frozen() -> Iterator[None]:
    """``gc.freeze()`` inside the block and ``gc.unfreeze()`` after it, and full collections
    at most every :data:`LOOP_FULL_EVERY` middle-generation ones (the thresholds restored
    after) — unless objects were already frozen when it began (a caller's own freeze and
    thresholds are left as they are, and nothing is changed here)."""
    if gc.get_freeze_count():
        yield
        return
    thresholds = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(*thresholds[:2], max(thresholds[2], LOOP_FULL_EVERY))
    try:
        yield
    finally:
        gc.set_threshold(*thresholds)
        gc.unfreeze()
