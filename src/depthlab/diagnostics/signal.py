"""Signal propagation through the residual blocks of a network, block by block.

For every :class:`~depthlab.nn.Residual` block ``y = post(m·shortcut(x) + α·f(x))`` forward hooks
record, on one batch:

* ``in_var``      variance of the block input x;
* ``skip_var``    variance of the skip term entering the sum, ``m·shortcut(x)``;
* ``branch_var``  variance of the branch output f(x), before its gate (DeepMind's
  ``res_avg_var`` in the NF-ResNet signal-propagation plots, Brock et al. 2021);
* ``gated_var``   variance after the gate, α·f(x) (= ``branch_var`` without a gate);
* ``out_var``     variance of the block output y;
* ``out_mean_sq`` average squared channel mean of y;
* ``bn_running_mean_sq`` / ``bn_running_var``: the running statistics (mean over channels of
  ``running_mean²`` and ``running_var``) of the first BatchNorm in the branch — the one that
  normalises the block input — as they stood before this forward pass; NaN where the branch has
  none;
* ``bn_batch_mean_sq`` / ``bn_batch_var``: the same statistics of that BatchNorm's input on this
  batch (what its running statistics track).

Reductions (dimension legend: N batch, C channels/features, H×W spatial, T tokens): a (N, C, H, W)
activation has its variance and mean taken per channel over (N, H, W), then averaged over C; a
(N, C) activation per feature over N; a (N, T, C) activation per feature over (N, T). Variances
are biased (population) variances, dividing by the number of elements reduced, as DeepMind's
signal-propagation code (``jnp.var``) does; timm's signal statistics use torch's unbiased
default (dividing by n − 1), larger by a factor n/(n − 1) — small at the batch sizes these
plots are made at, but not zero.

These are the plots of De & Smith 2020, "Batch Normalization Biases Residual Blocks Towards the
Identity Function in Deep Networks" (arXiv 2002.10444, Fig. 4: skip variance ≈ i, branch ≈ 1 in
a BatchNorm ResNet) and Brock, De & Smith 2021, "Characterizing signal propagation to close the
performance gap in unnormalized ResNets" (arXiv 2101.08692, signal propagation plots: average
channel variance and squared channel mean per block).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pandas as pd
import torch
from torch import nn

from depthlab.nn.residual import Residual, residual_blocks
from depthlab.registry import DepthlabError

SIGNAL_COLUMNS = (
    "block",
    "in_var",
    "skip_var",
    "branch_var",
    "gated_var",
    "out_var",
    "out_mean_sq",
    "bn_running_mean_sq",
    "bn_running_var",
    "bn_batch_mean_sq",
    "bn_batch_var",
)
MODES = ("current", "train", "eval")


def channel_stats(t: torch.Tensor) -> tuple[float, float]:
    """``(mean over channels of the per-channel variance, mean over channels of the squared
    per-channel mean)`` with the reductions of the module docstring; the variance is the
    population one (``unbiased=False``, as DeepMind's), not timm's unbiased one."""
    t = t.detach().to(torch.float64)
    if t.dim() == 2:  # (N, C)
        dims: tuple[int, ...] = (0,)
    elif t.dim() == 3:  # (N, T, C)
        dims = (0, 1)
    elif t.dim() >= 4:  # (N, C, H, W, ...)
        dims = (0, *range(2, t.dim()))
    else:
        raise DepthlabError(
            f"signal propagation needs batched activations, got shape {tuple(t.shape)}"
        )
    mean = t.mean(dim=dims)
    var = t.var(dim=dims, unbiased=False)
    return float(var.mean()), float((mean**2).mean())


def _first_bn(module: nn.Module) -> nn.modules.batchnorm._BatchNorm | None:
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            return m
    return None


def _bn_input_stats(bn: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    x = x.detach().to(torch.float64)
    if x.dim() == 3 and x.shape[1] == bn.num_features and x.shape[2] != bn.num_features:
        dims: tuple[int, ...] = (0, 2)  # BatchNorm1d on (N, C, L)
    elif x.dim() == 3:
        dims = (0, 1)  # token BatchNorm on (N, T, C)
    else:
        dims = (0, *range(2, x.dim()))
    return float(x.var(dim=dims, unbiased=False).mean()), float((x.mean(dim=dims) ** 2).mean())


class _Recorder:
    """Forward hooks on one residual block; fills one record per forward pass."""

    def __init__(self, index: int, block: Residual) -> None:
        self.index, self.block = index, block
        self.record: dict[str, float] = {}
        self.handles = [block.register_forward_hook(self._on_block)]
        self.handles.append(block.branch.register_forward_hook(self._on_branch))
        if block.gate is not None:
            self.handles.append(block.gate.register_forward_hook(self._on_gate))
        self.bn = _first_bn(block.branch)
        if self.bn is not None:
            self.handles.append(self.bn.register_forward_pre_hook(self._on_bn))

    def _on_branch(self, module, inputs, output) -> None:
        self.record["branch_var"] = channel_stats(output)[0]

    def _on_gate(self, module, inputs, output) -> None:
        self.record["gated_var"] = channel_stats(output)[0]

    def _on_bn(self, module, inputs) -> None:  # before the forward updates the running stats
        var, mean_sq = _bn_input_stats(module, inputs[0])
        self.record["bn_batch_var"], self.record["bn_batch_mean_sq"] = var, mean_sq
        if module.running_var is not None:
            self.record["bn_running_mean_sq"] = float((module.running_mean.double() ** 2).mean())
            self.record["bn_running_var"] = float(module.running_var.double().mean())

    def _on_block(self, module: Residual, inputs, output) -> None:
        x = inputs[0]
        rec = self.record
        rec["in_var"] = channel_stats(x)[0]
        if module.has_skip:
            rec["skip_var"] = channel_stats(module.skip_scale(module.skip(x)))[0]
        else:
            rec["skip_var"] = 0.0
        rec.setdefault("gated_var", rec.get("branch_var", math.nan))
        rec["out_var"], rec["out_mean_sq"] = channel_stats(output)

    def row(self) -> dict[str, float]:
        base = {c: math.nan for c in SIGNAL_COLUMNS}
        base.update(self.record)
        base["block"] = self.index
        return base

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _bn_buffers(model: nn.Module) -> list[tuple[nn.Module, dict[str, torch.Tensor]]]:
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, {k: b.clone() for k, b in m._buffers.items() if b is not None}))
    return saved


def _training_flags(model: nn.Module) -> list[tuple[nn.Module, bool]]:
    return [(m, m.training) for m in model.modules()]


def signal_propagation(model: nn.Module, x: torch.Tensor, mode: str = "current") -> pd.DataFrame:
    """One forward pass of ``model`` on the batch ``x`` (no gradients); one row per residual
    block with the columns of the module docstring (``block`` counts from 0).

    ``mode``: ``"current"`` keeps the model's train/eval mode (a freshly built model is in train
    mode, so BatchNorm uses batch statistics, as at the start of training); ``"train"`` or
    ``"eval"`` set it for the call. The call has no side effects: train/eval flags and BatchNorm
    running statistics are restored afterwards.
    """
    if mode not in MODES:
        raise DepthlabError(f"unknown mode '{mode}'; choose one of: {', '.join(MODES)}")
    blocks = residual_blocks(model)
    if not blocks:
        raise DepthlabError(
            f"{type(model).__name__} has no depthlab Residual blocks, so there is no skip/branch "
            "to measure; build it with dl.create_model(...) or convert it with "
            "dl.convert(model, scheme=...)"
        )
    recorders = [_Recorder(i, b) for i, b in enumerate(blocks)]
    flags, buffers = _training_flags(model), _bn_buffers(model)
    try:
        if mode != "current":
            model.train(mode == "train")
        param = next(model.parameters(), None)
        if param is not None and torch.is_tensor(x) and x.is_floating_point():
            x = x.to(device=param.device, dtype=param.dtype)
        with torch.no_grad():
            model(x)
    finally:
        for r in recorders:
            r.remove()
        for m, flag in flags:
            m.training = flag
        with torch.no_grad():
            for m, bufs in buffers:
                for k, b in bufs.items():
                    m._buffers[k].copy_(b)
    rows = [r.row() for r in recorders]
    missing = [r["block"] for r in rows if math.isnan(r["out_var"])]
    if missing:
        raise DepthlabError(
            f"residual blocks {missing[:5]} did not run in the forward pass; signal propagation "
            "needs every block on the path from input to output"
        )
    return pd.DataFrame(rows, columns=list(SIGNAL_COLUMNS))


def signal_callback(
    x: torch.Tensor, every: int = 1, mode: str = "eval"
) -> Callable[[int, nn.Module, object], None]:
    """A training callback ``cb(step, model, history)`` that runs :func:`signal_propagation` on
    the fixed batch ``x`` every ``every``-th call and collects the rows, with a ``step`` column,
    in ``cb.records``; ``cb.frame()`` returns them as a DataFrame. ``history`` is not used.

    >>> cb = signal_callback(x_probe)
    >>> dl.train(model, "digits", cfg, callbacks=[cb]); cb.frame()
    """
    records: list[dict[str, float]] = []
    calls = [0]

    def cb(step: int, model: nn.Module, history: object = None) -> None:
        calls[0] += 1
        if (calls[0] - 1) % max(1, every):
            return
        df = signal_propagation(model, x, mode=mode)
        for row in df.to_dict("records"):
            records.append({"step": int(step), **row})

    def frame() -> pd.DataFrame:
        return pd.DataFrame(records, columns=["step", *SIGNAL_COLUMNS])

    cb.records = records  # type: ignore[attr-defined]
    cb.frame = frame  # type: ignore[attr-defined]
    return cb
