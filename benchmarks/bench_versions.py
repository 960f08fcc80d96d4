"""Two checkouts of depthlab side by side: the same training steps timed under each, interleaved.

    .venv/bin/python benchmarks/bench_versions.py --before ../old/src --after src
    .venv/bin/python benchmarks/bench_versions.py --before ../old/src --after src --quick

Each workload is one SGD step (``zero_grad``, forward, cross-entropy, backward, ``step``) on a
fixed random batch:

* ``mlp-10000``: the 10,000-layer, width-256 ReZero MLP at batch 128 (α = 0.01 so that every
  block computes; its fused stack), lr 0.01;
* ``resnet56-<scheme>``: a CIFAR ResNet-56 (3×32×32, batch 128) under ``fixup``, ``batchnorm``
  and ``skipinit`` (each scheme's default network), lr 0.1, momentum 0.9;
* ``resnet10004-<scheme>``: the 10,004-layer CIFAR ResNet of ``depth-sweep --preset deep`` on
  1×8×8 inputs (batch 32, channels-last, freed memory kept for reuse as in the sweep's
  workers), lr 0.1, momentum 0.9 — not in the default list (a child takes about a minute);
  ``resnet1004-<scheme>`` the same at 1,004 layers.

``--threads N`` sets each child's torch threads (the sweep's cells run with one; default:
torch's own).

For every round and workload, a fresh child process per checkout (``PYTHONPATH`` = that
checkout's ``src``) builds the model, takes ``--warmup`` untimed steps and ``--steps`` timed
ones; the two checkouts alternate in a rotated order within each round, so that drift in the
machine's load falls on both. Per workload the table reports the median step time (wall clock
and the process's CPU time) of each checkout over all rounds and the ratio after/before measured
that way (< 1: faster after), with its range over rounds, and each checkout's largest child
peak memory (``ru_maxrss``: the model, its optimizer state and a step's activations). A CSV of
every figure is written to ``benchmarks/results/versions.csv`` (atomically).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from _results import write_csv

CHILD = r"""
import json, sys, time
import torch
import torch.nn.functional as F
import depthlab as dl

kind, warmup, steps, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
if threads:
    torch.set_num_threads(threads)
torch.manual_seed(0)
if kind == "mlp-10000":
    m = dl.create_model("mlp", depth=10_000, width=256, scheme="rezero")
    with torch.no_grad():
        for b in dl.residual_blocks(m):
            b.gate.alpha.fill_(0.01)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(m.parameters(), lr=0.01)
else:
    net, scheme = kind.split("-", 1)
    depth = int(net.removeprefix("resnet"))
    shape, batch = ((3, 32, 32), 128) if depth == 56 else ((1, 8, 8), 32)
    if depth > 56:
        from depthlab.heap import keep_freed_memory

        keep_freed_memory()
    m = dl.create_model("resnet", depth=depth, in_channels=shape[0], scheme=scheme)
    m = m.to(memory_format=torch.channels_last)
    x = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
wall, cpu = [], []
for i in range(warmup + steps):
    t0, c0 = time.perf_counter(), time.process_time()
    opt.zero_grad(set_to_none=True)
    F.cross_entropy(m(x), y).backward()
    opt.step()
    if i >= warmup:
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
import resource
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
version = getattr(dl, "__version__", "?")
threads = torch.get_num_threads()
print(json.dumps({"wall": wall, "cpu": cpu, "rss": rss, "threads": threads, "version": version}))
"""


def run_child(src: str, kind: str, warmup: int, steps: int, threads: int = 0) -> dict:
    env = dict(os.environ, PYTHONPATH=str(Path(src).resolve()))
    out = subprocess.run(
        [sys.executable, "-c", CHILD, kind, str(warmup), str(steps), str(threads)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--before", required=True, help="the src folder of the older checkout")
    ap.add_argument("--after", default=str(Path(__file__).parents[1] / "src"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per child")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument(
        "--workloads", default="mlp-10000,resnet56-fixup,resnet56-batchnorm,resnet56-skipinit"
    )
    ap.add_argument("--quick", action="store_true", help="one round, ResNet-56 Fixup only")
    ap.add_argument("--threads", type=int, default=0, help="torch threads per child (0: default)")
    ap.add_argument("--csv", default=None, help="default benchmarks/results/versions.csv")
    args = ap.parse_args(argv)
    for key in ("before", "after"):
        if not (Path(getattr(args, key)) / "depthlab" / "__init__.py").is_file():
            ap.error(f"--{key} must be a checkout's src folder (holding depthlab/), got "
                     f"{getattr(args, key)}")  # fmt: skip
    kinds = args.workloads.split(",")
    if args.quick:
        args.rounds, kinds = 1, ["resnet56-fixup"]
    trees = {"before": args.before, "after": args.after}
    times: dict[tuple[str, str], dict[str, list[float]]] = {}
    ratios: dict[str, list[float]] = {k: [] for k in kinds}
    for r in range(args.rounds):
        for kind in kinds:
            order = ["before", "after"] if r % 2 == 0 else ["after", "before"]
            med = {}
            for label in order:
                got = run_child(trees[label], kind, args.warmup, args.steps, args.threads)
                slot = times.setdefault((kind, label), {"wall": [], "cpu": [], "rss": []})
                slot["wall"] += got["wall"]
                slot["cpu"] += got["cpu"]
                slot["rss"].append(got["rss"])
                med[label] = statistics.median(got["cpu"])
                threads = got.get("threads", "")
                print(f"  round {r + 1} {kind:<20} {label:<6} "
                      f"wall {statistics.median(got['wall']):7.3f} s  cpu {med[label]:7.3f} s",
                      flush=True)  # fmt: skip
            ratios[kind].append(med["after"] / med["before"])
    rows = []
    print(f"\n{'workload':<20} {'before s (wall/cpu)':>22} {'after s (wall/cpu)':>22} "
          f"{'after/before (cpu)':>20} {'range over rounds':>20}")  # fmt: skip
    for kind in kinds:
        b, a = times[(kind, "before")], times[(kind, "after")]
        bw, bc = statistics.median(b["wall"]), statistics.median(b["cpu"])
        aw, ac = statistics.median(a["wall"]), statistics.median(a["cpu"])
        lo, hi = min(ratios[kind]), max(ratios[kind])
        print(f"{kind:<20} {bw:>10.3f} / {bc:<9.3f} {aw:>10.3f} / {ac:<9.3f} "
              f"{ac / bc:>20.3f} {lo:>9.3f} – {hi:<8.3f}  peak memory "
              f"{max(b['rss']):.2f} → {max(a['rss']):.2f} GiB")  # fmt: skip
        rows.append({
            "workload": kind, "rounds": args.rounds, "steps_per_child": args.steps,
            "threads": threads,
            "before_wall_s": round(bw, 4), "before_cpu_s": round(bc, 4),
            "after_wall_s": round(aw, 4), "after_cpu_s": round(ac, 4),
            "ratio_cpu": round(ac / bc, 4), "ratio_wall": round(aw / bw, 4),
            "ratio_cpu_min": round(lo, 4), "ratio_cpu_max": round(hi, 4),
            "before_maxrss_gib": round(max(b["rss"]), 2),
            "after_maxrss_gib": round(max(a["rss"]), 2),
        })  # fmt: skip
    write_csv("versions.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
