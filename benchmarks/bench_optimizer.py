"""Optimizer step of a very deep model: torch's fused kernels vs multi-tensor vs per-parameter.

    .venv/bin/python benchmarks/bench_optimizer.py [--depth 10000] [--width 64] [--rounds 5]

The parameters of a ``depth``-layer ReZero MLP (3 tensors per block: 30,004 at depth 10,000)
get fixed random gradients; then Adam and SGD with momentum each take ``--rounds`` steps per
implementation — ``fused=True`` (what :func:`depthlab.train.optim.make_optimizer` picks where
torch has it), ``foreach=True`` and the per-parameter loop (``foreach=False``), and for Adam
``kept``: the same fused optimizer stepped by :func:`depthlab.train.optim.optimizer_step` (what
the training loop calls: the same kernel on the lists kept from the previous step) — interleaved
in rotated order within every round, one thread. The table gives the median step time per
implementation and its ratio to the fused one, measured side by side; CSV
``benchmarks/results/optimizer.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import depthlab as dl
from _results import write_csv
from depthlab.train.optim import optimizer_step

IMPLS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}
#: the fused optimizer stepped by optimizer_step (Adam only: it is plain step() for the others)
KEPT = ("kept",)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depth", type=int, default=10_000)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--csv", default=None, help="default benchmarks/results/optimizer.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=args.depth, width=args.width, scheme="rezero")
    params = list(model.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    rows = []
    for name, make in (
        ("adam", lambda kw: torch.optim.Adam(params, lr=1e-3, **kw)),
        ("sgd-momentum", lambda kw: torch.optim.SGD(params, lr=1e-3, momentum=0.9, **kw)),
    ):
        opts = {impl: make(kw) for impl, kw in IMPLS.items()}
        for opt in opts.values():
            opt.step()  # state allocated, kernels warm
        if name == "adam":  # the fused optimizer itself, stepped the other way in turn
            opts["kept"] = opts["fused"]
            optimizer_step(opts["kept"])  # the lists kept
        times: dict[str, list[float]] = {impl: [] for impl in opts}
        names = list(opts)
        for r in range(args.rounds):
            for impl in names[r % len(names) :] + names[: r % len(names)]:
                t0 = time.perf_counter()
                if impl in KEPT:
                    optimizer_step(opts[impl])
                else:
                    opts[impl].step()
                times[impl].append(time.perf_counter() - t0)
        fused = statistics.median(times["fused"])
        for impl, t in times.items():
            med = statistics.median(t)
            rows.append({
                "optimizer": name, "implementation": impl, "tensors": len(params),
                "step_s": round(med, 4), "step_min_s": round(min(t), 4),
                "step_max_s": round(max(t), 4), "vs_fused": round(med / fused, 2),
                "rounds": args.rounds,
            })  # fmt: skip
    print(f"optimizer step, {len(params)} tensors (ReZero MLP {args.depth} x {args.width}), "
          f"1 thread, median of {args.rounds} interleaved rounds")  # fmt: skip
    print(f"{'optimizer':<14} {'impl':<8} {'step s':>8} {'range':>16} {'x fused':>8}")
    for r in rows:
        span = f"{r['step_min_s']:.3f}-{r['step_max_s']:.3f}"
        print(
            f"{r['optimizer']:<14} {r['implementation']:<8} {r['step_s']:>8.3f} {span:>16} "
            f"{r['vs_fused']:>8.2f}"
        )
    write_csv("optimizer.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
