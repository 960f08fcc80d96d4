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
    kernel over all tensors) where this torch has one for the parameters' devices and dtypes
    (:func:`fused_supported`: CPU since torch 2.4; CUDA for SGD and Adam/AdamW, for Adagrad only
    in newer torch), else the multi-tensor (``foreach``) one, on every device (torch picks
    neither on a CPU by default). Both compute the optimizer's update rule; they differ from the
    for-loop implementation by float rounding only."""
    groups = param_groups(model, cfg)
    kinds = {(p.device.type, p.dtype) for g in groups for p in g["params"]}
    if kinds and all(fused_supported(cfg.optimizer, d, t) for d, t in kinds):
        try:
            return _optimizer(groups, cfg, {"fused": True})
        except (RuntimeError, ValueError):  # torch refuses the combination of settings
            pass
    return _optimizer(groups, cfg, {"foreach": True})


_FUSED: dict[tuple[str, str, torch.dtype], bool] = {}


def fused_supported(optimizer: str, device: str, dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch steps ``optimizer`` (sgd | adam | adamw | adagrad) with its fused
    kernel on parameters of ``device`` (a device type: ``"cpu"``, ``"cuda"``) and ``dtype``.

    Torch accepts ``fused=True`` when an optimizer is built and checks the device only at its
    first step, and which devices it accepts depends on its version (torch 2.11 had no fused
    Adagrad for CUDA; 2.13 has one), so the answer is found by stepping a one-element parameter
    of that device and dtype with the fused kernel once (then cached per process)."""
    key = (optimizer, device, dtype)
    if key not in _FUSED:
        try:
            p = torch.zeros(1, device=device, dtype=dtype, requires_grad=True)
            p.grad = torch.ones_like(p)
            cfg = TrainConfig(optimizer=optimizer, lr=0.1, momentum=0.9)
            _optimizer([{"params": [p]}], cfg, {"fused": True}).step()
            _FUSED[key] = True
        except (RuntimeError, ValueError, TypeError, NotImplementedError, AssertionError):
            _FUSED[key] = False  # (AssertionError: a torch built without that device)
    return _FUSED[key]


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


def optimizer_step(optimizer: torch.optim.Optimizer) -> None:
    """``optimizer.step()``, with one shortcut for torch's fused Adam and AdamW.

    Before its one kernel over all tensors, torch's fused Adam walks every parameter in Python
    (its state, the lists of moments and step counters) and sorts the lists by device and
    dtype: for a 10,000-layer MLP (40,004 tensors) that is ≈ 0.2 s of a ≈ 0.5 s step. Where
    that walk would find what it found last time — every parameter has its state and a
    gradient, all of one device and dtype, real, no AMSGrad, ``capturable``, ``differentiable``,
    tensor lr, gradient scaler or step hooks — the same kernel (``torch._fused_adam_`` /
    ``_fused_adamw_``) is called on the lists kept from the previous step, after the same
    increment of the step counters: the same update, to the bit. Anything else (the first step,
    a parameter without a gradient, a reloaded state, another optimizer) is ``step()``.

    The step counters are one 0-dim tensor per parameter, and incrementing 30,004 of them
    (``torch._foreach_add_``) took ≈ 55 ms of a ≈ 185 ms optimizer step of a 10,000-layer MLP.
    So when the lists are built, each group's counters are replaced, in the optimizer's state,
    by views of one tensor holding their values: one ``add_`` then increments them all. Every
    ``state[p]["step"]`` stays a 0-dim float tensor with its own value; torch's own ``step()``
    and ``state_dict()`` work on the views as on the tensors they replace."""
    lists = _fused_lists(optimizer)
    if lists is None:
        optimizer.step()
        return
    grads = [[p.grad for p in params] for params, *_ in lists]
    if any(g is None for gs in grads for g in gs):  # torch skips those parameters: its own step
        optimizer.step()
        return
    with torch.no_grad():
        for group, (params, exp_avgs, exp_avg_sqs, steps, counters), gs in zip(
            optimizer.param_groups, lists, grads, strict=True
        ):
            beta1, beta2 = group["betas"]
            kernel = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
            counters.add_(1)  # every element of `steps` at once (they are views of it)
            kernel(
                params, gs, exp_avgs, exp_avg_sqs, [], steps,
                amsgrad=False, lr=group["lr"], beta1=beta1, beta2=beta2,
                weight_decay=group["weight_decay"], eps=group["eps"], maximize=group["maximize"],
                grad_scale=None, found_inf=None,
            )  # fmt: skip


#: what :func:`optimizer_step` keeps on an optimizer between steps
_LISTS = "_depthlab_fused_lists"


def _fused_lists(opt: torch.optim.Optimizer) -> list[tuple] | None:
    """Per group ``(params, exp_avgs, exp_avg_sqs, steps, counters)`` (``steps`` views of the
    1-D ``counters``) when :func:`optimizer_step` may call the fused kernel itself (see there);
    kept on the optimizer and checked each call."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW) or not hasattr(torch, "_fused_adam_"):
        return None
    from torch.optim import optimizer as tmod

    hooks = (
        getattr(opt, "_optimizer_step_pre_hooks", None),
        getattr(opt, "_optimizer_step_post_hooks", None),
        getattr(tmod, "_global_optimizer_pre_hooks", None),
        getattr(tmod, "_global_optimizer_post_hooks", None),
    )
    if any(h is None or len(h) for h in hooks):
        return None
    if getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None:
        return None
    key = (id(opt.state), len(opt.state), tuple(id(g["params"]) for g in opt.param_groups))
    kept = getattr(opt, _LISTS, None)
    if kept is not None and kept[0] == key and (kept[1] is None or _same_state(opt, kept[1])):
        return kept[1]  # (None: not these groups; a first step adds state and changes the key)
    lists = _build_lists(opt)
    setattr(opt, _LISTS, (key, lists))
    return lists


def _same_state(opt: torch.optim.Optimizer, lists: list) -> bool:
    """The kept lists still hold the optimizer's state tensors and plain settings (spot check:
    each group's first and last parameter; a reloaded state is a new dict)."""
    for group, (params, exp_avgs, _, steps, _) in zip(opt.param_groups, lists, strict=True):
        if not _plain(group) or len(params) != len(group["params"]):
            return False
        for i in (0, -1):
            st = opt.state.get(params[i])
            if st is None or st.get("exp_avg") is not exp_avgs[i] or st.get("step") is not steps[i]:
                return False
    return True


def _plain(group: dict) -> bool:
    """A group the shortcut handles: fused, no AMSGrad/capturable/differentiable, float lr and
    betas, this torch's decoupled-decay flag."""
    return (
        group.get("fused") is True
        and not group.get("amsgrad")
        and not group.get("capturable")
        and not group.get("differentiable")
        and "decoupled_weight_decay" in group
        and not isinstance(group.get("lr"), torch.Tensor)
        and not any(isinstance(b, torch.Tensor) for b in group.get("betas", ()))
    )


def _build_lists(opt: torch.optim.Optimizer) -> list[tuple] | None:
    out = []
    kind = None
    steps_dtype = torch.float32  # torch's fused kernels' step counters (0-dim)
    for group in opt.param_groups:
        if not _plain(group):
            return None
        params, exp_avgs, exp_avg_sqs, steps = [], [], [], []
        for p in group["params"]:
            st = opt.state.get(p)
            if not st or "exp_avg" not in st or p.is_complex():
                return None
            if kind is None:
                kind = (p.device, p.dtype)
            step = st["step"]
            counter = step.device == p.device and step.dtype == steps_dtype and step.dim() == 0
            if (p.device, p.dtype) != kind or not counter:
                return None
            params.append(p)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(step)
        out.append((params, exp_avgs, exp_avg_sqs, steps))
    return [_shared_counters(opt, *group) for group in out]


def _shared_counters(opt, params: list, exp_avgs: list, exp_avg_sqs: list, steps: list) -> tuple:
    """The group's step counters copied into one 1-D tensor, and each parameter's
    ``state["step"]`` replaced by the view of its element (values and dtype unchanged)."""
    counters = torch.stack(steps)
    views = list(counters.unbind(0))
    for p, v in zip(params, views, strict=True):
        opt.state[p]["step"] = v
    return params, exp_avgs, exp_avg_sqs, views, counters


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
