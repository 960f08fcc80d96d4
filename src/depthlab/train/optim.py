"""Optimizer parameter groups and learning-rate schedules.

Parameter groups follow the normalization-free recipes:

* ``decay``: weight matrices and conv kernels (``ndim ≥ 2``), weight decay ``wd``;
* ``vectors``: biases and norm gains/shifts (``ndim == 1``), no weight decay;
* ``scalars``: 0-dim parameters (SkipInit/ReZero gates, Fixup's scalar multipliers and biases),
  no weight decay and learning rate ``lr × scalar_lr_mult`` (Fixup's reference code trains them
  at lr/10: Zhang et al. 2019, arXiv 1901.09321).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from depthlab.train.config import TrainConfig


def param_groups(model: nn.Module, cfg: TrainConfig) -> list[dict]:
    """The three groups above (empty ones dropped); each carries ``base_lr`` and ``name``."""
    groups: dict[str, list[nn.Parameter]] = {"decay": [], "vectors": [], "scalars": []}
    for p in model.parameters():
        if not p.requires_grad:
            continue
        key = "scalars" if p.dim() == 0 else "vectors" if p.dim() == 1 else "decay"
        groups[key].append(p)
    spec = {
        "decay": (cfg.lr, cfg.weight_decay),
        "vectors": (cfg.lr, 0.0),
        "scalars": (cfg.lr * cfg.scalar_lr_mult, 0.0),
    }
    return [
        {
            "params": ps,
            "name": k,
            "lr": spec[k][0],
            "base_lr": spec[k][0],
            "weight_decay": spec[k][1],
        }
        for k, ps in groups.items()
        if ps
    ]


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, Nesterov), Adam, AdamW (decoupled decay) or Adagrad over :func:`param_groups`.

    A 10,000-layer model has 30,000 parameter tensors, and a Python loop over them would cost
    more than the step's small matmuls. So the optimizer is torch's *fused* implementation (one
    kernel over all tensors) where this torch has it for the parameters' device (CPU since torch
    2.4; CUDA), else the multi-tensor (``foreach``) one, on every device (torch picks neither on
    a CPU by default). Both compute the optimizer's update rule; they differ from the for-loop
    implementation by float rounding only."""
    groups = param_groups(model, cfg)
    try:
        return _optimizer(groups, cfg, {"fused": True})
    except (RuntimeError, ValueError):  # no fused kernel for this device / dtype / torch
        return _optimizer(groups, cfg, {"foreach": True})


def _optimizer(groups: list[dict], cfg: TrainConfig, kw: dict) -> torch.optim.Optimizer:
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov, **kw
        )
    if cfg.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kw)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **kw)
    return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps, **kw)


def lr_factor(step: int, total: int, cfg: TrainConfig) -> float:
    """The multiplier of the peak lr at ``step`` (0-based) of a ``total``-step run.

    Warm-up ``w = warmup_steps``: ``(step+1)/w`` for ``step < w``. After it, with
    ``t = (step - w)/(total - w)`` ∈ [0, 1) and floor ``r = min_lr_ratio``:

    * constant: ``1``;
    * step: ``γ^k`` with k the number of milestones (fractions of ``total``) ≤ ``step/total``;
    * cosine: ``r + (1-r)·½(1 + cos πt)`` (Loshchilov & Hutter 2016, arXiv 1608.03983);
    * linear: ``r + (1-r)·(1 - t)``.
    """
    w = cfg.warmup_steps
    if step < w:
        return (step + 1) / w
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "step":
        k = sum(1 for m in cfg.milestones if step >= m * total)
        return cfg.step_gamma**k
    t = (step - w) / max(1, total - w)
    r = cfg.min_lr_ratio
    if cfg.schedule == "cosine":
        return r + (1 - r) * 0.5 * (1 + math.cos(math.pi * t))
    return r + (1 - r) * (1 - t)


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    """Set every group's lr to ``base_lr × factor``; returns the main group's lr."""
    for g in optimizer.param_groups:
        g["lr"] = g["base_lr"] * factor
    return optimizer.param_groups[0]["lr"]
