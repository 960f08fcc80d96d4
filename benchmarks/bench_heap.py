"""Training steps with glibc's default ``malloc`` settings, with freed memory kept for reuse, and
kept with huge pages.

    .venv/bin/python benchmarks/bench_heap.py                 # every network, 2 pairs
    .venv/bin/python benchmarks/bench_heap.py --nets fixup-1004-b32 --pairs 3 --steps 5

Each network is one training step of a ``deep``-preset cell, as the experiments build it
(:func:`depthlab.experiments.timing.build_step`: its scheme, options, optimizer, batch and
layout), run in a fresh process per measurement — ``default`` (glibc as it comes), ``kept``
(:func:`depthlab.heap.keep_freed_memory`) and ``huge`` (kept, in a process started with
:func:`depthlab.heap.worker_environment`: ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1``, transparent
huge pages for ``malloc``; both are what ``depthlab run`` sets in its workers) — in turn,
``--pairs`` times (the order reversed every other round), so that drift in the machine's load
falls on all. A process builds the network, takes ``--warmup`` untimed steps, then ``--steps``
timed ones (one thread) and reports the median seconds per step, the minor page faults per step,
its peak resident memory and its memory in huge pages at the end. The table gives the medians
over rounds and the ratios kept / default and huge / kept per network; CSV
``benchmarks/results/heap.csv``. Linux with glibc only (elsewhere ``keep_freed_memory`` does
nothing and the tunable is not set).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import time

from _results import child_result, chosen, in_turn, print_table, write_csv

#: name: (model, sizes, batch, example shape, scheme, options, optimizer, channels-last)
NETS = {
    "fixup-10004-b64": ("resnet", {"depth": 10004, "width": 1, "variant": "postact"}, 64,
                        (1, 8, 8), "fixup", {}, "sgd", True),
    "bn-10004-b64": ("resnet", {"depth": 10004, "width": 1, "variant": "postact"}, 64, (1, 8, 8),
                     "batchnorm", {"zero_init_residual": True}, "sgd", True),
    "fixup-1004-b32": ("resnet", {"depth": 1004, "width": 1}, 32, (1, 8, 8), "fixup", {}, "sgd",
                       True),
    "wrn-1000-k2-bn-b64": ("resnet", {"depth": 1000, "width": 2, "variant": "preact"}, 64,
                           (1, 8, 8), "batchnorm", {}, "sgd", True),
    "mlp-10000-rezero": ("mlp", {"depth": 10000, "width": 64, "in_dim": 64}, 64, (64,), "rezero",
                         {}, "adam", False),
    "lm-128-postnorm": ("transformer-lm", {"depth": 128, "d_model": 32, "nhead": 4,
                                           "context": 32}, 16, (32,), "postnorm", {}, "adam",
                        False),
}  # fmt: skip
MODES = ("default", "kept", "huge")


def huge_pages_kb() -> int:
    """This process's anonymous memory in transparent huge pages, in KiB (0 where unknown)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            for line in f:
                if line.startswith("AnonHugePages:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def child(net: str, mode: str, steps: int, warmup: int) -> dict:
    """One measurement in this (fresh) process."""
    from depthlab.heap import keep_freed_memory

    kept = keep_freed_memory() if mode != "default" else False
    import torch

    from depthlab.experiments.timing import Step, build_step

    torch.set_num_threads(1)
    model, sizes, batch, shape, scheme, options, optimizer, cl = NETS[net]
    if model != "mlp" and model != "transformer-lm":
        sizes = {**sizes, "in_channels": shape[0]}
    step = Step(model=model, sizes=tuple(sorted(sizes.items())), batch=batch, shape=shape,
                scheme=scheme, options=tuple(sorted(options.items())), optimizer=optimizer,
                channels_last=cl)  # fmt: skip
    _, one_step = build_step(step)
    for _ in range(warmup):
        one_step()
    times, faults = [], []
    for _ in range(steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        one_step()
        times.append(time.perf_counter() - t0)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    return {
        "s_per_step": statistics.median(times),
        "faults_per_step": statistics.median(faults),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "applied": kept,
        "huge_mb": huge_pages_kb() / 1024,
    }


def measure(net: str, mode: str, steps: int, warmup: int) -> dict:
    from depthlab.heap import worker_environment

    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    return child_result(
        __file__, "--child", net, mode, "--steps", str(steps), "--warmup", str(warmup),
        env=worker_environment(env) if mode == "huge" else env,
    )  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nets", default=",".join(NETS), help=f"comma list of: {', '.join(NETS)}")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per process")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per process first")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--child", nargs=2, metavar=("NET", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.steps, args.warmup)))
        return 0
    nets = chosen(ap, args.nets, NETS)
    rows = []
    for net in nets:

        def show(p: int, mode: str, r: dict, net: str = net) -> None:
            print(f"{net:20s} pair {p} {mode:8s} {r['s_per_step']:8.3f} s/step "
                  f"{r['faults_per_step']:9.0f} faults/step  peak {r['peak_rss_mb']:7.0f} MB",
                  flush=True)  # fmt: skip

        got = in_turn(
            MODES, args.pairs, lambda mode, net=net: measure(net, mode, args.steps, args.warmup),
            show,
        )  # fmt: skip
        row = {"net": net, "pairs": args.pairs, "steps": args.steps}
        for mode in MODES:
            rs = got[mode]
            row[f"{mode}_s_per_step"] = round(statistics.median(r["s_per_step"] for r in rs), 4)
            row[f"{mode}_faults_per_step"] = round(statistics.median(
                r["faults_per_step"] for r in rs))  # fmt: skip
            row[f"{mode}_peak_rss_mb"] = round(max(r["peak_rss_mb"] for r in rs))
        row["huge_mb"] = round(statistics.median(r["huge_mb"] for r in got["huge"]))
        row["kept_applied"] = all(r["applied"] for m in ("kept", "huge") for r in got[m])
        for a, b in (("kept", "default"), ("huge", "kept")):
            row[f"ratio_{a}_over_{b}"] = round(row[f"{a}_s_per_step"] / row[f"{b}_s_per_step"], 3)
            row[f"{a}_{b}_pair_ratios"] = " ".join(
                f"{x['s_per_step'] / y['s_per_step']:.2f}"
                for y, x in zip(got[b], got[a], strict=True)
            )
        rows.append(row)
    print_table(rows, [("net", "20"), ("default_s_per_step", "8"), ("kept_s_per_step", "8"),
                       ("huge_s_per_step", "8"), ("ratio_kept_over_default", "6"),
                       ("ratio_huge_over_kept", "6"), ("huge_kept_pair_ratios", "12"),
                       ("default_faults_per_step", "8"), ("kept_faults_per_step", "8"),
                       ("kept_peak_rss_mb", "8"), ("huge_peak_rss_mb", "8"),
                       ("huge_mb", "8")])  # fmt: skip
    write_csv("heap.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
