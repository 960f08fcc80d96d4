"""How long each experiment's ``full`` preset should take on one modern GPU — an **estimate**
from FLOPs and kernel launches, not a measurement.

    .venv/bin/python benchmarks/estimate_full.py             # table, results/full_estimates.csv
    .venv/bin/python benchmarks/estimate_full.py --markdown  # the README table

For every training cell of the ``full`` grid, the work is counted analytically by
:mod:`depthlab.experiments.cost` (FLOPs: 6 × the forward multiply-adds of an example × the
examples processed, × 4/3 with activation checkpointing; launches: 3 kernels per module per
step — a narrow 10,000-layer network is launch-bound on a GPU, whatever its FLOPs).

A cell takes ``max(FLOPs / RATE, launches × LAUNCH)``; the cells run one after the other on one
GPU. ``RATE`` (``--tflops``, default 20: float32 with TF32 convolutions sustained on these small
layers by an A100/H100-class GPU) and ``LAUNCH`` (``--launch-us``, default 10 µs of eager
PyTorch per kernel) are assumptions, stated beside the table. Cells without a budget the script
reads (spectra and signal measurements, analytic models, ``grow``'s staged runs) are not
counted.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

from depthlab.experiments import get_experiment, list_experiments
from depthlab.experiments.cost import cell_work

RESULTS = Path(__file__).parent / "results" / "full_estimates.csv"


def estimate_experiment(name: str, rate: float, launch: float) -> dict:
    exp = get_experiment(name)
    cfg = exp.presets["full"]
    if "data_dir" in exp.needs.get("full", ()):  # a placeholder: the cells' CIFAR-10 shapes
        cfg = dataclasses.replace(cfg, data_dir="CIFAR-10")
    cells = exp.cells(cfg)
    flops = seconds = 0.0
    counted = 0
    for cell in cells:
        work = cell_work(exp, cell)
        if work is None:
            continue
        flops += work.flops
        seconds += max(work.flops / rate, work.launches * launch)
        counted += 1
    return {
        "experiment": name,
        "cells": len(cells),
        "training_cells": counted,
        "pflop": round(flops / 1e15, 3),
        "gpu_hours": round(seconds / 3600, 2),
        "needs": ", ".join(exp.needs.get("full", ())) or "-",
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tflops", type=float, default=20.0, help="sustained TFLOP/s (assumed)")
    ap.add_argument("--launch-us", type=float, default=10.0, help="µs per kernel (assumed)")
    ap.add_argument("--markdown", action="store_true", help="print the README's table")
    ap.add_argument("--csv", default=str(RESULTS))
    args = ap.parse_args(argv)
    rate, launch = args.tflops * 1e12, args.launch_us * 1e-6
    rows = [
        estimate_experiment(n, rate, launch)
        for n in list_experiments()
        if "full" in get_experiment(n).presets
    ]
    note = (
        f"estimate: {args.tflops:g} TFLOP/s sustained, {args.launch_us:g} µs per kernel, cells "
        "in sequence on one GPU; not counted: cells without a budget the script reads "
        "(measurements, analytic models, grow's staged runs)"
    )
    if args.markdown:
        print("| experiment | `full` data | training cells | PFLOP | GPU hours (estimate) |")
        print("|---|---|---|---|---|")
        for r in rows:
            hours = f"{r['gpu_hours']:g}" if r["training_cells"] else "not counted"
            print(
                f"| `{r['experiment']}` | {r['needs']} | {r['training_cells']}/{r['cells']} | "
                f"{r['pflop']:g} | {hours} |"
            )
        print(f"\n{note}")
    else:
        print(note)
        for r in rows:
            print(
                f"{r['experiment']:26s} cells {r['training_cells']:4d}/{r['cells']:<4d} "
                f"{r['pflop']:10.3f} PFLOP {r['gpu_hours']:8.2f} GPU h  needs {r['needs']}"
            )
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[*rows[0], "tflops_assumed", "launch_us_assumed"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "tflops_assumed": args.tflops, "launch_us_assumed": args.launch_us})
    tmp.replace(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
