"""The frozen-gate control of a deep ResNet: its branches skipped vs computed, side by side.

    .venv/bin/python benchmarks/bench_frozen_control.py [--depth 1004] [--rounds 5]

A control net is SkipInit's with every gate fixed at 0: its branches cannot reach the output,
so ``Residual`` computes only ``post(c·shortcut(x))`` (:meth:`depthlab.nn.Residual.branch_unused`).
One SGD step (momentum 0.9, batch 64, 1×8×8, one thread) of the control on the post-activation
and the pre-activation CIFAR ResNet, with the branches skipped and computed — a global no-op
forward hook turns the skip off, as it would for any observer — interleaved within each round;
median step time and the ratio. CSV ``benchmarks/results/frozen_control.csv``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F
import torch.nn.modules.module as module_mod

import depthlab as dl
from _results import write_csv


def step(model, opt, x, y) -> float:
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    opt.step()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depth", type=int, default=1004)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--csv", default=None, help="default benchmarks/results/frozen_control.csv")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 10, (64,))
    rows = []
    for variant in ("postact", "preact"):
        model = dl.create_model(
            "resnet", depth=args.depth, variant=variant, in_channels=1, scheme="skipinit",
            scheme_options={"learnable": False},
        )  # fmt: skip
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        times = {"skipped": [], "computed": []}
        for r in range(args.rounds + 1):  # round 0 warms up
            for mode in ("skipped", "computed")[:: 1 if r % 2 else -1]:
                handle = None
                if mode == "computed":
                    handle = module_mod.register_module_forward_hook(lambda *a: None)
                try:
                    t = step(model, opt, x, y)
                finally:
                    if handle is not None:
                        handle.remove()
                if r:
                    times[mode].append(t)
        skipped, computed = (statistics.median(times[m]) for m in ("skipped", "computed"))
        rows.append({
            "net": variant, "depth": args.depth, "skipped_s": round(skipped, 4),
            "computed_s": round(computed, 4), "speedup": round(computed / skipped, 1),
            "rounds": args.rounds,
        })  # fmt: skip
    print(f"frozen-gate control, one SGD step, batch 64, 1x8x8, 1 thread, median of {args.rounds}")
    for r in rows:
        print(
            f"{r['net']:<8} depth {r['depth']}: skipped {r['skipped_s']:.3f} s, computed "
            f"{r['computed_s']:.3f} s, {r['speedup']}x"
        )
    write_csv("frozen_control.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
