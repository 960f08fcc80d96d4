"""Scalar gates and biases: the cheap parameters normalization-free schemes add to a block."""

from __future__ import annotations

import torch
from torch import nn


class Gate(nn.Module):
    """Multiply by one scalar ``α``: learnable (SkipInit, ReZero, Fixup's multiplier) or fixed.

    ``y = α · x``. A fixed gate is stored as a buffer, so it is saved but not trained.
    """

    def __init__(self, init: float = 0.0, learnable: bool = True) -> None:
        super().__init__()
        self.init = float(init)
        self.learnable = learnable
        if learnable:
            self.alpha = nn.Parameter(torch.empty(()))
        else:
            self.register_buffer("alpha", torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.alpha.fill_(self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.alpha

    def extra_repr(self) -> str:
        return f"init={self.init:g}, learnable={self.learnable}"


class Bias(nn.Module):
    """Add one learnable scalar ``b`` (init 0): Fixup's scalar biases, ``y = x + b``."""

    def __init__(self, init: float = 0.0) -> None:
        super().__init__()
        self.init = float(init)
        self.bias = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.bias.fill_(self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.bias

    def extra_repr(self) -> str:
        return f"init={self.init:g}"
