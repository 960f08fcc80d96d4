"""Memory estimates, checked before anything is allocated.

``depthlab train --depth 1000000000`` would build Python modules for minutes and grow without
bound; ``--batch-size 1e9`` would die in the allocator. :func:`estimate` computes, from a
model's constructor arguments alone (nothing is built), how many parameters and modules it has
and how many activations one training example keeps for the backward pass; :func:`check_fits`
refuses what would not fit in this machine's memory with a one-line
:class:`~depthlab.DepthlabError` naming the figure.

The estimates are deliberately rough (within a small factor): they are a guard against sizes
that are off by orders of magnitude, not a planner. Raise the limit with ``--max-memory GB``
(CLI) or the ``DEPTHLAB_MAX_MEMORY`` environment variable (GB) on a machine whose memory is not
what the operating system reports, e.g. with swap or unified memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from depthlab.registry import DepthlabError

ENV_VAR = "DEPTHLAB_MAX_MEMORY"
#: bytes of Python and torch bookkeeping per ``nn.Module`` (measured: ≈ 14 KB per 5-module MLP
#: block of width 8 on CPython 3.11, torch 2.13)
MODULE_BYTES = 3_000
#: activations kept per layer and unit for the backward pass (input, norm, non-linearity, ...)
SAVED_PER_LAYER = 6
#: float32
BYTES = 4
GIB = 1 << 30


@dataclass(frozen=True)
class Estimate:
    """The size of one model: ``params`` (numbers), ``modules`` (``nn.Module`` instances) and
    ``activations_per_example`` (numbers kept for the backward pass per training example)."""

    params: int
    modules: int
    activations_per_example: int

    def bytes(self, batch_size: int = 0, copies: int = 4) -> int:
        """``copies`` of the weights (1: the model; training: weights, gradients and the
        optimizer's states, 3 for SGD with momentum, 4 for Adam), module bookkeeping, and the
        activations of a batch of ``batch_size``."""
        weights = self.params * BYTES * copies
        return int(
            weights
            + self.modules * MODULE_BYTES
            + batch_size * self.activations_per_example * BYTES
        )


def _int(kw: dict[str, Any], key: str, default: int) -> int:
    v = kw.get(key, default)
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else default


def estimate(
    model: str, kw: dict[str, Any], input_shape: tuple[int, ...] | None = None
) -> Estimate | None:
    """The :class:`Estimate` of model ``model`` built with keyword arguments ``kw`` (None for a
    model this module does not know). ``input_shape`` (one example, e.g. ``(3, 32, 32)``) sets
    the spatial size of image models (default 32×32)."""
    depth = _int(kw, "depth", 8)
    if model in ("mlp", "linear"):
        w = _int(kw, "width", 256 if model == "mlp" else 64)
        d_in = _int(kw, "in_dim", w)
        classes = _int(kw, "num_classes", 10)
        per_block = w * w + 4 * w
        params = depth * per_block + (d_in * w + w * classes if model == "mlp" else 0)
        return Estimate(params, 6 * depth + 8, SAVED_PER_LAYER * depth * w + d_in)
    if model in ("resnet", "resnet-bottleneck"):
        k = _int(kw, "width", 1)
        c_in = _int(kw, "in_channels", 3)
        h, w = (
            (input_shape[-2], input_shape[-1])
            if input_shape and len(input_shape) == 3
            else (32, 32)
        )
        if model == "resnet":
            n = max(1, (depth - 2) // 6)
            stages = [(16 * k, n, 1), (32 * k, n, 4), (64 * k, n, 16)]
            params = sum(nb * 2 * 9 * c * c for c, nb, _ in stages)
            acts = sum(nb * 2 * SAVED_PER_LAYER * c * h * w // area for c, nb, area in stages)
            return Estimate(params + 9 * c_in * 16, 14 * 3 * n + 10, acts)
        from depthlab.models.resnet import BOTTLENECK_LAYERS

        layers = BOTTLENECK_LAYERS.get(depth, (3, 4, 6, 3))
        base = _int(kw, "base_width", 64)
        params = acts = 0
        stem_area = 16 if kw.get("stem", "imagenet") == "imagenet" else 1
        for stage, nb in enumerate(layers):
            c = base * k * 2**stage
            params += nb * (4 * c * c + 9 * c * c + 4 * c * c)
            acts += nb * 3 * SAVED_PER_LAYER * c * h * w // (stem_area * 4**stage)
        return Estimate(params + 49 * c_in * base, 16 * sum(layers) + 10, acts)
    if model == "transformer-lm":
        d = _int(kw, "d_model", 128)
        t = _int(kw, "context", 128)
        heads = _int(kw, "nhead", 4)
        ff = _int(kw, "dim_feedforward", 4 * d)
        vocab = _int(kw, "vocab_size", 256)
        params = depth * (4 * d * d + 2 * d * ff + 8 * d) + 2 * vocab * d + t * d
        acts = depth * t * (SAVED_PER_LAYER * d + 2 * ff + 2 * heads * t) + t * vocab
        return Estimate(params, 20 * depth + 8, acts)
    return None


def memory_limit(device: str = "cpu") -> int:
    """Bytes a run may use: ``$DEPTHLAB_MAX_MEMORY`` GB if set, else the device's memory (the
    machine's physical memory for the CPU)."""
    env = os.environ.get(ENV_VAR)
    if env:
        try:
            gb = float(env)
        except ValueError:
            raise DepthlabError(f"${ENV_VAR} must be a number of GB, got {env!r}") from None
        if not math.isfinite(gb) or gb <= 0:
            raise DepthlabError(f"${ENV_VAR} must be a positive number of GB, got {env!r}")
        return int(gb * GIB)
    if str(device).startswith("cuda"):
        import torch

        if torch.cuda.is_available():
            index = int(str(device).partition(":")[2] or 0)
            return int(torch.cuda.get_device_properties(index).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62  # unknown: no limit


def set_max_memory(gb: float | None) -> None:
    """Set (or, with None, clear) the limit of :func:`memory_limit` for this process."""
    if gb is None:
        os.environ.pop(ENV_VAR, None)
        return
    if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not math.isfinite(gb) or gb <= 0:
        raise DepthlabError(f"--max-memory must be a positive number of GB, got {gb!r}")
    os.environ[ENV_VAR] = repr(float(gb))


def gib(n: float) -> str:
    return f"{n / GIB:,.1f} GiB" if n >= GIB / 10 else f"{n / (1 << 20):,.0f} MiB"


def check_fits(
    model: str,
    kw: dict[str, Any],
    batch_size: int = 0,
    input_shape: tuple[int, ...] | None = None,
    device: str = "cpu",
    copies: int = 4,
) -> int | None:
    """Refuse a model (and batch) whose estimate exceeds :func:`memory_limit`; returns the
    estimated bytes (None if the model is unknown)."""
    est = estimate(model, kw, input_shape)
    if est is None:
        return None
    need = est.bytes(batch_size, copies)
    limit = memory_limit(device)
    if need > limit:
        parts = f"{est.params:,} parameters, {est.modules:,} modules"
        if batch_size:
            acts = gib(batch_size * est.activations_per_example * BYTES)
            parts += f", activations of a batch of {batch_size:,}: {acts}"
        raise DepthlabError(
            f"model '{model}' with these sizes would need about {gib(need)} ({parts}), more than "
            f"the {gib(limit)} available; lower depth, width or batch size, or raise the limit "
            f"with --max-memory GB (or ${ENV_VAR})"
        )
    return need


def allocation_error(e: BaseException, what: str, need: int | None) -> DepthlabError | None:
    """A :class:`~depthlab.DepthlabError` for an allocator failure (None if ``e`` is not one)."""
    text = str(e)
    oom = type(e).__name__ == "OutOfMemoryError" or any(
        s in text for s in ("can't allocate memory", "out of memory", "not enough memory")
    )
    if not oom and not isinstance(e, MemoryError):
        return None
    guess = f" (estimated {gib(need)})" if need else ""
    first = text.splitlines()[0][:120] if text else "MemoryError"
    return DepthlabError(
        f"{what} ran out of memory{guess}: {first}; lower depth, width or batch size"
    )
