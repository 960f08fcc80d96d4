"""The residual wrapper every depthlab model is built from."""

from __future__ import annotations

import torch
from torch import nn


class Residual(nn.Module):
    """``y = post(skip_mult · shortcut(x) + gate(branch(x)))``.

    * ``branch``: the residual function f (its norms, biases and multipliers come from a scheme).
    * ``gate``: the scalar on the branch (SkipInit/ReZero α), or ``None`` for 1.
    * ``skip_mult``: the constant on the skip path (1; DeepNorm's α; 1/√2 for ``scaled``; 0 turns
      the skip off entirely, which is how ``noskip`` builds a plain feed-forward stack).
    * ``shortcut``: a projection when shapes change (strided 1×1 conv), else the identity.
    * ``post``: a norm after the sum (Post-LN, DeepNorm), else the identity.

    The attributes ``branch``, ``gate``, ``shortcut`` and ``post`` are what diagnostics hook and
    what schemes re-initialise; ``num_layers`` (m, the weight layers in the branch) is what Fixup
    reads.
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
        out = self.branch(x)
        if self.gate is not None:
            out = self.gate(out)
        if self.skip_mult != 0.0:
            s = self.skip(x)
            out = s + out if self.skip_mult == 1.0 else torch.add(out, s, alpha=self.skip_mult)
        if self.post is not None:
            out = self.post(out)
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
