"""DistributedBatchNorm (statistics over all ranks, any device) against torch's BatchNorm2d, side by
side in one process: forward + backward time of one layer.

    .venv/bin/python benchmarks/bench_sync_bn.py [--shape 128,16,32,32] [--reps 30] [--rounds 5]

The distributed layer runs its real collective path in a one-rank gloo group (the all-gather of
the statistics and the all-reduce of the gradient sums happen, over no network), so the figure
is its compute overhead over torch's fused kernel; with several ranks the collectives add their
network time. Each round times ``--reps`` forward + backward passes of each layer, alternating;
the table gives the median over rounds and the ratio within each round.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.distributed as dist
from torch import nn

from _results import write_csv
from depthlab.nn import convert_distributed_batchnorm


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--shape", default="128,16,32,32", help="N,C,H,W")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--channels-last", action="store_true")
    ap.add_argument("--csv", default=None, help="default benchmarks/results/sync_bn.csv")
    args = ap.parse_args(argv)
    shape = tuple(int(v) for v in args.shape.split(","))
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        x = torch.randn(shape).to(memory_format=fmt).requires_grad_(True)
        g = torch.randn(shape).to(memory_format=fmt)
        layers = {
            "BatchNorm2d": nn.BatchNorm2d(shape[1]),
            "DistributedBatchNorm": convert_distributed_batchnorm(nn.BatchNorm2d(shape[1])),
        }

        def timed(bn: nn.Module) -> float:
            t = time.perf_counter()
            for _ in range(args.reps):
                bn(x).backward(g)
            return (time.perf_counter() - t) / args.reps

        for bn in layers.values():  # warm-up
            timed(bn)
        times: dict[str, list[float]] = {name: [] for name in layers}
        for _ in range(args.rounds):
            for name, bn in layers.items():
                times[name].append(timed(bn))
    finally:
        dist.destroy_process_group()
    print(
        f"one BatchNorm layer, input {shape} {'NHWC' if args.channels_last else 'NCHW'}, "
        f"forward + backward, {torch.get_num_threads()} threads, {args.rounds} rounds × "
        f"{args.reps} passes"
    )
    print("\n| layer | ms (median of rounds) | × BatchNorm2d (median of per-round ratios) |")
    print("|---|---|---|")
    ref = times["BatchNorm2d"]
    rows = []
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, ref))
        print(f"| {name} | {statistics.median(t) * 1e3:.2f} | {ratio:.2f} |")
        rows.append({
            "layer": name, "layout": "NHWC" if args.channels_last else "NCHW",
            "shape": "x".join(map(str, shape)), "ms": round(statistics.median(t) * 1e3, 3),
            "vs_BatchNorm2d": round(ratio, 3),
        })  # fmt: skip
    write_csv("sync_bn.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
