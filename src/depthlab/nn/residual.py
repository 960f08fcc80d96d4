"""The residual wrapper every depthlab model is built from, and the branch container."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as _module

from depthlab.nn.scalars import Bias, Gate

#: layer types whose forward is exactly ``F.linear``/``Conv._conv_forward`` (subclasses with their
#: own forward are never fused)
_FUSABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def _hooked(module: nn.Module) -> bool:
    """True when calling ``module`` would run hooks (then it must be called, never fused)."""
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or getattr(module, "_backward_pre_hooks", None)
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


class Branch(nn.Sequential):
    """``nn.Sequential`` for residual branches, with the scalar slots fused into weight layers.

    A weight layer followed by scalar multipliers and biases (Fixup's ``W h · s + b``; a
    SkipInit/ReZero gate ``α · (W h + c)`` folded in by :class:`Residual`) is computed as one
    layer call with an affine-transformed weight and bias,

        ``(W h + c) · s + b  =  (s·W) h + (s·c + b·1)``,

    which costs one weight-sized op instead of one activation-sized op per scalar (and the bias is
    free inside the conv/GEMM). The result is the same function, parameters and gradients; the
    module structure (state-dict keys, ``weight_layers``) is unchanged. Whenever a module involved
    has hooks (diagnostics, dropout on branch outputs), it is called as a module instead, so hooks
    see exactly what an ``nn.Sequential`` would give them.
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
        while i < n:
            m = mods[i]
            j = i + 1
            can = fuse and type(m) in _FUSABLE and not _hooked(m)
            if can:
                while j < n and type(mods[j]) in (Gate, Bias) and not _hooked(mods[j]):
                    j += 1
            last = j == n
            scalars = tuple(mods[i + 1 : j])
            if can and (scalars or (last and scale is not None)):
                y = self._fused(m, scalars, scale if last else None, x)
                if y is not None:
                    x = y
                    if last:
                        scale = None
                    i = j
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
        m: nn.Module, scalars: tuple[nn.Module, ...], scale: torch.Tensor | None, x: torch.Tensor
    ) -> torch.Tensor | None:
        """``m`` then ``scalars`` then ``·scale`` as one layer call, or None when the weight is
        larger than the output (then scaling the weight would cost more than it saves)."""
        mult, add = _affine(scalars, scale)
        weight, bias = m.weight, m.bias
        if mult is not None:
            out_numel = x.numel() // max(x.shape[-1 if isinstance(m, nn.Linear) else 1], 1)
            out_numel *= m.out_features if isinstance(m, nn.Linear) else m.out_channels
            if weight.numel() > out_numel:
                return None
            weight = weight * mult
            bias = None if bias is None else bias * mult
        if add is not None:
            n_out = weight.shape[0]
            bias = add.expand(n_out) if bias is None else bias + add
        if isinstance(m, nn.Linear):
            return F.linear(x, weight, bias)
        return m._conv_forward(x, weight, bias)


class Residual(nn.Module):
    """``y = post(skip_mult · shortcut(x) + gate(branch(x)))``.

    * ``branch``: the residual function f (its norms, biases and multipliers come from a scheme).
    * ``gate``: the scalar on the branch (SkipInit/ReZero α), or ``None`` for 1.
    * ``skip_mult``: the constant on the skip path (1; DeepNorm's α; 1/√2 for ``scaled``; 0 turns
      the skip off entirely, which is how ``noskip`` builds a plain feed-forward stack).
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
        skip_mult: float = 1.0,
        shortcut: nn.Module | None = None,
        post: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.branch = branch
        self.gate = gate
        self.skip_mult = float(skip_mult)
        self.shortcut = shortcut
        self.post = post

    @property
    def has_skip(self) -> bool:
        return self.skip_mult != 0.0

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The skip path entering the sum (before ``skip_mult``)."""
        return x if self.shortcut is None else self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, branch, post = self.gate, self.branch, self.post
        one_skip = self.skip_mult == 1.0 and self.shortcut is None
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
        if self.skip_mult != 0.0:
            s = self.skip(x)
            out = s + out if self.skip_mult == 1.0 else torch.add(out, s, alpha=self.skip_mult)
        if post is not None:
            out = post(out)
        return out

    def extra_repr(self) -> str:
        return f"skip_mult={self.skip_mult:g}"


def residual_blocks(model: nn.Module) -> list[Residual]:
    """Every :class:`Residual` in ``model``, in forward (registration) order."""
    return [m for m in model.modules() if isinstance(m, Residual)]


def weight_layers(module: nn.Module) -> list[nn.Module]:
    """The conv and linear layers of ``module`` in registration order."""
    kinds = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
    return [m for m in module.modules() if isinstance(m, kinds)]
