"""Stacks of gated linear residual blocks as a few autograd nodes with a hand-written backward.

A very deep residual MLP (ReZero's 10,000-layer fully connected networks, SkipInit's deep
linear ResNets) is a chain of identical small blocks

    r_i = σ(h_i),   y_i = r_i Wᵢᵀ + b_i,   h_{i+1} = s·h_i + α_i·y_i

(σ ∈ {ReLU, tanh, identity}; α_i the block's gate, 1 without one; s the skip multiplier).
Run module by module, each block is five Python module calls, three autograd nodes and about a
dozen small tensor ops beside its three GEMMs, which at width 256 cost as much as the GEMMs do.
:class:`GatedLinearStack` runs a run of such blocks (:data:`CHUNK` of them, or one checkpoint
segment) as one autograd node whose backward is written out by hand:

    ∂L/∂α_i = ⟨g, y_i⟩ = ⟨g W_i, r_i⟩ + ⟨Σ_n g, b_i⟩      (so y_i need not be kept)
    ∂L/∂W_i = α_i · gᵀ r_i,    ∂L/∂b_i = α_i · Σ_n g
    ∂L/∂h_i = s·g + σ'(h_i) ⊙ (α_i · g W_i)

with g = ∂L/∂h_{i+1}. Only r_i is saved per block (half of what autograd keeps: it also saves
y_i for the gate's gradient), and with ``segments > 0`` only the inputs of the segments are kept
and each segment's forward is recomputed just before its backward (activation checkpointing at
the cost of one forward pass of GEMMs, without any autograd bookkeeping; the recomputed
activations of a segment are still in cache when its backward reads them).

:class:`~depthlab.models.common.BlockStack` takes this path by itself when every block has this
form, gradients are on, and nothing observes the modules: a hook on any module involved (or a
global module hook), a ``torch.func`` transform or ``torch.compile`` tracing sends it module by
module, as does ``blocks.fuse = False``.

The function, parameters and gradients are those of the module-by-module stack up to
floating-point rounding. Double backward (``create_graph=True``) is not supported through the
fused node: it raises an error that names the switch (``BlockStack.fuse = False``).
"""

from __future__ import annotations

import torch
from torch import nn

from depthlab.nn.residual import Branch, Residual, _global_hooks, _hooked, _transformed
from depthlab.nn.scalars import Gate
from depthlab.registry import DepthlabError

_ACTS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Identity: "linear"}


def _plan_block(block: nn.Module, x: torch.Tensor) -> tuple | None:
    """``(act, W, b or None, α or None, skip_mult)`` when ``block`` is ``s·x + α·Linear(σ(x))``
    with no hooks anywhere, nothing else in it and its tensors of ``x``'s dtype and device;
    else None. Reads the module dicts directly (``nn.Module.__getattr__`` is slow)."""
    if type(block) is not Residual or _hooked(block):
        return None
    sub, own = block._modules, block.__dict__  # a None submodule may live in either
    branch, gate = sub.get("branch"), sub.get("gate", own.get("gate"))
    if (
        sub.get("shortcut", own.get("shortcut")) is not None
        or sub.get("post", own.get("post")) is not None
    ):
        return None
    if type(branch) not in (Branch, nn.Sequential) or len(branch._modules) != 2:
        return None
    act, linear = branch._modules.values()
    kind = _ACTS.get(type(act))
    if kind is None or type(linear) is not nn.Linear:
        return None
    if _hooked(branch) or _hooked(act) or _hooked(linear):
        return None
    w, b = linear._parameters["weight"], linear._parameters["bias"]
    alpha = None
    if gate is not None:
        if type(gate) is not Gate or _hooked(gate):
            return None
        alpha = gate._parameters.get("alpha")
        if alpha is None:
            alpha = gate._buffers["alpha"]
    dtype, device = x.dtype, x.device
    for t in (w, b, alpha):
        if t is not None and (t.dtype != dtype or t.device != device):
            return None
    return kind, w, b, alpha, block.skip_mult


def _autocast() -> bool:
    """True inside ``torch.autocast`` for any device type."""
    for device in ("cpu", "cuda", "xpu", "mps"):
        try:
            if torch.is_autocast_enabled(device):
                return True
        except (TypeError, RuntimeError):  # torch < 2.4 has no device argument
            return torch.is_autocast_enabled() or torch.is_autocast_cpu_enabled()
    return False


def plan_stack(blocks: list[nn.Module], x: torch.Tensor) -> list[tuple] | None:
    """The per-block plans when every block of ``blocks`` can run fused on ``x`` (see module
    docstring) and fusing applies now (no global hooks, no ``torch.func`` transform,
    ``torch.compile`` tracing, forward-mode AD or autocast, gradients enabled, parameters of
    ``x``'s dtype and device); else None."""
    # the structural test of the first block first: conv and Transformer stacks leave here
    first = _plan_block(blocks[0], x) if len(blocks) > 1 and x.dim() == 2 else None
    if first is None:
        return None
    if not torch.is_grad_enabled() or _global_hooks() or _transformed():
        return None
    if _autocast():  # autocast picks dtypes per op; the hand-written backward does not
        return None
    if getattr(torch.autograd.forward_ad, "_current_level", -1) >= 0:  # no forward-mode rule
        return None
    plans = [first]
    for block in blocks[1:]:
        plan = _plan_block(block, x)
        if plan is None:
            return None
        plans.append(plan)
    return plans


#: blocks per autograd node without checkpointing: a node returns its parameters' gradients
#: together at its end, so this bounds the gradient memory held beyond autograd's own
CHUNK = 64


def run_stack(plans: list[tuple], x: torch.Tensor, segments: int = 0) -> torch.Tensor:
    """The blocks of ``plans`` (from :func:`plan_stack`) applied to ``x``: a run of
    :data:`CHUNK` blocks per autograd node; with ``segments > 0``, one node per segment
    (``⌈depth/segments⌉`` blocks) that keeps only its input and recomputes its activations in
    the backward pass."""
    n = len(plans)
    size = -(-n // min(segments, n)) if segments > 0 else CHUNK
    for start in range(0, n, size):
        spec, params = [], []
        for act, w, b, alpha, skip in plans[start : start + size]:
            params.append(w)
            if b is not None:
                params.append(b)
            if alpha is not None:
                params.append(alpha)
            spec.append((act, b is not None, alpha is not None, skip))
        x = GatedLinearStack.apply(x, tuple(spec), segments > 0, *params)
    return x


def _unpack(spec: tuple, params: tuple) -> list[tuple]:
    """Per block ``(act, W, b or None, α tensor or None, skip, index of W in params)``."""
    out, j = [], 0
    for act, has_b, has_gate, skip in spec:
        w_at = j
        w = params[j]
        j += 1
        b = params[j] if has_b else None
        j += has_b
        a = params[j] if has_gate else None
        j += has_gate
        out.append((act, w, b, a, skip, w_at))
    return out


def _act(kind: str, h: torch.Tensor) -> torch.Tensor:
    if kind == "relu":
        return torch.relu(h)
    if kind == "tanh":
        return torch.tanh(h)
    return h


def _act_backward(kind: str, grad: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``σ'(h) ⊙ grad`` from the saved activation output ``r = σ(h)``, written over ``grad``."""
    if kind == "relu":
        return torch.ops.aten.threshold_backward.grad_input(grad, r, 0, grad_input=grad)
    if kind == "tanh":
        return torch.ops.aten.tanh_backward.grad_input(grad, r, grad_input=grad)
    return grad


def _forward(blocks: list[tuple], alphas: list[float], h: torch.Tensor, keep: list | None):
    """Run ``blocks`` from ``h`` (left unchanged); append each block's ``r`` to ``keep`` when
    given. The residual stream is updated in place where nothing else holds it."""
    own, y_buf = False, None  # own: h is this loop's scratch (not the input, not a kept r)
    for (act, w, b, _, skip, _), a in zip(blocks, alphas):
        r = _act(act, h)
        if keep is not None:
            keep.append(r)
        if skip == 1.0:  # y only feeds the add: one scratch buffer serves every block
            if b is None:
                y_buf = torch.mm(r, w.t(), out=y_buf) if y_buf is not None else torch.mm(r, w.t())
            else:
                y_buf = (
                    torch.addmm(b, r, w.t(), out=y_buf)
                    if y_buf is not None
                    else torch.addmm(b, r, w.t())
                )
            if own:
                h.add_(y_buf, alpha=a)
            else:
                h = torch.add(h, y_buf, alpha=a)
        else:
            y = torch.mm(r, w.t()) if b is None else torch.addmm(b, r, w.t())
            h = y.mul_(a) if skip == 0.0 else torch.add(y.mul_(a), h, alpha=skip)
        own = act != "linear"  # a linear block's r is h itself
    return h


class GatedLinearStack(torch.autograd.Function):
    """A run of gated linear blocks as one autograd node (see the module docstring). Inputs:
    ``x``, the static ``spec`` (per block: activation, has-bias, has-gate, skip multiplier),
    ``recompute`` (keep only ``x`` and recompute the activations in the backward pass), then the
    parameters in block order (``W``, ``b`` if any, ``α`` if any)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, spec: tuple, recompute: bool, *params: torch.Tensor):
        blocks = _unpack(spec, params)
        gates = [a for *_, a, _, _ in blocks if a is not None]
        values = torch.stack(gates).tolist() if gates else []  # one sync on a GPU, not one each
        it = iter(values)
        alphas = [next(it) if a is not None else 1.0 for *_, a, _, _ in blocks]
        kept: list[torch.Tensor] | None = None if recompute else []
        h = _forward(blocks, alphas, x, kept)
        # saved as autograd saves tensors: freed after the backward pass unless retain_graph
        ctx.save_for_backward(*params, *([x] if recompute else kept))
        ctx.recompute, ctx.spec, ctx.alphas, ctx.num_params = recompute, spec, alphas, len(params)
        return h

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if torch.is_grad_enabled():
            raise DepthlabError(
                "double backward (create_graph=True) through a fused residual stack is not "
                "supported; set model.blocks.fuse = False to run it module by module"
            )
        saved = ctx.saved_tensors
        params = saved[: ctx.num_params]
        blocks = _unpack(ctx.spec, params)
        if ctx.recompute:
            rs: list[torch.Tensor] = []
            _forward(blocks, ctx.alphas, saved[-1], rs)
        else:
            rs = list(saved[ctx.num_params :])
        del saved
        alphas, needs = ctx.alphas, ctx.needs_input_grad
        grads: list[torch.Tensor | None] = [None] * len(params)
        g, own = grad, False  # own: g is this loop's scratch (grad itself must not change)
        for i in range(len(blocks) - 1, -1, -1):
            act, w, b, a_t, skip, w_at = blocks[i]
            r, a = rs.pop(), alphas[i]
            j = w_at + 3  # params start after x, spec, recompute
            need_w, need_b = needs[j], b is not None and needs[j + 1]
            need_a = a_t is not None and needs[j + 1 + (b is not None)]
            if need_w:  # α·gᵀ r in the GEMM itself (beta=0 ignores the input)
                grads[w_at] = torch.addmm(w, g.t(), r, beta=0, alpha=a)
            gw = torch.mm(g, w)  # ∂L/∂r divided by α
            if need_a:  # ⟨g, r Wᵀ⟩ = ⟨g W, r⟩
                ga = torch.dot(gw.view(-1), r.reshape(-1))
            if need_b or (need_a and b is not None):
                gsum = g.sum(0)
                if need_a and b is not None:
                    ga = ga + torch.dot(gsum, b)
                if need_b:
                    grads[w_at + 1] = gsum.mul_(a)
            if need_a:
                grads[w_at + 1 + (b is not None)] = ga if a_t.dim() == 0 else ga.view(a_t.shape)
            gr = _act_backward(act, gw, r)
            del r
            if skip == 1.0 and own:
                g.add_(gr, alpha=a)
            elif skip == 1.0:
                g, own = torch.add(g, gr, alpha=a), True
            else:
                g, own = (torch.add(gr.mul_(a), g, alpha=skip) if skip else gr.mul_(a)), True
        return (g if needs[0] else None, None, None, *grads)
