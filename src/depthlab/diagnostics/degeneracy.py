"""Degeneracy of deep networks: low effective rank of weight products and of hidden activations.

Orhan & Pitkow 2018, "Skip Connections Eliminate Singularities" (arXiv 1701.09175): training is
slowed by degenerate (low effective rank) end-to-end maps rather than by small gradients — a deep
linear network with "Fold 1" init has larger gradients but trains worse than an orthogonal one,
and skip connections break the degeneracy. Saxe, McClelland & Ganguli 2013 (arXiv 1312.6120) and
Pennington, Schoenholz & Ganguli 2017 (arXiv 1711.04735): the singular values of a product of k
random Gaussian matrices spread out as k grows, while orthogonal products stay isometric.

Measures (s_1 ≥ … ≥ s_r the singular values of a matrix A):

* effective rank ``exp(H(p))`` with ``p_i = s_i / Σ s_j`` and ``H(p) = -Σ p_i log p_i``
  (Roy & Vetterli 2007): n for I_n, 1 for a rank-one matrix;
* stable rank ``‖A‖_F² / ‖A‖_2² = Σ s_i² / s_1²``;
* participation ratio of activations h ∈ R^{N×D} with covariance eigenvalues λ:
  ``(Σ λ)² / Σ λ²`` (the number of dimensions the activity really spans);
* dead ReLU share: the fraction of a ReLU's units (output elements per example) that are zero for
  every example of the batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from depthlab.nn.residual import Residual, residual_blocks, weight_layers
from depthlab.registry import DepthlabError

DEGENERACY_COLUMNS = ["quantity", "layer", "value"]


def _svals(a: torch.Tensor | np.ndarray) -> np.ndarray:
    t = torch.as_tensor(a).detach().to(torch.float64)
    if t.dim() > 2:  # conv weight (out, in, kh, kw) -> (out, in·kh·kw)
        t = t.reshape(t.shape[0], -1)
    if t.dim() == 1:
        return np.abs(t.numpy())
    return torch.linalg.svdvals(t).numpy()


def effective_rank(a: torch.Tensor | np.ndarray, *, singular_values: bool = False) -> float:
    """``exp`` of the entropy of the normalised singular values of the matrix ``a`` (or of the
    given singular values with ``singular_values=True``)."""
    s = np.abs(np.asarray(a, dtype=np.float64)) if singular_values else _svals(a)
    total = s.sum()
    if total <= 0:
        return 0.0
    p = s[s > 0] / total
    return float(np.exp(-(p * np.log(p)).sum()))


def stable_rank(a: torch.Tensor | np.ndarray, *, singular_values: bool = False) -> float:
    """``‖A‖_F² / ‖A‖_2²``."""
    s = np.abs(np.asarray(a, dtype=np.float64)) if singular_values else _svals(a)
    return float((s**2).sum() / s.max() ** 2) if s.size and s.max() > 0 else 0.0


def participation_ratio(h: torch.Tensor) -> float:
    """``(Σλ)²/Σλ²`` of the covariance of activations ``h`` (N, D...). Conv maps (N, C, H, W)
    are treated as N·H·W samples of C channels; (N, T, C) as N·T samples of C features."""
    h = h.detach().to(torch.float64)
    if h.dim() >= 4:
        h = h.movedim(1, -1).reshape(-1, h.shape[1])
    elif h.dim() == 3:
        h = h.reshape(-1, h.shape[-1])
    h = h - h.mean(0, keepdim=True)
    lam = torch.linalg.svdvals(h) ** 2  # ∝ covariance eigenvalues
    denom = float((lam**2).sum())
    return float(lam.sum() ** 2 / denom) if denom > 0 else 0.0


def layer_maps(model: nn.Module) -> list[torch.Tensor]:
    """The linear map of each block of a deep linear network, in forward order.

    A :class:`Residual` block whose branch is one bias-free ``nn.Linear`` W (with gate α, skip
    multiplier m, no shortcut or post-norm) is ``M = m·I + α·W``; a network of such blocks is
    ``M_L … M_1`` (``noskip``: M = W). Returns [] when the model is not such a network.
    """
    maps = []
    for blk in residual_blocks(model):
        branch = blk.branch
        if isinstance(branch, nn.Sequential) and len(branch) == 1:
            branch = branch[0]
        if (
            not isinstance(branch, nn.Linear)
            or branch.bias is not None
            or blk.shortcut is not None
            or blk.post is not None
            or blk.skip_mult is None
            or branch.in_features != branch.out_features
        ):
            return []
        w = branch.weight.detach().to(torch.float64)
        alpha = (
            float(blk.gate.alpha.detach())
            if blk.gate is not None and hasattr(blk.gate, "alpha")
            else 1.0
        )
        if blk.gate is not None and not hasattr(blk.gate, "alpha"):
            return []
        maps.append(blk.skip_mult * torch.eye(w.shape[0], dtype=torch.float64) + alpha * w)
    return maps


def _default_ks(num: int) -> list[int]:
    if num <= 64:
        return list(range(1, num + 1))
    ks = np.unique(np.round(np.geomspace(1, num, 40)).astype(int))
    return [int(k) for k in ks]


def product_singular_values(
    maps: Sequence[torch.Tensor], ks: Iterable[int] | None = None
) -> dict[int, np.ndarray]:
    """Singular values of the products ``M_k … M_1`` for each k in ``ks`` (default: every k up to
    64 matrices, else 40 geometrically spaced k), computed incrementally in float64."""
    ks = sorted(set(_default_ks(len(maps)) if ks is None else ks))
    if ks and (ks[0] < 1 or ks[-1] > len(maps)):
        raise DepthlabError(f"product lengths k must lie in 1..{len(maps)}, got {ks[0]}..{ks[-1]}")
    out: dict[int, np.ndarray] = {}
    prod = None
    want = set(ks)
    for k, m in enumerate(maps, start=1):
        m = torch.as_tensor(m).detach().to(torch.float64)
        prod = m if prod is None else m @ prod
        if k in want:
            out[k] = torch.linalg.svdvals(prod).numpy()
        if k >= ks[-1]:
            break
    return out


def degeneracy(
    model: nn.Module, x: torch.Tensor | None = None, ks: Iterable[int] | None = None
) -> pd.DataFrame:
    """Degeneracy records, long format: columns ``quantity``, ``layer``, ``value``.

    * ``weight_effective_rank`` / ``weight_stable_rank`` for every conv/linear weight
      (``layer`` counts them from 1);
    * for deep linear networks (:func:`layer_maps`): ``product_effective_rank``,
      ``product_stable_rank``, ``product_max_sv``, ``product_min_sv`` of ``M_k … M_1`` at
      ``layer = k`` (``ks`` as in :func:`product_singular_values`);
    * with a batch ``x``: ``participation_ratio`` of each residual block's output (``layer`` =
      block index from 1) and ``dead_relu_share`` of each ``nn.ReLU`` module (from 1).
    """
    rows: list[dict] = []
    for i, layer in enumerate(weight_layers(model), start=1):
        s = _svals(layer.weight)
        rows.append(
            {
                "quantity": "weight_effective_rank",
                "layer": i,
                "value": effective_rank(s, singular_values=True),
            }
        )
        rows.append(
            {
                "quantity": "weight_stable_rank",
                "layer": i,
                "value": stable_rank(s, singular_values=True),
            }
        )
    maps = layer_maps(model)
    if maps:
        for k, s in product_singular_values(maps, ks).items():
            rows += [
                {
                    "quantity": "product_effective_rank",
                    "layer": k,
                    "value": effective_rank(s, singular_values=True),
                },
                {
                    "quantity": "product_stable_rank",
                    "layer": k,
                    "value": stable_rank(s, singular_values=True),
                },
                {"quantity": "product_max_sv", "layer": k, "value": float(s.max())},
                {"quantity": "product_min_sv", "layer": k, "value": float(s.min())},
            ]
    if x is not None:
        rows += _activation_records(model, x)
    return pd.DataFrame(rows, columns=DEGENERACY_COLUMNS)


def _activation_records(model: nn.Module, x: torch.Tensor) -> list[dict]:
    blocks: list[Residual] = residual_blocks(model)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    outs: dict[int, torch.Tensor] = {}
    dead: dict[int, float] = {}

    def block_hook(i):
        def hook(module, inputs, output):
            outs[i] = output.detach()

        return hook

    def relu_hook(i):
        def hook(module, inputs, output):
            alive = (output.detach() > 0).reshape(output.shape[0], -1).any(dim=0)
            dead[i] = float(1.0 - alive.double().mean())

        return hook

    handles = [b.register_forward_hook(block_hook(i)) for i, b in enumerate(blocks)]
    handles += [r.register_forward_hook(relu_hook(i)) for i, r in enumerate(relus)]
    p = next(model.parameters(), None)
    if p is not None and x.is_floating_point():
        x = x.to(device=p.device, dtype=p.dtype)
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    rows = [
        {"quantity": "participation_ratio", "layer": i + 1, "value": participation_ratio(h)}
        for i, h in sorted(outs.items())
    ]
    rows += [
        {"quantity": "dead_relu_share", "layer": i + 1, "value": v} for i, v in sorted(dead.items())
    ]
    return rows


def product_spectrum(
    num_matrices: int | Iterable[int] = (1, 10, 100),
    width: int = 100,
    init: str = "standard",
    seed: int = 0,
) -> pd.DataFrame:
    """Singular values of products of ``num_matrices`` random ``width × width`` matrices drawn
    with a :class:`~depthlab.models.LinearNet` ``init`` (``standard`` Gaussian N(0, 1/width),
    ``orthogonal``, ``identity``, ``fold:k``): the Saxe et al. 2013 / Pennington et al. 2017
    figure (Gaussian products spread over orders of magnitude with depth, orthogonal stay at 1).

    Returns columns ``num_matrices``, ``index`` (0 = largest), ``singular_value``.
    """
    from depthlab.models.linear import LinearNet  # models sit above diagnostics' inputs

    counts = [num_matrices] if isinstance(num_matrices, int) else list(num_matrices)
    if not counts or min(counts) < 1:
        raise DepthlabError(f"num_matrices must be positive integers, got {num_matrices!r}")
    torch.manual_seed(seed)
    net = LinearNet(depth=max(counts), width=width, init=init, scheme="noskip")
    spectra = product_singular_values(layer_maps(net), counts)
    rows = [
        {"num_matrices": k, "index": j, "singular_value": float(v)}
        for k in counts
        for j, v in enumerate(spectra[k])
    ]
    return pd.DataFrame(rows, columns=["num_matrices", "index", "singular_value"])
