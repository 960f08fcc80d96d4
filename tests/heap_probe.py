"""Probes of glibc's handling of freed memory, run in fresh processes (a subprocess, a sweep
worker) by ``tests/test_heap.py``; importable by spawned workers through the parent's
``sys.path``."""

from __future__ import annotations

import resource

import torch

#: buffers above glibc's default 128 KiB mmap threshold, as a network's activations,
#: 128 MiB in all: above twice the largest threshold glibc moves to by itself (32 MiB)
BLOCK, BLOCKS = 256 << 10, 512


def _faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def glibc_defaults() -> None:
    """Fix glibc's thresholds at their documented defaults (128 KiB each), where they are not
    adapted: every buffer of ≥ 128 KiB is mapped on its own and unmapped when freed — what a
    process that imported depthlab's modules does (whether glibc's adaptation has kicked in
    by then depends on the allocations the imports made, so the tests start from here)."""
    import ctypes

    libc = ctypes.CDLL(None)
    assert libc.mallopt(-3, 128 << 10) == 1  # M_MMAP_THRESHOLD
    assert libc.mallopt(-1, 128 << 10) == 1  # M_TRIM_THRESHOLD


def _round() -> None:
    """Allocate and touch ``BLOCKS`` buffers of ``BLOCK`` bytes, then free them all (a forward
    pass's activations, freed by the backward pass)."""
    bufs = [torch.empty(BLOCK // 4).fill_(1.0) for _ in range(BLOCKS)]
    del bufs


def refault_pages() -> int:
    """Minor page faults of one :func:`_round` after two others: ≈ 0 where freed memory is kept
    for reuse, ≈ BLOCKS × BLOCK / 4 KiB (32,768) where glibc gave it back (the heap's free top
    trimmed after each round)."""
    for _ in range(2):  # twice: glibc's dynamic threshold moves after the first frees
        _round()
    before = _faults()
    _round()
    return _faults() - before


def resident_after(nbytes: int, release: bool) -> tuple[int, int]:
    """(resident bytes while a ``nbytes`` buffer is held, resident bytes after it was freed and,
    with ``release``, :func:`depthlab.heap.release_freed_memory` called)."""
    from depthlab.heap import release_freed_memory

    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()

    x = torch.empty(nbytes // 4).fill_(1.0)
    held = rss()
    del x
    if release:
        release_freed_memory()
    return held, rss()


def worker_refaults() -> tuple[int, int]:
    """In a sweep worker: (page faults of :func:`refault_pages`, pid)."""
    import os

    return refault_pages(), os.getpid()


def huge_pages_after_touching(nbytes: int = 64 << 20) -> tuple[int, str]:
    """This process's anonymous memory in transparent huge pages (KiB) while ``nbytes`` of
    buffers from ``malloc`` are held and touched (freed memory kept, as in a sweep worker), and
    its ``GLIBC_TUNABLES``."""
    import os

    from depthlab.heap import keep_freed_memory

    keep_freed_memory()
    bufs = [torch.empty(BLOCK // 4).fill_(1.0) for _ in range(nbytes // BLOCK)]
    with open("/proc/self/smaps_rollup") as f:
        kb = next(int(line.split()[1]) for line in f if line.startswith("AnonHugePages:"))
    del bufs
    return kb, os.environ.get("GLIBC_TUNABLES", "")
