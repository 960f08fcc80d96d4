"""Normalization layers: readable reference implementations and the factory models use.

torch's ``BatchNorm*d``/``LayerNorm`` are what models run; the ``Reference*`` classes below spell
out the same computation in plain tensor ops so the formulas can be read, and the tests hold them
against torch's modules.
"""

from __future__ import annotations

import math

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


class _SyncBatchNormFn(torch.autograd.Function):
    """Batch normalization whose statistics span every rank of ``group`` (train mode).

    Forward: each rank's per-channel count n_r, mean μ_r and sum of squared deviations M2_r
    (one pass of torch's fused batch-norm kernel) are gathered and combined exactly (Chan,
    Golub & LeVeque 1979): ``μ = Σ n_r μ_r / n``, ``M2 = Σ M2_r + n_r (μ_r − μ)²``,
    ``σ² = M2 / n`` (biased); the output is one fused pass of torch's batch norm with those
    statistics. Backward, with ``x̂ = (x − μ)/sqrt(σ² + ε)``:
    ``∂L/∂x = γ/sqrt(σ²+ε) · (g − Σg/n − x̂ Σ(g x̂)/n)``, both sums over the whole distributed
    batch — this rank's (one fused pass of torch's batch-norm backward, which returns them as
    the bias and weight gradients) all-reduced, 2C numbers — then ``∂L/∂x = A g + B x + C``
    per channel in two passes. The gradients of γ and β are this rank's sums, which data
    parallelism then averages.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group, world):
        n_local = x.numel() // x.shape[1]
        # this rank's statistics from torch's fused batch-norm kernel (a generic var_mean over
        # (N, H, W) is ≈ 3× slower); its 1/sqrt(σ²+ε) gives σ² back to rounding
        _, mean_l, invstd_l = torch.ops.aten.native_batch_norm(
            x, None, None, None, None, True, 0.0, eps
        )
        var_l = invstd_l.double().pow(-2) - eps
        stats = torch.stack([torch.full_like(var_l, n_local), mean_l.double(), var_l * n_local])
        parts = [torch.empty_like(stats) for _ in range(world)]
        torch.distributed.all_gather(parts, stats, group=group)
        counts, means, m2s = torch.stack(parts).unbind(1)  # each (world, C)
        n = counts.sum(0)
        mean = (counts * means).sum(0) / n
        var = ((m2s + counts * (means - mean) ** 2).sum(0) / n).to(x.dtype)
        mean = mean.to(x.dtype)
        invstd = torch.rsqrt(var + eps)
        y = torch.nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, eps)
        ctx.save_for_backward(x, mean, invstd, weight)
        ctx.group, ctx.n, ctx.eps = group, float(n[0]), eps
        count = n[0]
        ctx.mark_non_differentiable(mean, var, count)
        return y, mean, var, count

    @staticmethod
    def backward(ctx, gy, _gmean, _gvar, _gn):
        x, mean, invstd, weight = ctx.saved_tensors
        gy = gy.contiguous(memory_format=_memory_format(x))
        _, sum_gx, sum_g = torch.ops.aten.native_batch_norm_backward(
            gy, x, weight, None, None, mean, invstd, True, ctx.eps, [False, True, True]
        )  # this rank's Σ g x̂ and Σ g
        gw, gb = (sum_gx.clone(), sum_g.clone()) if weight is not None else (None, None)
        sums = torch.cat([sum_g, sum_gx])
        torch.distributed.all_reduce(sums, group=ctx.group)
        c = x.shape[1]
        mean_g, mean_gx = sums[:c] / ctx.n, sums[c:] / ctx.n
        a = invstd if weight is None else invstd * weight
        b = -a * invstd * mean_gx  # x̂ = (x − μ)·invstd
        cc = -a * mean_g - b * mean
        shape = [1, -1] + [1] * (x.dim() - 2)
        # A·g + C in one pass (batch norm in eval form: (g − 0)/sqrt(1 − ε + ε)·A + C), then + B·x
        gx = torch.nn.functional.batch_norm(
            gy, torch.zeros_like(a), torch.full_like(a, 1.0 - ctx.eps), a, cc, False, 0.0, ctx.eps
        )
        gx.addcmul_(x, b.view(shape))
        return gx, gw, gb, None, None, None


def _memory_format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return torch.channels_last
    return torch.contiguous_format


class DistributedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """BatchNorm whose train-mode batch statistics span all ranks of a process group, on any
    device — torch's ``SyncBatchNorm`` has no CPU kernel, so this is what data-parallel CPU runs
    (gloo) use; with equal shards a run under ``torchrun`` then normalizes exactly as one
    process on the whole batch (Ioffe & Szegedy 2015, arXiv 1502.03167; cross-device statistics
    as in Peng et al. 2018, "MegDet", arXiv 1711.07240). ``layout="tokens"`` takes (N, T, C)
    sequences (statistics over batch and tokens). Outside a process group, or in eval mode, it
    is ``F.batch_norm``. Running statistics follow ``_BatchNorm`` (momentum, or a cumulative
    average with ``momentum=None``; the unbiased variance over the whole batch)."""

    def __init__(self, num_features: int, *args, layout: str = "channels", group=None, **kw):
        super().__init__(num_features, *args, **kw)
        if layout not in ("channels", "tokens"):
            raise DepthlabError(f"unknown layout '{layout}'; choose one of: channels, tokens")
        self.layout, self.group = layout, group

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2-d input (N, C, ...), got {x.dim()}-d")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.layout == "tokens":
            return self._normalize(x.transpose(1, 2)).transpose(1, 2)
        return self._normalize(x)

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        dist = torch.distributed
        synced = self.training and dist.is_available() and dist.is_initialized()
        if not synced:
            return super().forward(x)
        y, mean, var, n = _SyncBatchNormFn.apply(
            x, self.weight, self.bias, self.eps, self.group, dist.get_world_size(self.group)
        )
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = self.momentum
                m = 1.0 / float(self.num_batches_tracked) if m is None else m
                unbiased = var * (n / (n - 1).clamp_min(1)).to(var.dtype)  # (no host sync)
                self.running_mean.mul_(1 - m).add_(mean, alpha=m)
                self.running_var.mul_(1 - m).add_(unbiased, alpha=m)
        return y


def convert_distributed_batchnorm(module: nn.Module, group=None, cpu: bool = True) -> nn.Module:
    """Every BatchNorm of ``module`` made to normalize over the whole distributed batch: torch's
    ``SyncBatchNorm`` on GPUs, :class:`DistributedBatchNorm` on the CPU (``cpu=True``) and for
    token-layout BatchNorms (which ``SyncBatchNorm`` would treat as (N, C, L)). Parameters,
    buffers and train/eval flags carry over; returns the converted module (the same object
    unless ``module`` itself is a BatchNorm)."""
    if isinstance(module, (DistributedBatchNorm, nn.SyncBatchNorm)):
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        tokens = isinstance(module, _TokenBatchNorm)
        if not (cpu or tokens):
            return nn.SyncBatchNorm.convert_sync_batchnorm(module, group)
        new = DistributedBatchNorm(
            module.num_features,
            module.eps,
            module.momentum,
            module.affine,
            module.track_running_stats,
            layout="tokens" if tokens else "channels",
            group=group,
        )
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        ref = next((t for t in tensors if t.is_floating_point()), None)
        if ref is not None:
            new.to(device=ref.device, dtype=ref.dtype)
        new.load_state_dict(module.state_dict())
        if module.affine:
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        new.train(module.training)
        return new
    for name, child in module.named_children():
        new = convert_distributed_batchnorm(child, group, cpu)
        if new is not child:
            setattr(module, name, new)
    return module


class NoisyBatchNorm(nn.Module):
    """BatchNorm followed by noise whose mean and scale change every step: Santurkar et al.'s
    test of the internal-covariate-shift account ("How Does Batch Normalization Help
    Optimization?", arXiv 1805.11604, Section 2.1, "noisy BatchNorm").

    In training mode ``y = BN(x)·s + m`` with, per unit (channel or feature) and resampled at
    every call, ``m ~ U(−mean, mean)`` and ``s ~ U(1, std)``: the distribution each unit feeds the
    next layer shifts from step to step, by design, far more than without BN. In eval mode the
    noise is replaced by its expectation, ``y = BN(x)·(1 + std)/2`` (as dropout is at inference),
    so that the layers after it see the scale they were trained on. ``mean = 0`` and
    ``std = 1`` give BN itself.
    """

    def __init__(self, num_features: int, layout: str, mean: float = 1.0, std: float = 2.0):
        super().__init__()
        if not (math.isfinite(mean) and mean >= 0 and math.isfinite(std) and std >= 1):
            raise DepthlabError(
                f"noisy BatchNorm needs a noise mean ≥ 0 and a noise std ≥ 1, got {mean}, {std}"
            )
        self.norm = create_norm("batchnorm", num_features, layout)
        self.num_features, self.layout, self.mean, self.std = num_features, layout, mean, std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.norm(x)
        if not self.training:
            return y * ((1 + self.std) / 2) if self.std != 1 else y
        shape = [1] * y.dim()
        shape[-1 if self.layout == "tokens" else 1] = self.num_features  # the unit dim
        kw = {"dtype": y.dtype, "device": y.device}
        m = (torch.rand(shape, **kw) * 2 - 1) * self.mean
        s = 1 + torch.rand(shape, **kw) * (self.std - 1)
        return y * s + m

    def extra_repr(self) -> str:
        return f"noise mean U(±{self.mean:g}), scale U(1, {self.std:g})"
