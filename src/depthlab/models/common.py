"""Shared pieces of depthlab's models: activations, default init, the block stack."""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from depthlab.nn.fusion.stack import SGDInBackward, plan_stack, run_stack
from depthlab.nn.init import fan
from depthlab.nn.residual import Branch, Residual
from depthlab.nn.ws import WeightStandardized
from depthlab.registry import DepthlabError, unknown_choice

ACTIVATIONS = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "linear": nn.Identity,
    "hardtanh": nn.Hardtanh,
    "sigmoid": nn.Sigmoid,
}
#: He-style init gains (``torch.nn.init.calculate_gain``; hard-tanh is the identity near 0, gain 1)
GAINS = {"relu": math.sqrt(2.0), "tanh": 5.0 / 3.0, "linear": 1.0, "hardtanh": 1.0, "sigmoid": 1.0}


def activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        raise unknown_choice("activation", name, sorted(ACTIVATIONS))
    return ACTIVATIONS[name]()


def check_positive(**values: int) -> None:
    """Refuse sizes ≤ 0 with a message naming the argument."""
    for key, value in values.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise DepthlabError(f"{key} must be a positive integer, got {value!r}")


def seq(*modules: nn.Module | None) -> Branch:
    """A :class:`~depthlab.nn.Branch` (an ``nn.Sequential`` that fuses scalar gates and biases
    into the weight layer before them) of the given modules, dropping the ``None`` slots a scheme
    left empty."""
    return Branch(*[m for m in modules if m is not None])


class BlockStack(nn.Sequential):
    """The residual blocks of a model, run in order; optional activation checkpointing.

    With ``checkpoint_segments = s > 0`` the stack is split into s segments whose activations are
    recomputed in the backward pass (``torch.utils.checkpoint``, non-reentrant, segments as in
    ``checkpoint_sequential``: s − 1 checkpointed segments of ``len // s`` blocks, the rest run
    normally): memory O(s + depth/s) blocks instead of O(depth), at the cost of one extra forward
    pass. The recomputation restores every buffer of the segment afterwards, so BatchNorm running
    statistics (and ``num_batches_tracked``) are updated once per step, as without checkpointing.

    A stack whose blocks are all ``s·x + α·W σ(x) + α·b`` or ``s·x + α·W σ(LayerNorm(x)) + α·b``
    (the MLP with ``rezero``, ``skipinit``, ``plain``, ``scaled``, ``noskip``, ``layernorm``) runs
    fused (:mod:`depthlab.nn.fusion.stack`): a few autograd nodes with a hand-written backward,
    the same function and gradients; checkpointing is then done inside those nodes.
    ``fuse = False`` turns it off (double backward needs that).
    """

    checkpoint_segments: int = 0
    #: run a stack of gated linear blocks (``s·x + α·W σ(x) + α·b``, optionally with a LayerNorm
    #: before σ) as fused autograd nodes
    #: (:mod:`depthlab.nn.fusion.stack`); False runs it module by module (double backward
    #: needs that; ``depthlab.nn.fusion(False)`` turns every fused path off)
    fuse: bool = True
    #: a :class:`~depthlab.nn.fusion.stack.SGDInBackward`: the fused blocks' weight matrices take
    #: that optimizer's SGD step in the backward pass instead of getting gradients (None: off)
    sgd_in_backward: SGDInBackward | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # blocks that are exactly the identity (a gate fixed at 0: the frozen-gate controls)
        # are skipped: the same function without the work
        live = [b for b in self if not (isinstance(b, Residual) and b.is_identity())]
        if not live:
            return x
        if self.fuse:
            plans = plan_stack(live, x)
            if plans is not None:
                return run_stack(plans, x, self.checkpoint_segments, self.sgd_in_backward)
        if self.checkpoint_segments > 0 and torch.is_grad_enabled() and len(live) > 1:
            blocks = live
            segments = min(self.checkpoint_segments, len(blocks))
            size = len(blocks) // segments
            end = 0
            for start in range(0, size * (segments - 1), size):
                end = start + size
                x = checkpoint(_Segment(blocks[start:end]), x, use_reentrant=False)
            blocks = blocks[end:]
        else:
            blocks = live
        for block in blocks:
            x = block(x)
        return x


class _Segment:
    """A run of blocks for ``torch.utils.checkpoint``. Its first call is the forward pass; any
    later call is a recomputation in the backward pass, which must not change module state: the
    segment's buffers (BatchNorm running mean/var, batch counters) are put back as they were
    after it, also when the checkpoint stops the recomputation early (by raising)."""

    __slots__ = ("blocks", "calls")

    def __init__(self, blocks: list[nn.Module]) -> None:
        self.blocks = blocks
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        saved = []
        if self.calls > 1:
            with torch.no_grad():
                for block in self.blocks:
                    for m in block.modules():
                        for name, b in m._buffers.items():
                            if b is not None:
                                saved.append((m, name, b.clone()))
        try:
            for block in self.blocks:
                x = block(x)
            return x
        finally:
            if saved:
                with torch.no_grad():
                    for m, name, b in saved:
                        m._buffers[name].copy_(b)


#: models with more weights than this are initialised by several threads (see normal_init_)
PARALLEL_INIT_NUMEL = 1 << 24


def normal_init_(tensors: list[tuple[torch.Tensor, float]]) -> None:
    """Fill each ``(tensor, std)`` with ``N(0, std²)`` samples, in place.

    Small models take one sequential pass over torch's global generator. Above
    ``PARALLEL_INIT_NUMEL`` weights (e.g. a 10,000-layer MLP: 655M weights) each tensor gets its
    own generator, seeded from one draw of the global generator, and the tensors are filled by
    ``torch.get_num_threads()`` threads (``normal_`` on one layer is serial in torch, and filling
    fresh memory is page-fault bound). The values then depend on ``torch.manual_seed`` only, not on
    the number of threads.
    """
    if sum(t.numel() for t, _ in tensors) < PARALLEL_INIT_NUMEL:
        for t, std in tensors:
            t.normal_(0.0, std)
        return
    seeds = torch.randint(0, 2**62, (len(tensors),)).tolist()
    workers = max(1, torch.get_num_threads())

    def fill(first: int) -> None:
        for i in range(first, len(tensors), workers):
            t, std = tensors[i]
            g = torch.Generator(device=t.device)
            g.manual_seed(seeds[i])
            with torch.no_grad():  # grad mode is per thread
                t.normal_(0.0, std, generator=g)

    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(fill, range(workers)))


def default_init(model: nn.Module, gain: float, mode: str = "fan_in") -> None:
    """He/LeCun normal init of every conv and linear (``std = gain/√fan``, ``fan`` the fan-in,
    or the fan-out with ``mode="fan_out"`` for convs, as in the original ResNet code), zero
    biases; every other module with ``reset_parameters`` (norms, gates, scalar biases) is reset.
    The module named ``classifier`` gets gain 1 and always its fan-in."""
    head = getattr(model, "classifier", None)
    weights = []
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                w = module.weight
                conv = not isinstance(module, nn.Linear)
                g = 1.0 if module is head else gain
                weights.append((w, g / math.sqrt(fan(w, mode if conv else "fan_in"))))
                if module.bias is not None:
                    module.bias.zero_()
                if isinstance(module, WeightStandardized):
                    module.reset_gain()
            elif module is not model and hasattr(module, "reset_parameters"):
                module.reset_parameters()
            elif isinstance(module, nn.modules.batchnorm._NormBase):
                module.reset_running_stats()
        normal_init_(weights)


def materialize(model: nn.Module, device: torch.device | str | None = None) -> None:
    """Allocate a model built on the ``meta`` device (construction without the cost of torch's own
    per-layer init, which depthlab overwrites anyway)."""
    device = torch.device(device or "cpu")
    allocated: dict[int, nn.Parameter] = {}  # a parameter shared by several modules stays shared
    for module in model.modules():
        for name, p in module._parameters.items():
            if p is not None and p.is_meta:
                if id(p) not in allocated:
                    new = torch.empty(p.shape, dtype=p.dtype, device=device)
                    allocated[id(p)] = nn.Parameter(new, requires_grad=p.requires_grad)
                module._parameters[name] = allocated[id(p)]
        for name, b in module._buffers.items():
            if b is not None and b.is_meta:
                module._buffers[name] = torch.empty(b.shape, dtype=b.dtype, device=device)
