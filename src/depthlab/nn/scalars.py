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


class Scale(nn.Module):
    """Multiply by a fixed constant ``c`` (no parameter): the skip path's multiplier of most
    schemes — 1, DeepNorm's α, ``scaled``'s 1/√2, 0 for no skip at all. ``y = c · x``."""

    def __init__(self, value: float = 1.0) -> None:
        super().__init__()
        self.value = float(value)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.value == 1.0 else x * self.value

    def extra_repr(self) -> str:
        return f"{self.value:g}"


class FeatureScale(nn.Module):
    """Multiply each feature (channel) by its own factor ``ω`` (init ``init``): Admin's skip
    multiplier (Liu et al. 2020, arXiv 2004.08249), learnable by default. ``layout`` says where
    the features are: ``"features"``/``"tokens"`` the last dimension, ``"channels"`` dimension 1."""

    def __init__(
        self, num_features: int, layout: str = "features", init: float = 1.0, learnable: bool = True
    ) -> None:
        super().__init__()
        if layout not in ("features", "tokens", "channels"):
            raise ValueError(f"layout must be 'features', 'tokens' or 'channels', got {layout!r}")
        self.num_features, self.layout = int(num_features), layout
        self.init, self.learnable = float(init), learnable
        if learnable:
            self.omega = nn.Parameter(torch.empty(self.num_features))
        else:
            self.register_buffer("omega", torch.empty(self.num_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.omega.fill_(self.init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "channels":
            return x * self.omega.view(-1, *([1] * (x.dim() - 2)))
        return x * self.omega

    def extra_repr(self) -> str:
        return f"{self.num_features}, layout={self.layout!r}, learnable={self.learnable}"
