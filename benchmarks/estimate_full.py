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

``--measure`` (on a GPU machine) times instead: a few training steps of every distinct network
of the ``full`` grid on ``--device`` (:mod:`depthlab.experiments.timing`; random inputs of the
cells' shapes, so no data set is needed), and gives each experiment's hours as the sum over its
cells of steps × the median step time, beside the estimate above; it writes
``results/full_measured.csv`` after every experiment and each network's step time to
``results/full_steps.csv`` as soon as it is timed (so a run stopped by a time limit keeps what
it measured):

    python benchmarks/estimate_full.py --measure --experiments depth-sweep,deep-fc

``--known CSV`` (with ``--measure``) takes the step time of every network that CSV has a row for,
timed on a GPU of the same name, instead of timing it again, so a run can finish what an earlier
one left; the steps CSV it writes holds both. ``--steps-from CSV`` adds the hours up again from
step times timed earlier (a ``full_steps.csv``, or several runs' rows in one file; its optional
``gpu`` and ``torch`` columns name the machine) without timing anything: a cell whose network
has no row there is counted as not timed:

    python benchmarks/estimate_full.py --steps-from results/full_steps_cuda.csv \\
        --measured-csv results/full_measured_cuda.csv --markdown
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
from pathlib import Path

import torch

from _results import write_csv
from depthlab.experiments import get_experiment, list_experiments
from depthlab.experiments.cost import cell_work
from depthlab.experiments.timing import StepTimes, cell_step, cell_steps
from depthlab.registry import DepthlabError

RESULTS = Path(__file__).parent / "results" / "full_estimates.csv"


def full_cells(name: str, device: str = "auto") -> tuple:
    """``(experiment, its full grid's cells)``, with a placeholder CIFAR-10 folder where the
    preset reads one (only the cells' shapes matter here)."""
    exp = get_experiment(name)
    cfg = exp.presets["full"]
    if "data_dir" in exp.needs.get("full", ()):  # a placeholder: the cells' CIFAR-10 shapes
        cfg = dataclasses.replace(cfg, data_dir="CIFAR-10")
    if hasattr(cfg, "device"):
        cfg = dataclasses.replace(cfg, device=device)
    return exp, exp.grid(cfg)


def estimate_experiment(name: str, rate: float, launch: float) -> dict:
    exp, cells = full_cells(name, "cuda")  # a GPU's work (a frozen control runs its branches)
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


def _name(device: str) -> str:
    """The GPU's name for a CUDA device, else the device."""
    return torch.cuda.get_device_name(device) if device.startswith("cuda") else device


class _Recorded:
    """Seconds of cells from step times read from a CSV (``--steps-from``); None for a cell
    whose network was not timed."""

    def __init__(self, path: str) -> None:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        if not rows or not {"network", "s_per_step"} <= set(rows[0]):
            raise SystemExit(f"{path}: not a full_steps.csv (columns network, s_per_step)")
        self.times = {r["network"]: float(r["s_per_step"]) for r in rows}
        self.gpu = rows[0].get("gpu") or rows[0].get("device", "?")
        self.torch = rows[0].get("torch") or "?"

    def seconds(self, exp, cell) -> float | None:
        step, n = cell_step(exp, cell), cell_steps(cell)
        if step is None or n is None or step.label() not in self.times:
            return None
        return n * self.times[step.label()]


class _Clock(StepTimes):
    """:class:`StepTimes` that writes every network's step time as soon as it is timed (a run
    stopped by a time limit keeps them). ``known`` (``--known``): rows of an earlier
    ``full_steps.csv``; a network with a row timed on a GPU of this name is not timed again, and
    its row is written with the new ones."""

    def __init__(self, path: str | None, known: str | None = None, **kw) -> None:
        super().__init__(**kw)
        self.path = path
        self.rows: dict[str, dict] = {}
        if known:
            if not Path(known).is_file():
                raise SystemExit(f"--known {known}: no such file (a full_steps.csv; '' for none)")
            with open(known, newline="", encoding="utf-8") as f:
                self.rows = {r["network"]: r for r in csv.DictReader(f)}

    def step_seconds(self, step) -> float:
        label, gpu = step.label(), _name(step.device)
        old = self.rows.get(label)
        if step not in self.times and old is not None and old.get("gpu") == gpu:
            self.times[step] = float(old["s_per_step"])
            if self.log is not None:
                self.log(f"  known {label} on {gpu}: {self.times[step]:.3g} s/step")
            return self.times[step]
        new = step not in self.times
        seconds = super().step_seconds(step)
        if new:
            self.rows[label] = {
                "network": label, "device": step.device, "gpu": gpu,
                "torch": torch.__version__, "s_per_step": round(seconds, 5),
            }  # fmt: skip
            write_csv("full_steps.csv", list(self.rows.values()), self.path)
        return seconds


def measure(args: argparse.Namespace, estimates: dict[str, dict]) -> int:
    """Time every distinct network of the chosen experiments' ``full`` grids on the device;
    write the measured hours per experiment and the timed networks."""

    from depthlab.train.loop import resolve_device

    if args.steps_from:
        clock = _Recorded(args.steps_from)
        device_name, torch_version = clock.gpu, clock.torch
    else:
        try:
            resolve_device(args.device)
        except DepthlabError as e:
            raise SystemExit(f"--device {args.device}: {e}") from None
        clock = _Clock(
            args.steps_csv, args.known, repeats=args.repeats, log=lambda s: print(s, flush=True)
        )
        device_name = (
            torch.cuda.get_device_name() if args.device != "cpu" and torch.cuda.is_available()
            else "cpu"
        )  # fmt: skip
        torch_version = torch.__version__
    rows = []
    names = args.experiments.split(",") if args.experiments else list(estimates)
    for name in names:
        if name not in estimates:
            raise SystemExit(f"{name!r} has no full preset; choose from {', '.join(estimates)}")
        exp, cells = full_cells(name, args.device)
        training = [c for c in cells if cell_step(exp, c) and cell_steps(c) is not None]
        if not training:
            continue
        known = [s for s in (clock.seconds(exp, c) for c in training) if s is not None]
        est = estimates[name]
        complete = len(known) == len(training)
        row = {
            "experiment": name, "device": device_name, "torch": torch_version,
            "cells": len(cells), "training_cells": len(training), "timed_cells": len(known),
            "complete": complete, "measured_hours": round(sum(known) / 3600, 3),
            "estimated_gpu_hours": est["gpu_hours"],
            "measured_vs_estimate": round(sum(known) / 3600 / est["gpu_hours"], 2)
            if est["gpu_hours"] and complete else "",
        }  # fmt: skip
        rows.append(row)
        print(
            f"{name:26s} {row['timed_cells']:4d}/{row['training_cells']:<4d} training cells "
            f"timed: {row['measured_hours']:8.2f} h measured"
            f"{'' if complete else ' (a lower bound)'}, {est['gpu_hours']:8.2f} h estimated",
            flush=True,
        )
        write_csv("full_measured.csv", rows, args.measured_csv)
    if args.markdown:
        print("| experiment | training cells timed | hours (measured) | GPU hours (estimate) |")
        print("|---|---|---|---|")
        for r in rows:
            hours = (
                "not timed" if not r["timed_cells"]
                else f"{r['measured_hours']:.3g}" if r["complete"]
                else f"≥ {r['measured_hours']:.3g} (part timed)"
            )  # fmt: skip
            print(
                f"| `{r['experiment']}` | {r['timed_cells']}/{r['training_cells']} | {hours} | "
                f"{r['estimated_gpu_hours']:g} |"
            )
        print(f"\nmeasured on {device_name} (torch {torch_version}): training steps only")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--tflops", type=float, default=20.0, help="sustained TFLOP/s (assumed)")
    ap.add_argument("--launch-us", type=float, default=10.0, help="µs per kernel (assumed)")
    ap.add_argument("--markdown", action="store_true", help="print the README's table")
    ap.add_argument("--csv", default=str(RESULTS))
    ap.add_argument(
        "--measure",
        action="store_true",
        help="time each distinct network's training step on --device instead",
    )
    ap.add_argument("--device", default="auto", help="with --measure: auto | cuda | cpu")
    ap.add_argument("--experiments", default="", help="with --measure: comma-separated names")
    ap.add_argument("--repeats", type=int, default=3, help="with --measure: timed steps")
    ap.add_argument("--measured-csv", default=None)
    ap.add_argument("--steps-csv", default=None)
    ap.add_argument("--known", default=None,
                    help="with --measure: a full_steps.csv whose networks timed on this GPU "
                         "are not timed again")  # fmt: skip
    ap.add_argument("--steps-from", default=None,
                    help="add up the hours from this CSV's step times (timed earlier)")  # fmt: skip
    args = ap.parse_args(argv)
    rate, launch = args.tflops * 1e12, args.launch_us * 1e-6
    rows = [
        estimate_experiment(n, rate, launch)
        for n in list_experiments()
        if "full" in get_experiment(n).presets
    ]
    if args.measure or args.steps_from:
        return measure(args, {r["experiment"]: r for r in rows})
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
