"""Freed CPU memory kept for reuse within a training run (glibc's ``malloc`` on Linux).

A deep network's training step allocates and frees the same activation buffers every step. In
the sweep's processes glibc's ``malloc`` maps each buffer of 128 KiB or more on its own and gives
the freed memory back to the operating system (unmapped, or trimmed from the top of the heap):
its adaptive thresholds, which can stop this, adapt or not depending on what the process
allocated before (the imports of depthlab's dependencies included). The next
forward pass then touches new pages: each first touch is a page fault and a page of zeros. A
10,004-layer ResNet on 8×8 inputs took 135,000–220,000 minor page faults per step this way;
measured side by side in separate processes (``benchmarks/bench_heap.py``), keeping the freed
memory removes them and takes 0.85–0.87 of the step time there (0.96–0.97 at 1,000 layers).

:func:`keep_freed_memory` sets two ``mallopt`` parameters for the process: blocks below
``mmap_threshold`` come from the heap (and go back to it when freed), and the heap is never
trimmed by ``free``. The process then keeps its high-water mark until :func:`release_freed_memory`
(``malloc_trim(0)``) hands the free pages back. The ``depthlab`` command sets it for its own
process, and a sweep for its worker processes (local and Ray); every experiment cell releases
when it ends, so that the memory a finished cell held is free for the next one. A library
caller's own process is left as it is unless it calls :func:`keep_freed_memory` itself.
``DEPTHLAB_KEEP_FREED_MEMORY=0`` turns it off. Elsewhere (macOS, Windows, musl) both functions
do nothing and return False.

A sweep's worker processes also start with glibc's ``glibc.malloc.hugetlb=1`` tunable
(glibc ≥ 2.35; :func:`worker_environment`): ``malloc`` then asks the kernel for transparent huge
pages (``madvise(MADV_HUGEPAGE)``) on the memory it takes from the system, so a step that walks
gigabytes of activations takes fewer TLB misses. Tunables are read when a process starts, so only
processes started afterwards (the workers) get it, not the command's own process. Where the
kernel's THP setting is ``never`` it does nothing; older glibc ignores the tunable. Measured side
by side (``benchmarks/bench_heap.py``), against freed memory kept alone: 0.94 of the step time
of 10,004-layer ResNets on 8×8 inputs, 0.93 of a 1,000-layer Wide-ResNet, 0.95 of a 10,000-layer
MLP, 0.97 of a 1,004-layer ResNet and of a 128-layer LM. The arithmetic is the same.
``DEPTHLAB_HUGE_PAGES=0`` turns it off; a ``GLIBC_TUNABLES`` that already sets
``glibc.malloc.hugetlb`` is left as it is.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from functools import cache
from typing import Any

from depthlab.registry import DepthlabError

ENV_VAR = "DEPTHLAB_KEEP_FREED_MEMORY"
HUGE_PAGES_VAR = "DEPTHLAB_HUGE_PAGES"
#: glibc's tunable (glibc >= 2.35): malloc madvises transparent huge pages on what it maps
HUGE_PAGES_TUNABLE = "glibc.malloc.hugetlb"
TUNABLES_VAR = "GLIBC_TUNABLES"
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


def _switch(var: str, off_means: str, on_means: str) -> bool:
    value = os.environ.get(var, "1").strip().lower()
    if value not in ON + OFF:
        raise DepthlabError(
            f"{var}={os.environ[var]!r} is neither on nor off; set it to 0 ({off_means}) or 1 "
            f"({on_means}, the default), or unset it"
        )
    return value in ON


def enabled() -> bool:
    """False where ``DEPTHLAB_KEEP_FREED_MEMORY`` is ``0``, ``false``, ``no`` or ``off``; True
    where it is unset, empty, ``1``, ``true``, ``yes`` or ``on``; any other value is refused
    (:class:`~depthlab.DepthlabError`)."""
    return _switch(ENV_VAR, "glibc's malloc as it comes", "freed memory kept for reuse")


def huge_pages_enabled() -> bool:
    """``DEPTHLAB_HUGE_PAGES`` read as :func:`enabled` reads its variable (on when unset)."""
    return _switch(HUGE_PAGES_VAR, "no huge pages for the workers' malloc", "huge pages")


def worker_environment(environ: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment a sweep's worker process starts with: ``environ`` (default
    ``os.environ``) with ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES`` (see the module
    docstring) — on Linux with glibc, unless ``DEPTHLAB_HUGE_PAGES`` or
    ``DEPTHLAB_KEEP_FREED_MEMORY`` is off or ``GLIBC_TUNABLES`` already sets that tunable."""
    env = dict(os.environ if environ is None else environ)
    on = huge_pages_enabled() and enabled()  # refuses a bad value on every platform
    tunables = env.get(TUNABLES_VAR, "")
    names = {t.split("=", 1)[0].strip() for t in tunables.split(":")}
    if on and _glibc() is not None and HUGE_PAGES_TUNABLE not in names:
        env[TUNABLES_VAR] = ":".join(t for t in (tunables, f"{HUGE_PAGES_TUNABLE}=1") if t)
    return env


@contextmanager
def starting_workers() -> Iterator[None]:
    """``os.environ`` set to :func:`worker_environment` while the block starts worker
    processes (which copy the environment when they start), restored after."""
    before = os.environ.get(TUNABLES_VAR)
    after = worker_environment().get(TUNABLES_VAR)
    if after is not None:
        os.environ[TUNABLES_VAR] = after
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(TUNABLES_VAR, None)
        else:
            os.environ[TUNABLES_VAR] = before


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
