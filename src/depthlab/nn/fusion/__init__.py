"""Fusion: every place where depthlab runs several modules as fewer operations, behind one switch.

* :mod:`~depthlab.nn.fusion.branch` — exact rewrites inside a residual branch (Fixup's scalars
  and a gate folded into the weight layers), planned once per module structure and cached;
* :mod:`~depthlab.nn.fusion.stack` — a stack of gated linear blocks as a few autograd nodes with
  a hand-written backward (the 10,000-layer MLPs), and SGD taken inside that backward;
* the attention's query/key/value projections as one matrix product
  (:class:`~depthlab.nn.MultiHeadAttention`).

Each computes the same function, parameters and gradients as the modules one by one (up to
floating-point rounding) and steps aside by itself for hooks, ``torch.func`` transforms,
``torch.compile`` tracing and autocast. The public switch::

    with depthlab.nn.fusion(False):   # everything module by module (the reference)
        out = model(x)

and SGD in the backward pass of a fused stack::

    with depthlab.nn.fusion.sgd_in_backward(model.blocks, optimizer):
        loss_fn(model(x), y).backward()   # the stack's weights take optimizer's SGD step here
    optimizer.step()                      # the other parameters
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from depthlab.nn.fusion.switch import enabled, fusion

#: names served from :mod:`~depthlab.nn.fusion.stack` on first use (it imports the residual
#: modules, which import this package)
_STACK = ("SGDInBackward", "plan_stack", "run_stack", "count_fused_nodes", "CHUNK")


def __getattr__(name: str) -> Any:
    if name in _STACK or name == "stack":
        from depthlab.nn.fusion import stack

        return stack if name == "stack" else getattr(stack, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@contextmanager
def sgd_in_backward(stack: Any, optimizer: Any) -> Iterator[Any]:
    """Inside the block, the weight matrices of the fused ``stack`` (a
    :class:`~depthlab.models.common.BlockStack`, e.g. ``model.blocks``) take ``optimizer``'s SGD
    step in the backward pass instead of getting gradients (:class:`SGDInBackward`; an
    ``SGDInBackward`` may be passed instead of the optimizer; None: a no-op). Run the forward
    and ``backward()`` inside, ``optimizer.step()`` after (the stack's weights then have no
    gradient and are skipped). The previous setting is restored on exit."""
    if optimizer is None:
        yield None
        return
    from depthlab.nn.fusion.stack import SGDInBackward

    step = optimizer if isinstance(optimizer, SGDInBackward) else SGDInBackward(optimizer)
    previous = stack.sgd_in_backward
    stack.sgd_in_backward = step
    try:
        yield step
    finally:
        stack.sgd_in_backward = previous


class _CallableModule(types.ModuleType):
    """``depthlab.nn.fusion(False)`` calls :func:`fusion` (the package is the switch)."""

    def __call__(self, enabled: bool = True):
        return fusion(enabled)


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "SGDInBackward",
    "count_fused_nodes",
    "enabled",
    "fusion",
    "plan_stack",
    "run_stack",
    "sgd_in_backward",
]
