"""The residual wrapper every depthlab model is built from, and the branch container."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from depthlab.nn.scalars import Bias, Gate, Scale

#: layer types whose forward is exactly ``F.linear``/``Conv._conv_forward`` (subclasses with their
#: own forward are never fused)
_FUSABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _hooked(module: nn.Module) -> bool:
    """True when calling ``module`` would run hooks (then it must be called, never fused).
    Reads the hook dicts directly: this runs for every module of every block per forward."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
    )


def _global_hooks() -> bool:
    return bool(
        _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or getattr(_module, "_global_backward_pre_hooks", None)
    )


def _affine(scalars: tuple[nn.Module, ...], scale: torch.Tensor | None):
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


def _bias_run(mods: list[nn.Module], i: int) -> int:
    """The end of the run of unhooked :class:`Bias` modules starting at ``i``."""
    while i < len(mods) and type(mods[i]) is Bias and not _hooked(mods[i]):
        i += 1
    return i


def _bias_sum(biases: list[nn.Module]) -> torch.Tensor:
    total = biases[0].bias
    for m in biases[1:]:
        total = total + m.bias
    return total


def _transformed() -> bool:
    """True inside ``torch.func`` transforms (vmap, jacrev, ...), which a custom autograd Function
    without a vmap rule cannot run under, or while ``torch.compile`` traces (it fuses the ReLU
    and the add by itself, and ``Tensor.item`` would break its graph)."""
    compiling = getattr(getattr(torch, "compiler", None), "is_compiling", None)
    if compiling is not None and compiling():
        return True
    try:
        return bool(torch._C._are_functorch_transforms_active())
    except AttributeError:  # pragma: no cover - older torch
        return True


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


def _unpadded(layer: nn.Module) -> bool:
    """True for a linear layer or a convolution without padding: there ``W(h + b) = W h + b·ΣW``
    holds exactly (a zero-padded conv would need its padding filled with ``-b``)."""
    if isinstance(layer, nn.Linear):
        return True
    pad = layer.padding
    return pad == "valid" or (not isinstance(pad, str) and not any(pad))


class Branch(nn.Sequential):
    """``nn.Sequential`` for residual branches, with the scalar slots fused into weight layers.

    Three exact rewrites remove the activation-sized pass a scalar would cost:

    * **after a weight layer**: scalar multipliers and biases (Fixup's ``W h · s + b``; a
      SkipInit/ReZero gate ``α · (W h + c)`` folded in by :class:`Residual`) become an
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
    inside the conv/GEMM. The result is the same function, parameters and gradients (up to
    floating-point rounding, and except exactly at ReLU kinks); the module structure (state-dict
    keys, ``weight_layers``) is unchanged. Whenever a module involved has hooks (diagnostics,
    dropout on branch outputs), it is called as a module instead, so hooks see exactly what an
    ``nn.Sequential`` would give them; inside ``torch.func`` transforms the threshold rewrite
    is skipped (a custom autograd Function has no vmap rule).
    """

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``x`` through the modules in order; ``scale`` (a scalar tensor) multiplies the output;
        ``skip``, when given, is added to the result (``skip + scale·f(x)``, one ``addcmul``
        when the scale could not be folded into a weight)."""
        mods = list(self._modules.values())
        fuse = not _global_hooks()
        i, n = 0, len(mods)
        pre = None  # a bias deferred into the next weight layer
        while i < n:
            m = mods[i]
            free = fuse and not _hooked(m)
            if free and pre is None and type(m) is nn.ReLU:
                k = _bias_run(mods, i + 1)
                layer = mods[k] if k < n else None
                if (
                    k > i + 1
                    and type(layer) in _FUSABLE
                    and not _hooked(layer)
                    and _unpadded(layer)
                    and layer.weight.numel() <= _out_numel(layer, x)
                ):
                    x, pre, i = torch.relu(x), _bias_sum(mods[i + 1 : k]), k
                    continue
            j = i + 1
            can = free and type(m) in _FUSABLE
            shift = None  # a bias after the ReLU that follows this layer (relu(z) + b)
            if can:
                while j < n and type(mods[j]) in (Gate, Bias) and not _hooked(mods[j]):
                    j += 1
                if j < n and type(mods[j]) is nn.ReLU and not _hooked(mods[j]):
                    k = _bias_run(mods, j + 1)
                    nxt = mods[k] if k < n else None
                    if (
                        k > j + 1
                        and x.device.type == "cpu"  # b.item() would synchronise a GPU
                        and not (type(nxt) in _FUSABLE and _unpadded(nxt))  # (folded there)
                        and not _transformed()
                    ):
                        shift, shift_end = _bias_sum(mods[j + 1 : k]), k
            last = j == n
            scalars = tuple(mods[i + 1 : j])
            if can and (
                scalars or (last and scale is not None) or pre is not None or shift is not None
            ):
                y = self._fused(m, scalars, scale if last else None, x, pre, shift)
                if y is not None:
                    x, pre = y, None
                    if last:
                        scale = None
                    i = j
                    if shift is not None:
                        x, i = _ReluShifted.apply(x, shift), shift_end
                    continue
            x = m(x)
            for extra in scalars:
                x = extra(x)
            i = j
        if skip is None:
            return x if scale is None else x * scale
        return skip + x if scale is None else torch.addcmul(skip, x, scale)

    @staticmethod
    def _fused(
        m: nn.Module,
        scalars: tuple[nn.Module, ...],
        scale: torch.Tensor | None,
        x: torch.Tensor,
        pre: torch.Tensor | None = None,
        shift: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """``m(x + pre)·scalars·scale (+ shift.detach())`` as one layer call, or None when the
        weight is larger than the output (then scaling or summing the weight would cost more
        than it saves; the caller only passes a ``pre`` for layers where it is not)."""
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


class Residual(nn.Module):
    """``y = post(skip_scale(shortcut(x)) + gate(branch(x)))``.

    * ``branch``: the residual function f (its norms, biases and multipliers come from a scheme).
    * ``gate``: the scalar on the branch (SkipInit/ReZero α), or ``None`` for 1.
    * ``skip``: the module on the skip path, kept as ``skip_scale``: a number c is a constant
      :class:`~depthlab.nn.Scale` (1; DeepNorm's α; 1/√2 for ``scaled``; 0 turns the skip off
      entirely, which is how ``noskip`` builds a plain feed-forward stack), or any module (Admin's
      learnable per-feature ω, :class:`~depthlab.nn.FeatureScale`). ``skip_mult`` reads c back
      (None for a skip module that is not a constant).
    * ``shortcut``: a projection when shapes change (strided 1×1 conv), else the identity.
    * ``post``: a norm after the sum (Post-LN, DeepNorm), else the identity.

    The attributes ``branch``, ``gate``, ``shortcut`` and ``post`` are what diagnostics hook and
    what schemes re-initialise. When ``branch`` is a :class:`Branch` and neither it nor the gate
    has hooks, the gate is folded into the branch's last weight layer (``α·(W h + c) =
    (αW) h + αc``), which saves a full pass over the activations; where the weight is larger
    than the output, the gate and an identity skip are applied together
    (``skip + α·f(x)`` as one ``addcmul``).
    """

    def __init__(
        self,
        branch: nn.Module,
        *,
        gate: nn.Module | None = None,
        skip: nn.Module | float = 1.0,
        shortcut: nn.Module | None = None,
        post: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.branch = branch
        self.gate = gate
        self.skip_scale = skip if isinstance(skip, nn.Module) else Scale(float(skip))
        self.shortcut = shortcut
        self.post = post
        #: where the block sits in an encoder–decoder (a :class:`~depthlab.schemes.Stack`, set by
        #: the scheme for rules that depend on it, e.g. DeepNorm's), else None
        self.stack = None
        #: where the block sits (a :class:`~depthlab.schemes.BlockInfo`, set by the scheme that
        #: built it), else None
        self.info = None

    @property
    def skip_mult(self) -> float | None:
        """The constant on the skip path, or None when the skip module is not a constant."""
        skip = self.skip_scale
        return skip.value if type(skip) is Scale else None

    @property
    def has_skip(self) -> bool:
        return self.skip_mult != 0.0

    def is_identity(self) -> bool:
        """True when the block is exactly ``y = x`` whatever its branch computes: an identity
        skip, no post-sum norm and a *fixed* gate α = 0 (the frozen-gate controls), with no hook
        on it or inside it. A :class:`~depthlab.models.common.BlockStack` then skips the branch:
        the same output, none of the work (its BatchNorm running statistics, which cannot reach
        the output, are left as they are). Only for a gate on the CPU: reading α from a GPU
        would wait for it."""
        gate = self.gate
        if not (
            type(gate) is Gate
            and not gate.learnable
            and self.skip_mult == 1.0
            and self.shortcut is None
            and self.post is None
            and gate.alpha.device.type == "cpu"
            and float(gate.alpha) == 0.0
        ):
            return False
        return not (_global_hooks() or any(_hooked(m) for m in self.modules()))

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The skip path entering the sum (before ``skip_mult``)."""
        return x if self.shortcut is None else self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, branch, post = self.gate, self.branch, self.post
        skip = self.skip_scale
        const = type(skip) is Scale and not _hooked(skip)
        mult = skip.value if const else None
        one_skip = mult == 1.0 and self.shortcut is None
        if (
            type(gate) is Gate
            and isinstance(branch, Branch)
            and not (_hooked(gate) or _hooked(branch) or _global_hooks())
        ):
            if one_skip:  # skip + α·f(x) in one op (addcmul or the fused layer's add)
                out = branch(x, scale=gate.alpha, skip=x)
                return out if post is None else post(out)
            out = branch(x, scale=gate.alpha)  # the gate folded into the branch
        else:
            out = branch(x)
            if gate is not None:
                out = gate(out)
        if not const:
            out = skip(self.skip(x)) + out
        elif mult != 0.0:
            s = self.skip(x)
            out = s + out if mult == 1.0 else torch.add(out, s, alpha=mult)
        if post is not None:
            out = post(out)
        return out


def residual_blocks(model: nn.Module) -> list[Residual]:
    """Every :class:`Residual` in ``model``, in forward (registration) order."""
    return [m for m in model.modules() if isinstance(m, Residual)]


def weight_layers(module: nn.Module) -> list[nn.Module]:
    """The conv and linear layers of ``module`` in registration order."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [m for m in module.modules() if isinstance(m, kinds)]
