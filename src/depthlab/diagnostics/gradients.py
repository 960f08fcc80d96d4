"""Gradient norms per parameter and per residual block, at initialisation or at any step.

For a loss L on a batch (x, y):

* ``kind="param"``: ``‖∂L/∂θ‖₂`` for every parameter tensor θ (``name`` is its qualified name,
  ``block`` the index of the residual block that owns it, or -1 outside the residual stack);
* ``kind="activation"``: ``‖∂L/∂h_i‖₂`` for the output h_i of residual block i (the whole batch
  tensor; ``name`` is the block's module name).

The gradient explosion that Fixup's analysis bounds (Zhang, Dauphin & Ma 2019, "Fixup
Initialization: Residual Learning Without Normalization", arXiv 1901.09321, Section 2) shows up
as activation-gradient norms growing towards the input; Orhan & Pitkow 2018 ("Skip Connections
Eliminate Singularities", arXiv 1701.09175) compare parameter-gradient norms across inits.

Gradients are taken with ``torch.autograd.grad``: the parameters' ``.grad`` fields are left as
they were. The model runs in its current train/eval mode.
"""

from __future__ import annotations

from collections.abc import Callable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from depthlab.nn.residual import residual_blocks

GRADIENT_COLUMNS = ["name", "kind", "block", "norm"]


def default_loss(output: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Cross-entropy for integer targets (classification; (N, T, V) logits are flattened),
    mean squared error otherwise."""
    if not y.is_floating_point():
        return F.cross_entropy(output.reshape(-1, output.shape[-1]), y.reshape(-1))
    return F.mse_loss(output, y)


def gradient_norms(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> pd.DataFrame:
    """Per-parameter and per-block activation gradient norms (columns ``name``, ``kind``,
    ``block``, ``norm``; see the module docstring). The loss value is in ``df.attrs["loss"]``."""
    loss_fn = loss_fn or default_loss
    blocks = residual_blocks(model)
    names = {id(m): n for n, m in model.named_modules()}
    owner: dict[int, int] = {}
    for i, blk in enumerate(blocks):
        for p in blk.parameters():
            owner.setdefault(id(p), i)
    acts: dict[int, torch.Tensor] = {}
    grads: dict[int, float] = {}

    def make_hook(i: int):
        def hook(module, inputs, output):
            if torch.is_tensor(output) and output.requires_grad:
                acts[i] = output
                output.register_hook(lambda g: grads.__setitem__(i, float(g.double().norm())))

        return hook

    handles = [blk.register_forward_hook(make_hook(i)) for i, blk in enumerate(blocks)]
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    try:
        p0 = named[0][1] if named else None
        if p0 is not None and x.is_floating_point():
            x = x.to(device=p0.device, dtype=p0.dtype)
        if p0 is not None:
            y = y.to(p0.device)
            if y.is_floating_point():
                y = y.to(p0.dtype)
        loss = loss_fn(model(x), y)
        param_grads = torch.autograd.grad(loss, [p for _, p in named], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for (name, p), g in zip(named, param_grads):
        norm = 0.0 if g is None else float(g.double().norm())
        rows.append({"name": name, "kind": "param", "block": owner.get(id(p), -1), "norm": norm})
    for i, blk in enumerate(blocks):
        if i in acts:
            rows.append(
                {
                    "name": names.get(id(blk), f"block{i}"),
                    "kind": "activation",
                    "block": i,
                    "norm": grads.get(i, 0.0),
                }
            )
    df = pd.DataFrame(rows, columns=GRADIENT_COLUMNS)
    df.attrs["loss"] = float(loss.detach())
    return df


def block_gradient_summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per residual block: the activation-gradient norm and the root-sum-square of its
    parameters' gradient norms (``‖∂L/∂θ_block‖₂``), from a :func:`gradient_norms` frame."""
    params = df[(df["kind"] == "param") & (df["block"] >= 0)]
    p = params.groupby("block")["norm"].apply(lambda s: float((s**2).sum() ** 0.5))
    a = df[df["kind"] == "activation"].set_index("block")["norm"]
    out = pd.DataFrame({"activation_grad": a, "param_grad": p})
    out.index.name = "block"
    return out.reset_index()
