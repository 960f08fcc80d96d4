"""Scaled weight standardization, the weight layers of normalization-free ResNets.

Brock, De & Smith 2021, "Characterizing signal propagation to close the performance gap in
unnormalized ResNets" (arXiv 2101.08692), Sec. 4: every weight is standardized over its fan-in,

    Ŵ_ij = g_i · γ · (W_ij − μ_i) / (σ_i √N),

with μ_i, σ_i the mean and (biased) standard deviation of output i's N = fan-in weights, γ the
gain of the nonlinearity before the layer (γ = 1/√Var[σ(z)], z ~ N(0, 1): for ReLU
√(2/(1 − 1/π)) ≈ 1.7129) and g_i a learnable gain (init 1). For a zero-mean input of unit
variance, and γ matching the activation it follows, each output then has unit variance at
initialisation, whatever the raw weights (``σ_i √N`` is floored at √ε, ε = 10⁻⁴, as in the
authors' code). The standardized weight is recomputed on every call (it is a function of W).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

#: the activations whose gain :func:`activation_gain` knows (names as in depthlab's models)
_ACT_FNS = {
    "relu": lambda z: np.maximum(z, 0.0),
    "tanh": np.tanh,
    "linear": lambda z: z,
    "hardtanh": lambda z: np.clip(z, -1.0, 1.0),
    "sigmoid": lambda z: 1.0 / (1.0 + np.exp(-z)),
    "gelu": lambda z: 0.5 * z * (1.0 + np.vectorize(math.erf)(z / math.sqrt(2.0))),
}


def activation_gain(name: str | None) -> float:
    """γ = 1/√Var[σ(z)] for z ~ N(0, 1), by composite Simpson quadrature on [−12, 12] with a
    node at every kink (0, ±1) (None or ``"linear"``: 1). ReLU gives √(2/(1 − 1/π)) ≈ 1.7129
    (Brock et al. 2021, arXiv 2101.08692)."""
    if name is None or name == "linear":
        return 1.0
    if name not in _ACT_FNS:
        raise ValueError(f"no gain known for activation {name!r}; known: {sorted(_ACT_FNS)}")
    z = np.linspace(-12.0, 12.0, 48_001)  # step 5e-4: 0 and ±1 are nodes
    w = np.ones_like(z)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    w *= (z[1] - z[0]) / 3.0 * np.exp(-0.5 * z * z) / math.sqrt(2.0 * math.pi)
    y = _ACT_FNS[name](z)
    mean = float(np.sum(w * y))
    var = float(np.sum(w * y * y)) - mean * mean
    return 1.0 / math.sqrt(var)


class WeightStandardized:
    """Mixin: a layer whose weight is standardized over its fan-in before use (see module doc).
    ``gamma`` is the fixed activation gain, ``gain`` the learnable per-output gain."""

    gamma: float
    eps: float = 1e-4
    weight: nn.Parameter
    gain: nn.Parameter

    def _init_ws(self, out_features: int, gamma: float) -> None:
        self.gamma = float(gamma)
        self.gain = nn.Parameter(torch.empty(out_features, device=self.weight.device))
        self.reset_gain()

    def reset_gain(self) -> None:
        with torch.no_grad():
            self.gain.fill_(1.0)

    def standardized_weight(self) -> torch.Tensor:
        """``g · γ · (W − μ) / max(σ√N, √ε)`` per output (the weight the layer applies)."""
        w = self.weight
        dims = tuple(range(1, w.dim()))
        fan_in = w[0].numel()
        mean = w.mean(dim=dims, keepdim=True)
        var = w.var(dim=dims, unbiased=False, keepdim=True)
        scale = torch.rsqrt(torch.clamp(var * fan_in, min=self.eps))
        gain = (self.gain * self.gamma).view(-1, *([1] * (w.dim() - 1)))
        return (w - mean) * (scale * gain)


class WSLinear(WeightStandardized, nn.Linear):
    """``nn.Linear`` with scaled weight standardization (Brock et al. 2021, arXiv 2101.08692)."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, gamma: float = 1.0, **kw
    ) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias, **kw)
        self._init_ws(out_features, gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma:.4g}"


class WSConv2d(WeightStandardized, nn.Conv2d):
    """``nn.Conv2d`` with scaled weight standardization (Brock et al. 2021, arXiv 2101.08692)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *a, gamma=1.0, **kw):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, *a, **kw)
        self._init_ws(out_channels, gamma)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.standardized_weight(), self.bias)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, gamma={self.gamma:.4g}"
