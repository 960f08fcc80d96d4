"""The one switch for every fused path, and the observers that turn fusion off by themselves."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn
from torch.nn.modules import module as _module

_ENABLED = True


def enabled() -> bool:
    """Whether fused paths may run (the :func:`fusion` switch; True by default)."""
    return _ENABLED


@contextmanager
def fusion(enabled: bool = True) -> Iterator[None]:
    """``with depthlab.nn.fusion(False):`` runs every model module by module — no fused branch
    rewrites, no folded gates, no fused stacks, no concatenated attention projections — and
    restores the previous setting on exit (``fusion(True)`` turns it back on inside). The
    function, parameters and gradients are the same either way, up to floating-point rounding;
    this is the reference the tests compare the fused paths with. Process-wide (not per
    thread)."""
    global _ENABLED
    previous = _ENABLED
    _ENABLED = bool(enabled)
    try:
        yield
    finally:
        _ENABLED = previous


def hooked(module: nn.Module) -> bool:
    """True when calling ``module`` would run hooks (then it must be called, never fused).
    Reads the hook dicts directly: this runs for every module of every block per forward."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def global_hooks() -> bool:
    """True when a global module hook is installed (it must see every module call)."""
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or getattr(_module, "_global_backward_pre_hooks", None)
    )


def blocked() -> bool:
    """True when nothing may be fused now: the switch is off or a global hook is installed."""
    return not _ENABLED or global_hooks()


def compiling() -> bool:
    """True while ``torch.compile`` traces: its compiler fuses the pointwise ops by itself, and the
    per-module caches keyed on object identity that the eager rewrites use would make Dynamo
    guard on every block's identity (one recompilation per block, not one graph per block
    shape)."""
    fn = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    return bool(fn is not None and fn())


def transformed() -> bool:
    """True inside ``torch.func`` transforms (vmap, jacrev, ...), which a custom autograd Function
    without a vmap rule cannot run under, or while ``torch.compile`` traces (it fuses the ReLU
    and the add by itself, and ``Tensor.item`` would break its graph)."""
    if compiling():
        return True
    try:
        return bool(torch._C._are_functorch_transforms_active())
    except AttributeError:  # pragma: no cover - older torch
        return True


def autocasting() -> bool:
    """True inside ``torch.autocast`` for any device type (it picks dtypes per op, which a
    hand-written backward does not)."""
    for device in ("cpu", "cuda", "xpu", "mps"):
        try:
            if torch.is_autocast_enabled(device):
                return True
        except (TypeError, RuntimeError):  # torch < 2.4 has no device argument
            return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
    return False


def forward_ad() -> bool:
    """True inside ``torch.autograd.forward_ad.dual_level`` (a custom autograd Function without
    a forward-mode rule cannot run there)."""
    return getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0
