"""Normalization layers: readable reference implementations and the factory models use.

torch's ``BatchNorm*d``/``LayerNorm`` are what models run; the ``Reference*`` classes below spell
out the same computation in plain tensor ops so the formulas can be read, and the tests hold them
against torch's modules.
"""

from __future__ import annotations

import torch
from torch import nn

from depthlab.registry import DepthlabError


class ReferenceBatchNorm(nn.Module):
    """Batch normalization in plain tensor ops (Ioffe & Szegedy 2015, arXiv 1502.03167).

    For an input of shape (N, C, *) statistics are taken per channel c over the batch and every
    spatial position (n, *):

    * train mode: ``μ_B = mean(x)``, ``σ²_B = mean((x-μ_B)²)`` (biased), and
      ``y = γ · (x - μ_B) / sqrt(σ²_B + ε) + β``; the running statistics follow torch's
      convention ``running ← (1-m)·running + m·batch`` with momentum m=0.1, where the running
      variance takes the *unbiased* batch variance ``σ²_B · n/(n-1)`` (n = N·prod(*)).
    * eval mode: ``y = γ · (x - running_mean) / sqrt(running_var + ε) + β``.
    """

    def __init__(
        self, num_features: int, eps: float = 1e-5, momentum: float = 0.1, affine: bool = True
    ) -> None:
        super().__init__()
        self.num_features, self.eps, self.momentum, self.affine = (
            num_features,
            eps,
            momentum,
            affine,
        )
        self.weight = nn.Parameter(torch.ones(num_features)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features)) if affine else None
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2 or x.shape[1] != self.num_features:
            raise ValueError(
                f"expected input of shape (N, {self.num_features}, ...), got {tuple(x.shape)}"
            )
        dims = [0, *range(2, x.dim())]  # every axis but the channel axis
        shape = [1, -1] + [1] * (x.dim() - 2)  # broadcast a (C,) vector over (N, C, *)
        if self.training:
            n = x.numel() // self.num_features
            mean = x.mean(dim=dims)
            var = ((x - mean.view(shape)) ** 2).mean(dim=dims)  # biased: used to normalize
            with torch.no_grad():
                m = self.momentum
                self.running_mean.mul_(1 - m).add_(m * mean.detach())
                self.running_var.mul_(1 - m).add_(m * var.detach() * n / max(n - 1, 1))
                self.num_batches_tracked += 1
        else:
            mean, var = self.running_mean, self.running_var
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y


class ReferenceLayerNorm(nn.Module):
    """Layer normalization in plain tensor ops (Ba, Kiros & Hinton 2016, arXiv 1607.06450).

    Per sample, over the last ``len(normalized_shape)`` axes:
    ``μ = mean(x)``, ``σ² = mean((x-μ)²)`` (biased), ``y = γ · (x-μ)/sqrt(σ²+ε) + β``.
    No batch statistics, so train and eval mode agree and batch size does not matter.
    """

    def __init__(
        self, num_features: int | tuple[int, ...], eps: float = 1e-5, affine: bool = True
    ) -> None:
        super().__init__()
        shape = (num_features,) if isinstance(num_features, int) else tuple(num_features)
        self.normalized_shape, self.eps, self.affine = shape, eps, affine
        self.weight = nn.Parameter(torch.ones(shape)) if affine else None
        self.bias = nn.Parameter(torch.zeros(shape)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dims = tuple(range(-len(self.normalized_shape), 0))
        mean = x.mean(dim=dims, keepdim=True)
        var = ((x - mean) ** 2).mean(dim=dims, keepdim=True)
        y = (x - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y


NORM_KINDS = ("batchnorm", "layernorm")
LAYOUTS = ("features", "channels", "tokens")


def create_norm(kind: str, num_features: int, layout: str) -> nn.Module:
    """The normalization layer ``kind`` for activations of a given ``layout``.

    ``layout`` is ``"features"`` for (N, C) MLP activations, ``"channels"`` for (N, C, H, W)
    conv activations and ``"tokens"`` for (N, T, C) sequences. LayerNorm of a conv activation
    normalizes each sample over (C, H, W), i.e. ``GroupNorm(1, C)``.
    """
    if layout not in LAYOUTS:
        raise DepthlabError(f"unknown layout '{layout}'; choose one of: {', '.join(LAYOUTS)}")
    if kind == "batchnorm":
        if layout == "channels":
            return nn.BatchNorm2d(num_features)
        if layout == "features":
            return nn.BatchNorm1d(num_features)
        return _TokenBatchNorm(num_features)
    if kind == "layernorm":
        if layout == "channels":
            return nn.GroupNorm(1, num_features)
        return nn.LayerNorm(num_features)
    raise DepthlabError(f"unknown norm '{kind}'; choose one of: {', '.join(NORM_KINDS)}")


class _TokenBatchNorm(nn.BatchNorm1d):
    """BatchNorm over batch and tokens for (N, T, C) sequences."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.transpose(1, 2)).transpose(1, 2)
