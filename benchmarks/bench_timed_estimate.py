"""How close ``run --dry-run --measure`` comes to finished runs: timed steps against cell times.

    .venv/bin/python benchmarks/bench_timed_estimate.py runs/deep-3:deep runs/deep-4:deep

For the preset of the given finished ``run all`` folders (FOLDER:PRESET; all of one preset),
every distinct network of the preset's cells is timed on this CPU as ``run --dry-run --measure
--jobs 2`` times it (:mod:`depthlab.experiments.timing`: a few training steps, with the threads
one of ``--jobs`` workers gets), and each cell's prediction — its steps × its network's step —
is set beside the wall time the cell took in each folder (``cells/*.json``). Per experiment the
table gives the predicted and measured cell-seconds, their ratio over all cells and over the
cells that ran their whole budget (records, none of which says ``diverged``: a diverged run
stops at its first non-finite loss, which no prediction from a step time can know), and the
FLOP-and-kernel prediction at one core's rate (:mod:`depthlab.experiments.cost`) for
comparison. Rows go to ``benchmarks/results/timed_estimate.csv``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _results import write_csv
from depthlab.experiments import get_experiment, list_experiments
from depthlab.experiments.cost import cell_work
from depthlab.experiments.runner import _threads, finished_cell_path
from depthlab.experiments.timing import StepTimes
from depthlab.heap import keep_freed_memory


def _finished(folder: Path, exp, cell) -> tuple[float, bool] | None:
    """(wall seconds, ran its whole budget) of a cell of ``folder``; None if it is not there."""
    path = finished_cell_path(folder / exp.name, exp, cell)  # IEEE or flushed
    if path is None:
        return None
    payload = json.loads(path.read_text())
    records = payload.get("records", [])  # none: stopped before its first logged step
    whole = bool(records) and not any(bool(r.get("diverged")) for r in records)
    return float(payload["wall_time_s"]), whole


def compare(folders: list[Path], preset: str, jobs: int) -> list[dict]:
    clock = StepTimes(log=lambda s: print(s, flush=True))
    rows = []
    for name in list_experiments():
        exp = get_experiment(name)
        if preset not in exp.presets or not all((f / name).is_dir() for f in folders):
            continue
        cells = exp.grid(exp.config(preset))  # as the runs had them (device auto: this CPU)
        with _threads(jobs):
            timed = [clock.seconds(exp, c) for c in cells]
        work = [cell_work(exp, c) for c in cells]
        for folder in folders:
            done = [_finished(folder, exp, c) for c in cells]
            both = [(t, d) for t, d in zip(timed, done, strict=True) if t is not None and d]
            if not both:
                continue
            whole = [(t, d[0]) for t, d in both if d[1]]
            pred, meas = sum(t for t, _ in both), sum(d[0] for _, d in both)
            rows.append({
                "run": str(folder), "experiment": name, "cells": len(cells),
                "timed_cells": len(both), "whole_budget_cells": len(whole),
                "predicted_s": round(pred), "measured_s": round(meas),
                "measured_over_predicted": round(meas / pred, 2),
                "whole_budget_ratio": round(sum(m for _, m in whole) / sum(t for t, _ in whole), 2)
                if whole else "",
                "flop_model_s": round(sum(w.seconds() for w in work if w is not None)),
            })  # fmt: skip
            r = rows[-1]
            print(
                f"{folder}  {name:24s} predicted {r['predicted_s']:6d} s  measured "
                f"{r['measured_s']:6d} s  ratio {r['measured_over_predicted']}  "
                f"(whole budget: {r['whole_budget_ratio']}, {len(whole)}/{len(both)} cells)",
                flush=True,
            )
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="+", help="FOLDER:PRESET of finished `run all` folders")
    ap.add_argument("--jobs", type=int, default=2, help="the workers the runs had")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    keep_freed_memory()  # as in the sweep's workers and `depthlab run --dry-run --measure`
    specs = [s.rpartition(":") for s in args.runs]
    presets = {p for _, _, p in specs}
    if len(presets) != 1 or any(not f for f, _, _ in specs):
        raise SystemExit("give FOLDER:PRESET arguments, all of one preset (runs/deep-3:deep)")
    rows = compare([Path(f) for f, _, _ in specs], presets.pop(), args.jobs)
    total = {}
    for r in rows:
        t = total.setdefault(r["run"], [0, 0])
        t[0] += r["predicted_s"]
        t[1] += r["measured_s"]
    for run, (p, m) in total.items():
        rows.append({"run": run, "experiment": "(all)", "predicted_s": p, "measured_s": m,
                     "measured_over_predicted": round(m / p, 2)})  # fmt: skip
        print(f"{run}: predicted {p} s of cell time, measured {m} s ({m / p:.2f})")
    write_csv("timed_estimate.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
