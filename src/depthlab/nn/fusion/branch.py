"""Exact rewrites of a residual branch's scalar slots, planned once per module structure.

A :class:`~depthlab.nn.Branch` (an ``nn.Sequential`` of norms, activations, weight layers and
the scalar gates/biases a scheme adds) runs through :func:`run_branch`. Three exact rewrites
remove the activation-sized pass a scalar would cost:

* **after a weight layer**: scalar multipliers and biases (Fixup's ``W h · s + b``; a
  SkipInit/ReZero gate ``α · (W h + c)`` folded in by :class:`~depthlab.nn.Residual`) become an
  affine-transformed weight and bias, ``(W h + c)·s + b = (s·W) h + (s·c + b)``;
* **before a linear layer or an unpadded conv, after a ReLU**: ``W(h + b) = W h + b·ΣW``
  (the sum over each output's weights; Fixup's bias before a 1×1 conv or a linear layer).
  Before a zero-padded conv this would hold only with the padding filled with ``-b``; a
  ReLU writing into such a padded buffer was built and measured slower than the add it
  saves (strided border writes and a strided ReLU backward);
* **after a ReLU that follows a weight layer** (otherwise; CPU only, since it reads ``b``
  as a Python number): ``relu(z) + b = threshold(z + b, b, b)``, with ``b`` joining the
  layer's bias (detached) and its gradient ``Σ grad`` returned by the threshold
  (:class:`_ReluShifted`; Fixup's bias before the second 3×3 conv). A ``clamp`` at a tensor
  ``b`` would do the same with autograd, but its backward is several times slower.

Each costs a weight-sized op instead of an activation-sized one, and the biases ride free
inside the conv/GEMM. Which rewrite applies where depends only on the module types and
paddings, so it is planned once (:func:`plan_branch`) and cached on the branch until its modules
change; what can change between calls is checked per call: hooks (a hooked module is always
called as a module, so hooks see exactly what an ``nn.Sequential`` would give them), whether a
weight is larger than its output (then scaling or summing it would cost more than it saves),
the device (the threshold rewrite is CPU-only) and ``torch.func`` transforms (a custom autograd
Function has no vmap rule). The result is the same function, parameters and gradients (up to
floating-point rounding, and except exactly at ReLU kinks); the module structure (state-dict
keys, ``weight_layers``) is unchanged. ``depthlab.nn.fusion(False)`` runs every branch module
by module.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from depthlab.nn.conv import Conv2d
from depthlab.nn.fusion.switch import blocked, compiling, hooked, transformed
from depthlab.nn.scalars import Bias, Gate

#: layer types whose forward is exactly ``F.linear``/``Conv._conv_forward`` (subclasses with their
#: own forward — e.g. weight-standardized layers — are never fused; :class:`Conv2d` only changes
#: how ``_conv_forward`` computes the same function)
FUSABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, Conv2d, nn.Conv3d)


class Call(NamedTuple):
    """Call ``mods[start:stop]`` as modules."""

    start: int
    stop: int


class ReluBias(NamedTuple):
    """A ReLU at ``relu`` then scalar biases up to ``layer``, deferred into the weight layer at
    ``layer`` (``W(h + b) = W h + b·ΣW``)."""

    relu: int
    layer: int


class Layer(NamedTuple):
    """The weight layer at ``index`` with the scalar gates/biases up to ``stop`` folded in;
    ``shift_stop > 0``: the ReLU at ``stop`` and the biases up to ``shift_stop`` run as one
    threshold (``relu(z) + b``). ``last``: the layer ends the branch (the caller's scale folds
    in too)."""

    index: int
    stop: int
    shift_stop: int
    last: bool


Step = Call | ReluBias | Layer


def _fusable(m: nn.Module | None) -> bool:
    return type(m) in FUSABLE


def _unpadded(layer: nn.Module) -> bool:
    """True for a linear layer or a convolution without padding: there ``W(h + b) = W h + b·ΣW``
    holds exactly (a zero-padded conv would need its padding filled with ``-b``)."""
    if isinstance(layer, nn.Linear):
        return True
    pad = layer.padding
    return pad == "valid" or (not isinstance(pad, str) and not any(pad))


def _bias_end(mods: list[nn.Module], i: int) -> int:
    """The end of the run of :class:`Bias` modules starting at ``i``."""
    while i < len(mods) and type(mods[i]) is Bias:
        i += 1
    return i


def plan_branch(mods: list[nn.Module]) -> tuple[Step, ...]:
    """The steps that run ``mods`` in order, each rewrite placed where the module types allow it
    (see the module docstring); the checks that depend on the call are left to the run."""
    steps: list[Step] = []
    i, n = 0, len(mods)
    while i < n:
        m = mods[i]
        if type(m) is nn.ReLU:
            k = _bias_end(mods, i + 1)
            if k > i + 1 and k < n and _fusable(mods[k]) and _unpadded(mods[k]):
                steps.append(ReluBias(i, k))
                i = k
                continue
        if _fusable(m):
            j = i + 1
            while j < n and type(mods[j]) in (Gate, Bias):
                j += 1
            shift_stop = 0
            if j < n and type(mods[j]) is nn.ReLU:
                k = _bias_end(mods, j + 1)
                nxt = mods[k] if k < n else None
                if k > j + 1 and not (_fusable(nxt) and _unpadded(nxt)):  # (else folded there)
                    shift_stop = k
            steps.append(Layer(i, j, shift_stop, j == n))
            i = shift_stop or j
            continue
        steps.append(Call(i, i + 1))
        i += 1
    return tuple(steps)


def _plan(branch: nn.Sequential, mods: list[nn.Module]) -> tuple[Step, ...]:
    """The cached plan of ``branch`` (re-planned when its modules change)."""
    key = tuple(map(id, mods))
    cached = branch.__dict__.get("_fusion_plan")
    if cached is None or cached[0] != key:
        cached = (key, plan_branch(mods))
        branch.__dict__["_fusion_plan"] = cached
    return cached[1]


class _ReluShifted(torch.autograd.Function):
    """``relu(z) + b`` from ``y = z + b`` in one pass: ``threshold(y, b, b)`` (``y`` where
    ``y > b``, else ``b``). Bit-identical to the ReLU and the add in the forward pass. ``b``
    reaches ``y`` detached (through the preceding layer's bias), so its whole gradient,
    ``Σ grad``, is returned here, exactly what the add would give it."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        level = b.item()
        out = F.threshold(y, level, level)
        ctx.save_for_backward(out)
        ctx.level = level
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (out,) = ctx.saved_tensors
        grad_y = torch.ops.aten.threshold_backward(grad, out, ctx.level)
        grad_b = grad.sum() if ctx.needs_input_grad[1] else None
        return grad_y, grad_b


def _out_numel(layer: nn.Module, x: torch.Tensor) -> int:
    """About the number of outputs of ``layer`` on ``x`` (exact for linear and stride-1 convs;
    an upper bound for strided ones), to weigh weight-sized against output-sized work."""
    if isinstance(layer, nn.Linear):
        return x.numel() // max(x.shape[-1], 1) * layer.out_features
    return x.numel() // max(x.shape[1], 1) * layer.out_channels


def _bias_sum(biases: list[nn.Module]) -> torch.Tensor:
    total = biases[0].bias
    for m in biases[1:]:
        total = total + m.bias
    return total


def _affine(scalars: list[nn.Module], scale: torch.Tensor | None):
    """Compose ``z ↦ z·mult + add`` from a run of Gate (``·α``) and Bias (``+b``) modules,
    followed by an optional extra multiplier ``scale``. ``None`` stands for 1 (mult) or 0 (add)."""
    mult = add = None
    for m in scalars:
        if isinstance(m, Gate):
            mult = m.alpha if mult is None else mult * m.alpha
            add = None if add is None else add * m.alpha
        else:
            add = m.bias if add is None else add + m.bias
    if scale is not None:
        mult = scale if mult is None else mult * scale
        add = None if add is None else add * scale
    return mult, add


def _fused_layer(
    m: nn.Module,
    scalars: list[nn.Module],
    scale: torch.Tensor | None,
    x: torch.Tensor,
    pre: torch.Tensor | None,
    shift: torch.Tensor | None,
) -> torch.Tensor | None:
    """``m(x + pre)·scalars·scale (+ shift.detach())`` as one layer call, or None when the
    weight is larger than the output."""
    mult, add = _affine(scalars, scale)
    if shift is not None:
        add = shift.detach() if add is None else add + shift.detach()
    weight, bias = m.weight, m.bias
    if (mult is not None or pre is not None) and weight.numel() > _out_numel(m, x):
        return None
    if mult is not None:
        weight = weight * mult
        bias = None if bias is None else bias * mult
    if pre is not None:  # W(h + b) = W h + b·ΣW
        pre_out = weight.sum(dim=tuple(range(1, weight.dim()))) * pre
        bias = pre_out if bias is None else bias + pre_out
    if add is not None:
        bias = add.expand(weight.shape[0]) if bias is None else bias + add
    if isinstance(m, nn.Linear):
        return F.linear(x, weight, bias)
    return m._conv_forward(x, weight, bias)


def _calls(mods: list[nn.Module], x: torch.Tensor) -> torch.Tensor:
    for m in mods:
        x = m(x)
    return x


def _finish(x: torch.Tensor, scale: torch.Tensor | None, skip: torch.Tensor | None):
    if skip is None:
        return x if scale is None else x * scale
    return skip + x if scale is None else torch.addcmul(skip, x, scale)


def run_branch(
    branch: nn.Sequential,
    x: torch.Tensor,
    scale: torch.Tensor | None = None,
    skip: torch.Tensor | None = None,
) -> torch.Tensor:
    """``skip + scale·branch(x)`` (``skip``/``scale`` None: left out), with the planned rewrites
    where this call allows them (see the module docstring)."""
    mods = list(branch._modules.values())
    if blocked() or compiling():
        return _finish(_calls(mods, x), scale, skip)
    pre = None  # a bias deferred into the next weight layer
    for step in _plan(branch, mods):
        if type(step) is Call:
            x = _calls(mods[step.start : step.stop], x)
        elif type(step) is ReluBias:
            run = mods[step.relu : step.layer + 1]
            layer = run[-1]
            if any(hooked(m) for m in run) or layer.weight.numel() > _out_numel(layer, x):
                x = _calls(run[:-1], x)  # the layer is the next step's
            else:
                x, pre = torch.relu(x), _bias_sum(run[1:-1])
        else:
            end = step.shift_stop or step.stop
            run = mods[step.index : end]
            m, scalars = run[0], mods[step.index + 1 : step.stop]
            shift = None
            if step.shift_stop and x.device.type == "cpu" and not transformed():
                shift = _bias_sum(mods[step.stop + 1 : step.shift_stop])
            y = None
            if not any(hooked(u) for u in run) and (
                scalars or (step.last and scale is not None) or pre is not None or shift is not None
            ):
                y = _fused_layer(m, scalars, scale if step.last else None, x, pre, shift)
            if y is None:  # module by module (a deferred bias is added back first)
                x = _calls(run, x if pre is None else x + pre)
            else:
                if step.last:
                    scale = None
                x = (
                    _calls(mods[step.stop : end], y)
                    if shift is None
                    else _ReluShifted.apply(y, shift)
                )
            pre = None
    return _finish(x, scale, skip)
