"""The residual wrapper every depthlab model is built from, and the branch container."""

from __future__ import annotations

import torch
from torch import nn

from depthlab.nn.fusion.branch import run_branch
from depthlab.nn.fusion.switch import blocked, global_hooks, hooked
from depthlab.nn.scalars import Gate, Scale


class Branch(nn.Sequential):
    """``nn.Sequential`` for residual branches, with the scalar slots fused into weight layers.

    ``forward(x, scale=None, skip=None)`` is ``skip + scale·f(x)`` (each left out when None),
    run by :func:`depthlab.nn.fusion.branch.run_branch`: Fixup's scalar multipliers and biases
    and a folded gate become part of the weight layers' weights and biases (exact rewrites,
    planned once per module structure; see that module). Hooked modules are called as modules;
    ``depthlab.nn.fusion(False)`` runs the branch module by module.
    """

    def forward(
        self, x: torch.Tensor, scale: torch.Tensor | None = None, skip: torch.Tensor | None = None
    ) -> torch.Tensor:
        return run_branch(self, x, scale, skip)


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

    def branch_unused(self) -> bool:
        """True when the branch cannot reach the output: a *fixed* gate α = 0 (the frozen-gate
        controls) and a constant skip, with no hook on the block or inside it. The block is then
        ``post(c·shortcut(x))`` and its forward leaves the branch out: the same output and
        gradients, none of the work (its BatchNorm running statistics, which cannot reach the
        output, are left as they are). Only for a gate on the CPU: reading α from a GPU would
        wait for it."""
        gate = self.gate
        if not (
            type(gate) is Gate
            and not gate.learnable
            and type(self.skip_scale) is Scale
            and gate.alpha.device.type == "cpu"
            and float(gate.alpha) == 0.0
        ):
            return False
        return not (global_hooks() or any(hooked(m) for m in self.modules()))

    def is_identity(self) -> bool:
        """True when the block is exactly ``y = x`` whatever its branch computes: an unused
        branch (:meth:`branch_unused`), an identity skip and no post-sum norm. A
        :class:`~depthlab.models.common.BlockStack` then skips the block."""
        gate = self._modules.get("gate")  # (asked of every block per forward: the common
        if type(gate) is not Gate or gate.learnable:  # case, a learnable gate or none, first)
            return False
        return (
            self.skip_mult == 1.0
            and self.shortcut is None
            and self.post is None
            and self.branch_unused()
        )

    def skip(self, x: torch.Tensor) -> torch.Tensor:
        """The skip path entering the sum (before ``skip_mult``)."""
        return x if self.shortcut is None else self.shortcut(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, branch, post = self.gate, self.branch, self.post
        if type(gate) is Gate and not gate.learnable and self.branch_unused():
            mult = self.skip_scale.value
            out = self.skip(x)
            out = out if mult == 1.0 else out * mult
            return out if post is None else post(out)
        skip = self.skip_scale
        const = type(skip) is Scale and not hooked(skip)
        mult = skip.value if const else None
        one_skip = mult == 1.0 and self.shortcut is None
        if (
            type(gate) is Gate
            and isinstance(branch, Branch)
            and not (hooked(gate) or hooked(branch) or blocked())
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
