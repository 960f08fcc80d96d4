"""Freed CPU memory kept for reuse within a training run (glibc's ``malloc`` on Linux).

A deep network's training step allocates and frees the same activation buffers every step. In
the sweep's processes glibc's ``malloc`` maps each buffer of 128 KiB or more on its own and gives
the freed memory back to the operating system (unmapped, or trimmed from the top of the heap):
its adaptive thresholds, which can stop this, adapt or not depending on what the process
allocated before (the imports of depthlab's dependencies included). The next
forward pass then touches new pages: each first touch is a page fault and a page of zeros. A
10,004-layer ResNet on 8×8 inputs took 135,000–220,000 minor page faults per step this way;
measured side by side in separate processes (``benchmarks/bench_heap.py``), keeping the freed
memory removes them and takes 0.82–0.90 of the step time there (0.96–0.98 at 1,000 layers).

:func:`keep_freed_memory` sets two ``mallopt`` parameters for the process: blocks below
``mmap_threshold`` come from the heap (and go back to it when freed), and the heap is never
trimmed by ``free``. The process then keeps its high-water mark until :func:`release_freed_memory`
(``malloc_trim(0)``) hands the free pages back. The ``depthlab`` command sets it for its own
process, and a sweep for its worker processes (local and Ray); every experiment cell releases
when it ends, so that the memory a finished cell held is free for the next one. A library
caller's own process is left as it is unless it calls :func:`keep_freed_memory` itself.
``DEPTHLAB_KEEP_FREED_MEMORY=0`` turns it off. Elsewhere (macOS, Windows, musl) both functions
do nothing and return False.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from functools import cache
from typing import Any

from depthlab.registry import DepthlabError

ENV_VAR = "DEPTHLAB_KEEP_FREED_MEMORY"
#: ``mallopt`` parameters (glibc's ``malloc.h``)
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
#: blocks below this come from the heap; larger ones are mapped (and unmapped) on their own
MMAP_THRESHOLD = 256 << 20


@cache
def _glibc() -> Any | None:
    """glibc's handle, or None off Linux/glibc."""
    if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc":
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
    except (OSError, AttributeError):
        return None
    return libc


ON, OFF = ("1", "true", "yes", "on", ""), ("0", "false", "no", "off")


def enabled() -> bool:
    """False where ``DEPTHLAB_KEEP_FREED_MEMORY`` is ``0``, ``false``, ``no`` or ``off``; True
    where it is unset, empty, ``1``, ``true``, ``yes`` or ``on``; any other value is refused
    (:class:`~depthlab.DepthlabError`)."""
    value = os.environ.get(ENV_VAR, "1").strip().lower()
    if value not in ON + OFF:
        raise DepthlabError(
            f"{ENV_VAR}={os.environ[ENV_VAR]!r} is neither on nor off; set it to 0 (glibc's "
            f"malloc as it comes) or 1 (freed memory kept for reuse, the default), or unset it"
        )
    return value in ON


def keep_freed_memory(mmap_threshold: int = MMAP_THRESHOLD) -> bool:
    """Keep freed memory in this process's heap for reuse (see the module docstring): blocks
    below ``mmap_threshold`` bytes from the heap, no trimming on ``free``. True where it was
    set (Linux with glibc, not turned off by ``DEPTHLAB_KEEP_FREED_MEMORY=0``)."""
    on = enabled()  # refuses a bad value on every platform
    libc = _glibc()
    if libc is None or not on:
        return False
    if not 0 < mmap_threshold < 2**31:
        raise ValueError(f"mmap_threshold must be in (0, 2**31) bytes, got {mmap_threshold}")
    # both: setting either one alone turns off glibc's adjustment of the other
    ok = libc.mallopt(M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    return libc.mallopt(M_TRIM_THRESHOLD, -1) == 1 and ok  # -1: never trim


def release_freed_memory() -> bool:
    """Give the heap's free pages back to the operating system (``malloc_trim(0)``). True where
    glibc is there (whether or not anything was released)."""
    libc = _glibc()
    if libc is None:
        return False
    libc.malloc_trim(0)
    return True
