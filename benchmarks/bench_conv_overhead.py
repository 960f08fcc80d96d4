"""The fixed cost of one convolution call at a deep CIFAR ResNet's shapes on 1×8×8 inputs: what a
call costs whatever its batch, and so what no amount of depth amortizes.

    .venv/bin/python benchmarks/bench_conv_overhead.py              # the table and the CSV
    .venv/bin/python benchmarks/bench_conv_overhead.py --rounds 3 --calls 50

The three 3×3 convolutions of the ResNet's stages on 1×8×8 inputs — 16 channels on 8×8 maps,
32 on 4×4, 64 on 2×2 — as the models run them (``depthlab.nn.Conv2d``, channels-last, one torch
thread: oneDNN's kernels through ``F.conv2d`` on 8×8 and 4×4, one matrix product on 2×2,
:func:`depthlab.nn.conv3x3_2x2`), each timed at batch sizes 8 to 128 in three passes: forward
(``fwd``) and backward (``bwd``: the input's and the weight's gradients, as a step's backward
computes them — one ``torch.ops.aten.convolution_backward``, or on 2×2 maps the matrix
product's autograd backward through a kept graph). The shapes take turns within every round
(``--rounds``, each the mean of ``--calls`` calls), so drift in the machine's load falls on all
of them alike; the figure is the median over rounds.

A least-squares line ``t(N) = fixed + N · per_example`` through the five batch sizes splits a
call into its fixed part (``fixed_us``: dispatch, oneDNN's primitive lookup and set-up, the
allocations; what a call costs at batch 0) and the part that grows with the batch;
``fixed_share_32`` is the fixed part's share of a call at batch 32 (the ``depth-sweep``
batch). ``step_fixed_s`` multiplies the fixed parts by the calls of one SGD step of the
10,004-layer ResNet (1,667 blocks per stage, two convolutions each, one call per pass each),
beside ``step_calls_s``, the same calls' whole time at batch 32: the part of a step that is
fixed cost, before any elementwise operation, norm or optimizer. Rows go to
``benchmarks/results/conv_overhead.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from _results import print_table, write_csv
from depthlab.nn import Conv2d

BATCHES = (8, 16, 32, 64, 128)
#: (stage label, channels, map size) of the CIFAR ResNet's stages on 1×8×8 inputs
STAGES = (("8x8", 16, 8), ("4x4", 32, 4), ("2x2", 64, 2))
PASSES = ("fwd", "bwd")
#: convolutions per stage in one step of the 10,004-layer ResNet: 1,667 blocks × 2
CALLS_PER_STAGE = 2 * (10004 - 2) // 6


def _call(conv: Conv2d, x: torch.Tensor, g: torch.Tensor, part: str):
    """One call of ``part`` on ``conv`` (see the module docstring)."""
    if part == "fwd":
        return lambda: conv(x)
    w = conv.weight
    if x.shape[-1] == 2:  # the matrix-product path: its autograd backward, graph kept
        y = conv(x)
        return lambda: torch.autograd.grad(y, (x, w), g, retain_graph=True)
    args = ([1, 1], [1, 1], [1, 1], False, [0, 0], 1, [True, True, False])
    return lambda: torch.ops.aten.convolution_backward(g, x, w, None, *args)


def measure(rounds: int, calls: int) -> dict[tuple[str, str, int], float]:
    """Seconds per call of every stage × pass × batch, the median over ``rounds``."""
    cl = torch.channels_last
    fns = {}
    for label, c, h in STAGES:
        torch.manual_seed(0)
        conv = Conv2d(c, c, 3, padding=1, bias=False).to(memory_format=cl)
        for n in BATCHES:
            x = torch.randn(n, c, h, h).contiguous(memory_format=cl).requires_grad_()
            g = torch.randn(n, c, h, h).contiguous(memory_format=cl)
            for part in PASSES:
                fns[(label, part, n)] = _call(conv, x, g, part)
    got: dict[tuple, list[float]] = {k: [] for k in fns}
    for r in range(rounds):
        for k, fn in fns.items():
            for _ in range(3):
                fn()
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            got[k].append((time.perf_counter() - t0) / calls)
        print(f"round {r + 1}/{rounds} done", flush=True)
    return {k: statistics.median(v) for k, v in got.items()}


def fit(times: dict[float, float]) -> tuple[float, float, float]:
    """Least-squares ``t = a + b·N`` through (batch, seconds) pairs: (a, b, R²)."""
    ns, ts = list(times), list(times.values())
    mn, mt = statistics.fmean(ns), statistics.fmean(ts)
    sxx = sum((n - mn) ** 2 for n in ns)
    b = sum((n - mn) * (t - mt) for n, t in zip(ns, ts)) / sxx
    a = mt - b * mn
    ss = sum((t - mt) ** 2 for t in ts)
    r2 = 1 - sum((t - a - b * n) ** 2 for n, t in zip(ns, ts)) / ss if ss else 1.0
    return a, b, r2


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--calls", type=int, default=100, help="calls per timing")
    ap.add_argument("--csv", default=None, help="default: results/conv_overhead.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, 1 thread, channels-last, batches {BATCHES}")
    med = measure(args.rounds, args.calls)
    rows = []
    for label, c, _ in STAGES:
        for part in PASSES:
            a, b, r2 = fit({n: med[(label, part, n)] for n in BATCHES})
            t32 = med[(label, part, 32)]
            rows.append({
                "stage": label, "channels": c, "pass": part,
                **{f"us_n{n}": round(med[(label, part, n)] * 1e6, 1) for n in BATCHES},
                "fixed_us": round(a * 1e6, 1), "per_example_us": round(b * 1e6, 2),
                "r2": round(r2, 4), "fixed_share_32": round(a / t32, 3),
                "step_fixed_s": round(a * CALLS_PER_STAGE, 3),
                "step_calls_s": round(t32 * CALLS_PER_STAGE, 3),
            })  # fmt: skip
    fixed = sum(r["step_fixed_s"] for r in rows)
    whole = sum(r["step_calls_s"] for r in rows)
    total = dict.fromkeys(rows[0], "")
    total.update(stage="all", step_fixed_s=round(fixed, 3), step_calls_s=round(whole, 3),
                 fixed_share_32=round(fixed / whole, 3))  # fmt: skip
    rows.append(total)
    columns = [("stage", 6), ("channels", 9), ("pass", 5), ("us_n8", 8), ("us_n32", 8),
               ("us_n128", 8), ("fixed_us", 9), ("per_example_us", 15), ("r2", 7),
               ("fixed_share_32", 15), ("step_fixed_s", 13), ("step_calls_s", 13)]  # fmt: skip
    print_table(rows, columns)
    write_csv("conv_overhead.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
