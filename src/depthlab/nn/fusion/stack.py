"""Stacks of gated linear residual blocks as a few autograd nodes with a hand-written backward.

A very deep residual MLP (ReZero's 10,000-layer fully connected networks, SkipInit's deep
linear ResNets) is a chain of identical small blocks

    r_i = σ(h_i),   y_i = r_i Wᵢᵀ + b_i,   h_{i+1} = s·h_i + α_i·y_i

(σ ∈ {ReLU, tanh, identity}; α_i the block's gate, 1 without one; s the skip multiplier), or
with a pre-norm ``r_i = σ(LayerNorm(h_i))`` (the ``layernorm`` scheme's FC+LayerNorm blocks):
the LayerNorm then runs as torch's own forward and backward kernels inside the node, which
keeps ``h_i`` and its per-row mean and 1/σ beside ``r_i``.
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
the cost of ``(L−1)/L`` of a forward pass of GEMMs for segments of L blocks — the last block's
GEMM only makes the next segment's input, which is kept — without any autograd bookkeeping;
the recomputed activations of a segment are still in cache when its backward reads them).

:class:`~depthlab.models.common.BlockStack` takes this path by itself when every block has this
form, gradients are on, and nothing observes the modules: a hook on any module involved (or a
global module hook), a ``torch.func`` transform or ``torch.compile`` tracing sends it module by
module, as does ``blocks.fuse = False``.

The function, parameters and gradients are those of the module-by-module stack up to
floating-point rounding. Double backward (``create_graph=True``) is not supported through the
fused node: it raises an error that names the switch (``BlockStack.fuse = False``).
"""

from __future__ import annotations

import os
import queue
import threading

import torch
from torch import nn

from depthlab.nn.fusion.switch import autocasting, blocked, forward_ad, hooked, transformed
from depthlab.nn.residual import Branch, Residual
from depthlab.nn.scalars import Gate, Scale
from depthlab.registry import DepthlabError

_ACTS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Identity: "linear"}


def _plan_block(block: nn.Module, x: torch.Tensor) -> tuple | None:
    """``(act, W, b or None, α or None, skip_mult, norm)`` when ``block`` is
    ``s·x + α·Linear(σ(x))`` or ``s·x + α·Linear(σ(LayerNorm(x)))`` with no hooks anywhere,
    nothing else in it and its tensors of ``x``'s dtype and device (``norm``: None, or the
    LayerNorm's ``(γ or None, β or None, eps)``); else None. Reads the module dicts directly
    (``nn.Module.__getattr__`` is slow)."""
    if type(block) is not Residual or hooked(block):
        return None
    sub, own = block._modules, block.__dict__  # a None submodule may live in either
    branch, gate = sub.get("branch"), sub.get("gate", own.get("gate"))
    if (
        sub.get("shortcut", own.get("shortcut")) is not None
        or sub.get("post", own.get("post")) is not None
    ):
        return None
    skip = sub.get("skip_scale")
    if type(skip) is not Scale or hooked(skip):
        return None
    if type(branch) not in (Branch, nn.Sequential) or len(branch._modules) not in (2, 3):
        return None
    *ln, act, linear = branch._modules.values()
    kind = _ACTS.get(type(act))
    if kind is None or type(linear) is not nn.Linear:
        return None
    if hooked(branch) or hooked(act) or hooked(linear):
        return None
    w, b = linear._parameters["weight"], linear._parameters["bias"]
    norm, tensors = None, [w, b]
    if ln:
        ln = ln[0]
        if type(ln) is not nn.LayerNorm or hooked(ln) or ln.normalized_shape != (w.shape[1],):
            return None
        g_ln, b_ln = ln._parameters.get("weight"), ln._parameters.get("bias")
        norm = (g_ln, b_ln, float(ln.eps))
        tensors += [g_ln, b_ln]
    alpha = None
    if gate is not None:
        if type(gate) is not Gate or hooked(gate):
            return None
        alpha = gate._parameters.get("alpha")
        if alpha is None:
            alpha = gate._buffers["alpha"]
    dtype, device = x.dtype, x.device
    for t in (*tensors, alpha):
        if t is not None and (t.dtype != dtype or t.device != device):
            return None
    return kind, w, b, alpha, skip.value, norm


def plan_stack(blocks: list[nn.Module], x: torch.Tensor) -> list[tuple] | None:
    """The per-block plans when every block of ``blocks`` can run fused on ``x`` (see module
    docstring) and fusing applies now (no global hooks, no ``torch.func`` transform,
    ``torch.compile`` tracing, forward-mode AD or autocast, gradients enabled, parameters of
    ``x``'s dtype and device); else None."""
    # the structural test of the first block first: conv and Transformer stacks leave here
    first = _plan_block(blocks[0], x) if len(blocks) > 1 and x.dim() == 2 else None
    if first is None:
        return None
    if not torch.is_grad_enabled() or blocked() or transformed():
        return None
    if autocasting() or forward_ad():  # per-op dtypes; no forward-mode rule
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


def run_stack(
    plans: list[tuple], x: torch.Tensor, segments: int = 0, sgd: SGDInBackward | None = None
) -> torch.Tensor:
    """The blocks of ``plans`` (from :func:`plan_stack`) applied to ``x``: a run of
    :data:`CHUNK` blocks per autograd node; with ``segments > 0``, one node per segment
    (``⌈depth/segments⌉`` blocks) that keeps only its input and recomputes its activations in
    the backward pass. With ``sgd``, the weight matrices take that optimizer's step in the
    backward pass instead of getting gradients (:class:`SGDInBackward`)."""
    n = len(plans)
    if sgd is not None and len({id(plan[1]) for plan in plans}) < n:
        sgd = None  # a weight used by two blocks must see both gradients before any step
    size = -(-n // min(segments, n)) if segments > 0 else CHUNK
    for start in range(0, n, size):
        spec, params = [], []
        for act, w, b, alpha, skip, norm in plans[start : start + size]:
            params += [t for t in (w, b, alpha) if t is not None]
            norm_spec = None
            if norm is not None:
                params += [t for t in norm[:2] if t is not None]
                norm_spec = (norm[0] is not None, norm[1] is not None, norm[2])
            spec.append((act, b is not None, alpha is not None, skip, norm_spec))
        x = GatedLinearStack.apply(x, tuple(spec), segments > 0, sgd, *params)
    return x


def count_fused_nodes(out: torch.Tensor) -> int:
    """The number of fused-stack autograd nodes (:class:`GatedLinearStack`) in the graph that
    produced ``out``: 0 when a stack ran module by module — a way to see whether a model (on
    this device, with these hooks and settings) takes the fused path."""
    seen, stack, count = set(), [out.grad_fn], 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        count += type(fn).__name__ == "GatedLinearStackBackward"
        stack.extend(f for f, _ in fn.next_functions)
    return count


def _unpack(spec: tuple, params: tuple) -> list[tuple]:
    """Per block ``(act, W, b or None, α tensor or None, skip, index of W in params, norm)``,
    ``norm`` None or the LayerNorm's ``(γ or None, β or None, eps, index of its first tensor)``."""
    out, j = [], 0
    for act, has_b, has_gate, skip, norm_spec in spec:
        w_at = j
        w = params[j]
        j += 1
        b = params[j] if has_b else None
        j += has_b
        a = params[j] if has_gate else None
        j += has_gate
        norm = None
        if norm_spec is not None:
            has_g, has_beta, eps = norm_spec
            norm = (params[j] if has_g else None, params[j + has_g] if has_beta else None, eps, j)
            j += has_g + has_beta
        out.append((act, w, b, a, skip, w_at, norm))
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


def _branch_input(act: str, norm: tuple | None, h: torch.Tensor, keep: list | None):
    """``r = σ(h)``, or ``σ(LayerNorm(h))`` with ``norm``; appends to ``keep`` what the backward
    pass reads: ``r``, or ``h, mean, rstd, r`` with a norm."""
    if norm is None:
        r = _act(act, h)
        if keep is not None:
            keep.append(r)
        return r
    u, mean, rstd = torch.native_layer_norm(h, (h.shape[-1],), norm[0], norm[1], norm[2])
    r = torch.relu_(u) if act == "relu" else torch.tanh_(u) if act == "tanh" else u
    if keep is not None:
        keep += (h, mean, rstd, r)
    return r


def _forward(blocks: list[tuple], alphas: list[float], h: torch.Tensor, keep: list | None):
    """Run ``blocks`` from ``h`` (left unchanged); append what each block's backward pass reads
    to ``keep`` when given (:func:`_branch_input`). The residual stream is updated in place
    where nothing else holds it."""
    own, y_buf = False, None  # own: h is this loop's scratch (not the input, not a kept r)
    for (act, w, b, _, skip, _, norm), a in zip(blocks, alphas):
        r = _branch_input(act, norm, h, keep)
        if r is h or (norm is not None and keep is not None):
            own = False  # h itself is kept (a linear block's r, a LayerNorm's input)
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
        own = True  # a new tensor, or h updated in place because it already was scratch
    return h


class GatedLinearStack(torch.autograd.Function):
    """A run of gated linear blocks as one autograd node (see the module docstring). Inputs:
    ``x``, the static ``spec`` (per block: activation, has-bias, has-gate, skip multiplier),
    ``recompute`` (keep only ``x`` and recompute the activations in the backward pass), ``sgd``
    (an :class:`SGDInBackward` or None), then the parameters in block order (``W``, ``b`` if
    any, ``α`` if any)."""

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        spec: tuple,
        recompute: bool,
        sgd: SGDInBackward | None,
        *params: torch.Tensor,
    ):
        blocks = _unpack(spec, params)
        gates = [blk[3] for blk in blocks if blk[3] is not None]
        values = torch.stack(gates).tolist() if gates else []  # one sync on a GPU, not one each
        it = iter(values)
        alphas = [next(it) if blk[3] is not None else 1.0 for blk in blocks]
        kept: list[torch.Tensor] | None = None if recompute else []
        h = _forward(blocks, alphas, x, kept)
        # saved as autograd saves tensors: freed after the backward pass unless retain_graph
        ctx.save_for_backward(*params, *([x] if recompute else kept))
        ctx.recompute, ctx.spec, ctx.alphas, ctx.num_params = recompute, spec, alphas, len(params)
        ctx.sgd = sgd
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
            # the last block's GEMM only makes this node's output: its r needs h_last alone
            h_last = _forward(blocks[:-1], ctx.alphas[:-1], saved[-1], rs)
            _branch_input(blocks[-1][0], blocks[-1][6], h_last, rs)
        else:
            rs = list(saved[ctx.num_params :])
        del saved
        grads: list[torch.Tensor | None] = [None] * len(params)
        sgd = ctx.sgd.groups() if ctx.sgd is not None else None
        args = (blocks, rs, ctx.alphas, ctx.needs_input_grad, grad, grads, sgd)
        worker = _grad_thread(grad)
        if worker is None:
            g = _backward_chain(*args, None)
        else:
            threads = torch.get_num_threads()
            torch.set_num_threads(worker.threads)  # the other half of the threads is the worker's
            try:
                g = _backward_chain(*args, worker.jobs.put)
            finally:
                torch.set_num_threads(threads)
                try:
                    worker.join()
                finally:
                    _WORKER_LOCK.release()
        return (g if ctx.needs_input_grad[0] else None, None, None, None, *grads)


def _backward_chain(blocks, rs, alphas, needs, grad, grads, sgd, submit) -> torch.Tensor:
    """∂L/∂x of a fused node from ``grad`` = ∂L/∂(its output), block by block from the last;
    the parameter gradients go into ``grads`` (by :func:`_param_grads`, called here or, with
    ``submit``, by the gradient thread), except that a weight found in ``sgd`` (from
    :meth:`SGDInBackward.groups`) takes its step instead. The chain
    ``g ← s·g + σ'(h) ⊙ (α·g W)`` is updated in place where nothing else holds ``g``; a job
    handed to the thread holds its ``g``, so then each block's ``g`` is a new tensor."""
    g, own = grad, False  # own: g is this loop's scratch (grad itself must not change)
    for i in range(len(blocks) - 1, -1, -1):
        act, w, b, a_t, skip, w_at, norm = blocks[i]
        r, a = rs.pop(), alphas[i]
        if norm is not None:
            rstd, mean, h_in = rs.pop(), rs.pop(), rs.pop()
        j = w_at + 4  # params start after x, spec, recompute, sgd
        need_w, need_b = needs[j], b is not None and needs[j + 1]
        need_a = a_t is not None and needs[j + 1 + (b is not None)]
        gw = torch.mm(g, w)  # ∂L/∂r divided by α
        ga = torch.dot(gw.view(-1), r.reshape(-1)) if need_a else None  # ⟨g, r Wᵀ⟩ = ⟨g W, r⟩
        step = None
        if need_w and sgd is not None and w.grad is None:  # (a .grad to add: the usual way)
            k = sgd[0].get(id(w))
            if k is not None:  # its state entry made here, on this thread
                step = (*sgd[1][k], sgd[2][w])
        job = (grads, w_at, w, b, a_t, g, r, a, need_w, need_b, need_a, ga, step)
        if submit is None:
            _param_grads(*job)
        else:
            submit(job)
        gr = _act_backward(act, gw, r)
        del r, job
        if norm is not None:
            gr = _norm_backward(norm, gr, h_in, mean, rstd, a, needs, grads)
            del h_in, mean, rstd
        if skip == 1.0 and own and submit is None:
            g.add_(gr, alpha=a)
        elif skip == 1.0:
            g, own = torch.add(g, gr, alpha=a), True
        else:
            g, own = (torch.add(gr.mul_(a), g, alpha=skip) if skip else gr.mul_(a)), True
    return g


def _norm_backward(norm, gu, h, mean, rstd, a, needs, grads) -> torch.Tensor:
    """∂L/∂h through ``u = LayerNorm(h)`` from ``gu`` = (∂L/∂u)/α; the LayerNorm's ∂γ, ∂β
    (× α) go into ``grads``."""
    g_ln, b_ln, eps, at = norm
    need_g = g_ln is not None and needs[at + 4]
    need_b = b_ln is not None and needs[at + 4 + (g_ln is not None)]
    gh, gg, gb = torch.ops.aten.native_layer_norm_backward(
        gu, h, (h.shape[-1],), mean, rstd, g_ln, b_ln, [True, need_g, need_b]
    )
    if need_g:
        grads[at] = gg if a == 1.0 else gg.mul_(a)
    if need_b:
        grads[at + (g_ln is not None)] = gb if a == 1.0 else gb.mul_(a)
    return gh


def _param_grads(grads, w_at, w, b, a_t, g, r, a, need_w, need_b, need_a, ga, step) -> None:
    """One block's parameter gradients into ``grads``: ``∂W = α·gᵀ r`` (in the GEMM itself;
    ``beta=0`` ignores the input), ``∂b = α·Σ_n g``, ``∂α = ⟨g W, r⟩ + ⟨Σ_n g, b⟩`` (``ga``
    holds the first term). With ``step`` (SGD settings and state), ``W`` takes its SGD step
    instead of getting a gradient."""
    if step is not None:
        _sgd_step(w, g, r, a, *step)
    elif need_w:
        grads[w_at] = torch.addmm(w, g.t(), r, beta=0, alpha=a)
    if need_b or (need_a and b is not None):
        gsum = g.sum(0)
        if need_a and b is not None:
            ga = ga + torch.dot(gsum, b)
        if need_b:
            grads[w_at + 1] = gsum.mul_(a)
    if need_a:
        grads[w_at + 1 + (b is not None)] = ga if a_t.dim() == 0 else ga.view(a_t.shape)


def _sgd_step(w, g, r, a, lr, wd, mu, damp, nesterov, state) -> None:
    """``torch.optim.SGD``'s update of ``W`` for the gradient ``G = α·gᵀ r``, without forming
    ``G`` where the update allows: ``d = G + wd·W``; with momentum ``μ``, ``buf ← d`` at the
    first step, then ``buf ← μ·buf + (1 − dampening)·d``, and ``d = buf`` (``d + μ·buf`` with
    Nesterov); ``W ← W − lr·d``. The GEMM accumulates into ``W`` (no momentum) or into ``buf``
    (momentum after the first step, no Nesterov), so ``G`` is never written out."""
    if mu == 0:
        if wd:
            w.mul_(1 - lr * wd)
        w.addmm_(g.t(), r, alpha=-lr * a)
        return
    buf = state.get("momentum_buffer")
    if buf is not None and not nesterov:
        buf.mul_(mu)
        if wd:
            buf.add_(w, alpha=wd * (1 - damp))
        buf.addmm_(g.t(), r, alpha=a * (1 - damp))
        w.add_(buf, alpha=-lr)
        return
    d = torch.addmm(w, g.t(), r, beta=wd, alpha=a)  # beta=0 ignores w
    if buf is None:
        buf = state["momentum_buffer"] = d if not nesterov else d.clone()
    else:
        buf.mul_(mu).add_(d, alpha=1 - damp)
    if nesterov:
        d.add_(buf, alpha=mu)
    w.add_(d if nesterov else buf, alpha=-lr)


class SGDInBackward:
    """Take a ``torch.optim.SGD`` step for the weight matrices of fused stacks inside the
    backward pass, as each weight's gradient is formed, instead of writing the gradient out for
    ``optimizer.step()`` to read back: the GEMM for ``α·gᵀ r`` accumulates straight into ``W``
    (or into its momentum buffer). A 10,000-layer width-256 MLP then holds no 2.6 GB of weight
    gradients, and the step saves two passes over them.

    Fusing the update into the backward pass is LOMO's (Lv et al. 2023, "Full Parameter
    Fine-tuning for Large Language Models with Limited Resources", arXiv 2306.09782); here it is
    exactly SGD: every quantity a weight's update uses is computed before that weight changes,
    the learning rate, weight decay, momentum, dampening and Nesterov settings are read from
    the weight's parameter group at each backward pass (so lr schedules apply), and the momentum
    buffer lives in ``optimizer.state`` (so checkpoints hold it). The weights so updated have no
    ``.grad`` and ``optimizer.step()`` skips them; everything else (biases, gates, the stem and
    the classifier, and every block that runs module by module) takes the usual step there. A
    weight that already has a ``.grad`` takes the usual step too.

    Not for gradient clipping or data-parallel training (both need the gradient before any
    update: :func:`depthlab.train` refuses the combination), nor for ``maximize`` or
    ``differentiable`` SGD (refused here). A stack in which two blocks share a weight takes the
    usual step (the weight needs both gradients first); a stack weight must not also be used
    outside the stack before it (its backward would come after the step). ``retain_graph``
    backward passes through an updated node a second time raise torch's in-place-modification
    error.

        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        model.blocks.sgd_in_backward = SGDInBackward(opt)
        opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    """

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        if not isinstance(optimizer, torch.optim.SGD):
            raise DepthlabError(
                f"SGD in the backward pass needs a torch.optim.SGD optimizer, got "
                f"{type(optimizer).__name__}; use optimizer 'sgd' or turn sgd_in_backward off"
            )
        for group in optimizer.param_groups:
            if group.get("maximize") or group.get("differentiable"):
                raise DepthlabError(
                    "SGD in the backward pass does not support maximize=True or "
                    "differentiable=True; turn sgd_in_backward off for those"
                )
        self.optimizer = optimizer
        self._key: tuple | None = None
        self._index: dict[int, int] = {}

    def groups(self) -> tuple[dict[int, int], list[tuple], dict]:
        """``({id(param): group index}, [(lr, weight_decay, momentum, dampening, nesterov) per
        group, as set now], optimizer.state)``; the index is rebuilt only when the groups
        change."""
        groups = self.optimizer.param_groups
        key = tuple((id(g["params"]), len(g["params"])) for g in groups)
        if key != self._key:
            self._index = {id(p): k for k, g in enumerate(groups) for p in g["params"]}
            self._key = key
        specs = [  # (float: a tensor lr, which torch allows, would not pass as a GEMM's alpha)
            (
                float(g["lr"]),
                float(g["weight_decay"]),
                float(g["momentum"]),
                float(g["dampening"]),
                bool(g["nesterov"]),
            )
            for g in groups
        ]
        return self._index, specs, self.optimizer.state


#: compute the parameter gradients of the fused backward pass on a second thread (CPU, with
#: ``torch.get_num_threads() ≥ 2``): the chain ``g ← g W_i`` is sequential, but each
#: ``∂L/∂W_i = α·gᵀ r_i`` is off it, so the two GEMMs of a block run side by side, each on half
#: of torch's threads, instead of each GEMM split over all of them (a 128×256×256 GEMM splits
#: badly: the threads wait on each other). False computes them in line.
GRAD_THREAD = True


class _GradThread:
    """A daemon thread that runs :func:`_param_grads` jobs from a queue. ``join`` waits for the
    jobs handed in so far and re-raises the first error one of them raised."""

    def __init__(self, threads: int) -> None:
        self.jobs: queue.SimpleQueue = queue.SimpleQueue()
        self.done: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = 0
        self.error: BaseException | None = None
        threading.Thread(target=self._run, name="depthlab-fused-grads", daemon=True).start()
        self.set_threads(threads)

    def _run(self) -> None:
        torch.set_grad_enabled(False)  # grad mode is per thread; jobs update no graph
        while True:
            job = self.jobs.get()
            if job is None:  # join
                self.done.put(self.error)
                self.error = None
            elif self.error is None:
                try:
                    if type(job) is int:
                        torch.set_num_threads(job)
                    else:
                        _param_grads(*job)
                except BaseException as e:  # handed to the waiting thread by join
                    self.error = e

    def join(self) -> None:
        self.jobs.put(None)
        error = self.done.get()
        if error is not None:
            raise error

    def set_threads(self, threads: int) -> None:
        """Run the worker's ops on ``threads`` threads (waits: setting the count clears caches
        that must not be in use by another thread meanwhile)."""
        if threads != self.threads:
            self.jobs.put(threads)
            self.join()
            self.threads = threads


_WORKER: list[_GradThread] = []
_WORKER_LOCK = threading.Lock()  # held by the backward pass that uses the thread


def _after_fork_in_child() -> None:
    """A forked child has no gradient thread (only the parent's object) and may have inherited
    the lock held: start afresh, so that the child's first fused backward starts its own."""
    global _WORKER_LOCK
    _WORKER.clear()
    _WORKER_LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _grad_thread(grad: torch.Tensor) -> _GradThread | None:
    """The gradient thread (started on first use), with half of torch's threads, now held by the
    caller (``_WORKER_LOCK``, released after ``join``); None where it does not apply: switched
    off, not CPU, one thread, or in use by a backward pass on another thread."""
    threads = torch.get_num_threads()
    if not GRAD_THREAD or grad.device.type != "cpu" or threads < 2:
        return None
    if not _WORKER_LOCK.acquire(blocking=False):
        return None
    try:
        if not _WORKER:
            _WORKER.append(_GradThread(threads // 2))
        _WORKER[0].set_threads(threads // 2)
    except BaseException:
        _WORKER_LOCK.release()
        raise
    return _WORKER[0]
