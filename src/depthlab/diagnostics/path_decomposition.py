"""The ensemble-of-paths view measured on a real network, not the analytic model.

Veit, Wilber & Belongie 2016, "Residual Networks Behave Like Ensembles of Relatively Shallow
Networks" (arXiv 1605.06431); De & Smith 2020 (arXiv 2002.10444), Fig. 3, whose 97% comes from
the analytic model of :func:`depthlab.path_variance` (independent paths, infinite width).

Put a scalar ``t`` on every residual branch of a network whose blocks are affine maps,
``x_{i+1} = g_i(x_i) + t·f_i(x_i)`` (skip ``g_i = m·shortcut``, gated branch ``f_i``). Its
output is a polynomial in t,

    y(t) = Σ_k t^k P_k,

whose coefficient ``P_k`` is exactly the sum over all paths through k branches, and
``Σ_k P_k = y(1)`` is the network's output. Two ways to get the P_k, which agree:

* ``method="recursion"``: with ``g(u) = a + G u`` and ``f(u) = b + F u``,
  ``P_0 ← a + G P_0``, ``P_1 ← G P_1 + b + F P_0``, ``P_k ← G P_k + F P_{k-1}``, truncated at
  ``k ≤ max_k`` (cost: depth × max_k block applications, batched); what lies beyond, the
  **tail** ``y(1) − Σ_{k≤max_k} P_k``, is computed exactly as a remainder, not estimated.
* ``method="roots"``: evaluate y(t) at the n = depth + 1 complex roots of unity ``ω^j`` and
  invert the discrete Fourier transform, ``P_k = (1/n) Σ_j y(ω^j) ω^(−jk)`` — all coefficients,
  no truncation, at depth × (depth + 1) block applications (small networks).

The network is made affine by freezing every BatchNorm at this batch's statistics (one forward
pass in training mode; biased batch variance, as BN normalises with) and evaluating in float64;
a network with ReLUs, LayerNorm or other nonlinear parts is refused unless ``linearize=True``,
which replaces each block by its first-order expansion at the point the real forward pass
visits (``f(x_i + u) ≈ f(x_i) + J_i u``, Jacobian-vector products) — Veit et al.'s ensemble
view of the trained or untrained network. The expansion agrees with the network at t = 1, so
``Σ_k P_k`` is still its exact output.

Statistics (the reductions of :func:`~depthlab.diagnostics.signal.channel_stats`: per feature
over the batch, and positions/pixels, population (co)variances averaged over features):

* ``variance`` ``Var(P_k)`` and ``share`` = Var(P_k) / (Σ_j Var(P_j) + Var(tail)): the diagonal
  decomposition, the quantity the analytic model predicts;
* ``net_share`` = Cov(P_k, y)/Var(y) and ``cross`` = Cov(P_k, y − P_k)/Var(y): what paths of
  length k add to the output variance once their correlation with the other lengths counts
  (Σ_k net_share + the tail's = 1); independent paths would give ``cross`` ≈ 0.

``df.attrs`` holds ``output_var``, ``tail_var``, ``tail_share`` (of the diagonal sum),
``cross_share`` = (Var(y) − Σ diagonal)/Var(y) (the cross terms in total), ``mean_path_length``
(over the diagonal shares of k ≤ max_k, renormalised) and ``depth``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pandas as pd
import torch
from torch import nn

from depthlab.nn.residual import Residual, residual_blocks
from depthlab.registry import DepthlabError

METHODS = ("recursion", "roots")
#: depth × (depth + 1) block applications: the largest depth ``method="roots"`` accepts
MAX_ROOTS_DEPTH = 2048
#: relative size of the additivity defect above which a block is called nonlinear
AFFINE_TOL = 1e-7

Map = Callable[[torch.Tensor], torch.Tensor]


def _forward_with(net: nn.Module, x: torch.Tensor, hooks: list) -> None:
    """One forward pass of ``net`` on ``x`` without gradients; the hook handles are removed
    afterwards, also when the pass raises."""
    try:
        with torch.no_grad():
            net(x)
    finally:
        for h in hooks:
            h.remove()


def _freeze_batchnorm(net: nn.Module, x: torch.Tensor) -> None:
    """Run ``net`` once in training mode, record every BatchNorm's batch mean and biased
    variance, and make them its running statistics; ``net`` is left in eval mode, so every
    BatchNorm is the fixed affine map it applied to this batch."""
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def grab(mod: nn.Module, inp: tuple[torch.Tensor, ...]) -> None:
        z = inp[0].detach()
        dims = [d for d in range(z.dim()) if d != 1]
        stats[mod] = (z.mean(dims), z.var(dims, unbiased=False))

    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    net.train()
    _forward_with(net, x, [m.register_forward_pre_hook(grab) for m in bns])
    net.eval()
    for m in bns:
        if m not in stats:
            continue
        mean, var = stats[m]
        if m.running_mean is None or m.running_var is None:
            raise DepthlabError(
                "path_decomposition needs BatchNorm layers with running statistics "
                "(track_running_stats=True) to freeze them at the batch's statistics"
            )
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)


def _trace(net: nn.Module, x: torch.Tensor, blocks: list[Residual]) -> list[torch.Tensor]:
    """The input of every block and the last block's output, checking that the blocks form one
    chain (each block's input is the previous block's output)."""
    seen: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    index = {id(b): i for i, b in enumerate(blocks)}

    def grab(mod: nn.Module, inp: tuple[torch.Tensor, ...], out: torch.Tensor) -> None:
        seen[index[id(mod)]] = (inp[0].detach(), out.detach())

    _forward_with(net, x, [b.register_forward_hook(grab) for b in blocks])
    if len(seen) != len(blocks):
        raise DepthlabError("path_decomposition: some residual blocks did not run on this input")
    for i in range(1, len(blocks)):
        if not torch.equal(seen[i][0], seen[i - 1][1]):
            raise DepthlabError(
                f"path_decomposition needs the residual blocks to form one chain (block {i} "
                f"must take block {i - 1}'s output); this model computes something between them"
            )
    return [seen[i][0] for i in range(len(blocks))] + [seen[len(blocks) - 1][1]]


def _branch(blk: Residual) -> Map:
    def f(u: torch.Tensor) -> torch.Tensor:
        out = blk.branch(u)
        return out if blk.gate is None else blk.gate(out)

    return f


def _skip(blk: Residual) -> Map | None:
    """``skip_scale(shortcut(u))``, or None for the identity skip."""
    if blk.shortcut is None and blk.skip_mult == 1.0:
        return None
    return lambda u: blk.skip_scale(blk.skip(u))


def _batched(fn: Map, stack: torch.Tensor) -> torch.Tensor:
    """``fn`` on each of ``stack``'s leading entries, as one call on the flattened batch."""
    k, b = stack.shape[0], stack.shape[1]
    out = fn(stack.reshape(k * b, *stack.shape[2:]))
    return out.reshape(k, b, *out.shape[1:])


class _AffineMap:
    """``u ↦ c + L u`` for one skip or branch map at the point ``x`` the network visits:
    ``L u = fn(u) − fn(0)`` for an affine ``fn`` (checked), or ``L = ∂fn/∂x`` at ``x``."""

    def __init__(self, fn: Map, x: torch.Tensor, linearize: bool, what: str) -> None:
        self.fn, self.x, self.linearize = fn, x, linearize
        with torch.no_grad():
            fx = fn(x)
            if linearize:
                self.const = fx - self.linear(x[None])[0]
            else:
                self.const = fn(torch.zeros_like(x))
                defect = (fx + fn(-x) - 2 * self.const).abs().max()
                scale = (fx - self.const).abs().max().clamp_min(1e-300)
                if float(defect) > AFFINE_TOL * float(scale) + 1e-300:
                    raise DepthlabError(
                        f"path_decomposition: {what} is not an affine map (ReLU, LayerNorm, "
                        f"attention, ...); pass linearize=True for its first-order expansion "
                        f"at the forward pass (Veit et al.'s ensemble view)"
                    )

    def linear(self, stack: torch.Tensor) -> torch.Tensor:
        """``L`` applied to each entry of ``stack`` (K, B, ...)."""
        if self.linearize:
            from torch.func import jvp, vmap

            return vmap(lambda u: jvp(self.fn, (self.x,), (u,))[1])(stack)
        with torch.no_grad():
            return _batched(self.fn, stack) - self.const


def _block_maps(
    blocks: list[Residual], inputs: list[torch.Tensor], linearize: bool
) -> list[tuple[_AffineMap | None, _AffineMap]]:
    maps = []
    for i, blk in enumerate(blocks):
        if blk.post is not None:
            raise DepthlabError(
                f"path_decomposition: block {i} applies {type(blk.post).__name__} after the sum "
                "(post-norm or post-activation), so its output is not a sum of paths; use a "
                "pre-activation network"
            )
        g = _skip(blk)
        skip = None if g is None else _AffineMap(g, inputs[i], linearize, f"block {i}'s skip")
        maps.append((skip, _AffineMap(_branch(blk), inputs[i], linearize, f"block {i}'s branch")))
    return maps


def _recursion(maps, h0: torch.Tensor, max_k: int) -> torch.Tensor:
    """P_0..P_K (K = max_k) by the coefficient recursion; returns (K+1, B, ...)."""
    coeffs = torch.zeros(max_k + 1, *h0.shape, dtype=h0.dtype)
    coeffs[0] = h0
    with torch.no_grad():
        for skip, branch in maps:
            if skip is None:
                new = coeffs.clone()
            else:
                new = skip.linear(coeffs)
                new[0] += skip.const
            if max_k > 0:
                new[1:] += branch.linear(coeffs[:-1])
                new[1] += branch.const
            coeffs = new
    return coeffs


def _roots(maps, h0: torch.Tensor) -> torch.Tensor:
    """All d+1 coefficients from y(t) at the (d+1)-th roots of unity and an inverse DFT."""
    n = len(maps) + 1
    angle = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    shape = (n,) + (1,) * h0.dim()
    c, s = angle.cos().reshape(shape), angle.sin().reshape(shape)
    re = h0.expand(n, *h0.shape).clone()
    im = torch.zeros_like(re)
    with torch.no_grad():
        for skip, branch in maps:
            both = torch.cat([re, im])  # the maps' linear parts act on real and imaginary parts
            fb = branch.linear(both)
            f_re, f_im = fb[:n] + branch.const, fb[n:]
            if skip is None:
                g_re, g_im = re, im
            else:
                gb = skip.linear(both)
                g_re, g_im = gb[:n] + skip.const, gb[n:]
            re = g_re + c * f_re - s * f_im  # g(x) + t·f(x), t = c + i s
            im = g_im + s * f_re + c * f_im
    coeffs = torch.fft.fft(torch.complex(re, im), dim=0) / n
    return coeffs.real


def _centered(t: torch.Tensor) -> torch.Tensor:
    """``t`` minus its mean per feature (dims: batch, and positions/pixels)."""
    if t.dim() == 2:
        dims: tuple[int, ...] = (0,)
    elif t.dim() == 3:
        dims = (0, 1)
    else:
        dims = (0, *range(2, t.dim()))
    return t - t.mean(dim=dims, keepdim=True)


def path_decomposition(
    model: nn.Module,
    x: torch.Tensor,
    max_k: int | None = None,
    method: str = "recursion",
    linearize: bool = False,
) -> pd.DataFrame:
    """Decompose the residual stream of ``model`` on batch ``x`` into the sums over paths
    through exactly k residual branches (see the module docstring), in float64.

    ``model`` is not modified (a float64 copy is evaluated). Its residual blocks must form one
    chain without a post-sum norm or activation (pre-activation ResNets, MLPs, Pre-LN / ReZero /
    SkipInit / Fixup stacks). ``max_k`` (recursion: default ``min(depth, 50)``) truncates the
    recursion; ``method="roots"`` always gives all ``depth + 1`` coefficients.

    Returns one row per k with ``path_length``, ``variance``, ``share``, ``cdf``,
    ``net_share`` and ``cross``, and the totals in ``df.attrs``; the coefficients themselves are
    in ``df.attrs["coefficients"]`` (a float64 tensor (K+1, B, ...)) and the decomposed output
    in ``df.attrs["output"]``.
    """
    if method not in METHODS:
        raise DepthlabError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    if not isinstance(x, torch.Tensor):
        raise DepthlabError(f"x must be a tensor batch, got {type(x).__name__}")
    if not residual_blocks(model):
        raise DepthlabError(f"{type(model).__name__} has no residual blocks to decompose")
    net = copy.deepcopy(model).to(torch.float64)
    x = x.detach().to(torch.float64) if x.is_floating_point() else x.detach()
    blocks = residual_blocks(net)
    depth = len(blocks)
    if method == "roots" and depth > MAX_ROOTS_DEPTH:
        raise DepthlabError(
            f"method='roots' costs depth × (depth + 1) block evaluations; depth {depth} is more "
            f"than {MAX_ROOTS_DEPTH}: use method='recursion' with max_k"
        )
    if max_k is None:
        max_k = min(depth, 50)
    if not isinstance(max_k, int) or isinstance(max_k, bool) or max_k < 0:
        raise DepthlabError(f"max_k must be an integer ≥ 0, got {max_k!r}")
    max_k = min(max_k, depth)
    _freeze_batchnorm(net, x)
    for p in net.parameters():
        p.requires_grad_(False)
    points = _trace(net, x, blocks)
    h0, y = points[0], points[-1]
    maps = _block_maps(blocks, points[:-1], linearize)
    coeffs = _roots(maps, h0) if method == "roots" else _recursion(maps, h0, max_k)
    tail = y - coeffs.sum(0)

    yc = _centered(y)
    output_var = float((yc * yc).mean())
    cs = torch.stack([_centered(p) for p in coeffs])  # (K+1, B, ...)
    tc = _centered(tail)
    dims = tuple(range(1, cs.dim()))
    variance = (cs * cs).mean(dims)
    cov_y = (cs * yc).mean(dims)
    tail_var = float((tc * tc).mean())
    diagonal = float(variance.sum()) + tail_var
    norm = output_var if output_var > 0 else math.nan
    k = torch.arange(len(coeffs), dtype=torch.float64)
    share = variance / diagonal if diagonal > 0 else variance * math.nan
    df = pd.DataFrame(
        {
            "path_length": k.long().numpy(),
            "variance": variance.numpy(),
            "share": share.numpy(),
            "cdf": share.cumsum(0).numpy(),
            "net_share": (cov_y / norm).numpy(),
            "cross": ((cov_y - variance) / norm).numpy(),
        }
    )
    listed = float(share.sum())
    df.attrs.update(
        depth=depth,
        output_var=output_var,
        tail_var=tail_var,
        tail_share=tail_var / diagonal if diagonal > 0 else math.nan,
        cross_share=(output_var - diagonal) / norm,
        mean_path_length=float((k * share).sum()) / listed if listed > 0 else math.nan,
        coefficients=coeffs,
        output=y,
    )
    return df
