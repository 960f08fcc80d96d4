"""The loss landscape along the gradient: how much the loss and its gradient change over a step.

Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help Optimization?"
(arXiv 1805.11604), Section 3 and Fig. 4: at the current parameters w, with g = ∇L(w), step
along the gradient by η and measure

* the **loss** L(w − ηg) (its range over η: the "variation of the loss");
* the **gradient predictiveness** ‖∇L(w − ηg) − ∇L(w)‖ (how far the gradient moves);
* the **effective β-smoothness** max over η of ‖∇L(w − ηg) − ∇L(w)‖ / ‖ηg‖, the largest
  ratio of gradient change to step length along the gradient (for a quadratic loss
  ``½ wᵀHw`` it is ‖Hg‖/‖g‖ at every η: the Hessian's action along the gradient).

Their finding: with BatchNorm all three are far smaller (a smoother landscape), which is what
lets larger learning rates be used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from depthlab.registry import DepthlabError

LANDSCAPE_COLUMNS = ("eta", "loss", "loss_change", "grad_change", "beta")


def _loss_and_grad(
    model: nn.Module, params: list[nn.Parameter], x, y, loss_fn
) -> tuple[float, list[torch.Tensor]]:
    loss = loss_fn(model(x), y)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return float(loss.detach()), [g.detach() for g in grads]


def _norm(tensors: list[torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors)))


def loss_landscape(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    etas: Sequence[float] = (0.01, 0.03, 0.1, 0.3),
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> pd.DataFrame:
    """Step from the current parameters along the gradient of ``loss_fn(model(x), y)`` by each
    ``eta`` and return one row per step size: ``eta``, ``loss`` (L(w − ηg)), ``loss_change``
    (L(w − ηg) − L(w)), ``grad_change`` (‖∇L(w − ηg) − ∇L(w)‖) and ``beta``
    (``grad_change / ‖ηg‖``). ``df.attrs`` holds ``loss`` (L(w)), ``grad_norm`` (‖g‖),
    ``loss_range`` (max − min of the loss over w and the steps), ``max_grad_change`` and
    ``beta_smoothness`` (max of ``beta``).

    The model is evaluated in the mode it is in (training mode: BatchNorm on this batch's
    statistics, as in the paper) and left exactly as it was: parameters, buffers (BatchNorm's
    running statistics) and gradients. ``loss_fn`` defaults to cross-entropy.
    """
    if not etas or any(not (float(e) > 0) for e in etas):
        raise DepthlabError(f"etas must be step sizes > 0, got {list(etas)!r}")
    loss_fn = loss_fn or F.cross_entropy
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise DepthlabError("loss_landscape: the model has no trainable parameters")
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        base, g = _loss_and_grad(model, params, x, y, loss_fn)
        gnorm = _norm(g)
        rows = []
        for eta in etas:
            with torch.no_grad():
                for p, gp in zip(params, g, strict=True):
                    p.sub_(float(eta) * gp)
            loss, g2 = _loss_and_grad(model, params, x, y, loss_fn)
            change = _norm([a - b for a, b in zip(g2, g, strict=True)])
            step = float(eta) * gnorm
            rows.append({
                "eta": float(eta), "loss": loss, "loss_change": loss - base,
                "grad_change": change, "beta": change / step if step > 0 else float("nan"),
            })  # fmt: skip
            model.load_state_dict(saved)
    finally:
        model.load_state_dict(saved)
    df = pd.DataFrame(rows, columns=list(LANDSCAPE_COLUMNS))
    losses = [base, *df["loss"]]
    df.attrs.update(
        loss=base,
        grad_norm=gnorm,
        loss_range=max(losses) - min(losses),
        max_grad_change=float(df["grad_change"].max()),
        beta_smoothness=float(df["beta"].max()),
    )
    return df
