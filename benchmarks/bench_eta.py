"""How far the sweep's ETA is from the time that was really left, replayed on finished runs.

    .venv/bin/python benchmarks/bench_eta.py runs/deep:deep runs/quick:quick

Each argument is a ``run all`` output folder and its preset (default: ``runs/quick:quick`` and
``runs/deep:deep``, those that exist; with neither, it says so and measures nothing). Its
cells' measured wall times (``cells/*.json``; a ``--flush-denormal`` run's cells under their own
cache keys) are replayed in the runner's order (experiments in
turn, cells in grid order) on ``--workers`` workers that each take the next queued cell when
free. After every finished cell, two ETAs are computed from the cells finished so far and
compared with the time the replay still had to run (events with under a minute left are
skipped):

* ``work``: the runner's ETA (:class:`depthlab.experiments.cost.Eta`: each queued cell's FLOPs
  and kernel launches, rescaled by its experiment's measured ratio);
* ``mean cell``: each queued cell at its experiment's mean finished cell, or the mean of all
  finished cells for an experiment with none — the rule before the cost model.

The error of one ETA is ``|ln(ETA / left)|`` (0.1 ≈ 10% off, 0.69 = 2× off). The table gives,
per run and rule, the mean, 90th percentile and maximum error over the events, the first ETA
(after the first finished cell) beside the time that was left then, and (``before_min``) what
``run`` says before any cell has run — the counted cells at the prior rate — beside the replay's
length (``replay_min``); the rows go to
``benchmarks/results/eta.csv``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

from _results import write_csv
from depthlab.experiments import get_experiment, list_experiments
from depthlab.experiments.cost import Eta, cell_work
from depthlab.experiments.runner import finished_cell_path


def load(folder: Path, preset: str) -> list[tuple[str, object, float]]:
    """(experiment, work, wall seconds) of every cell of ``folder``, in the runner's order."""
    cells = []
    for name in list_experiments():
        exp = get_experiment(name)
        if preset not in exp.presets or not (folder / name).is_dir():
            continue
        grid = exp.grid(exp.config(preset))
        for cell in grid:
            path = finished_cell_path(folder / name, exp, cell)  # IEEE or flushed
            if path is not None:
                wall = json.loads(path.read_text())["wall_time_s"]
                cells.append((name, cell_work(exp, cell), float(wall)))
    if not cells:
        raise SystemExit(f"{folder}: no cells of preset {preset!r} (a `run all` output folder?)")
    return cells


def mean_cell(done: list[int], left: list[int], cells: list) -> float:
    per: dict[str, list[float]] = {}
    for i in done:
        per.setdefault(cells[i][0], []).append(cells[i][2])
    overall = statistics.mean(cells[i][2] for i in done)
    return sum(statistics.mean(per[cells[i][0]]) if cells[i][0] in per else overall for i in left)


def by_work(done: list[int], left: list[int], cells: list) -> float:
    eta = Eta()
    for i in done:
        eta.add(*cells[i])
    return sum(eta.seconds(cells[i][0], cells[i][1]) for i in left)


RULES = {"work": by_work, "mean cell": mean_cell}


def replay(cells: list, workers: int) -> list[dict]:
    free = [0.0] * workers
    events = []
    for i, (_, _, wall) in enumerate(cells):  # each cell to the first free worker
        k = min(range(workers), key=free.__getitem__)
        free[k] += wall
        events.append((free[k], i))
    events.sort()
    end = max(free)
    errors: dict[str, list[float]] = {r: [] for r in RULES}
    first: dict[str, tuple[float, float]] = {}
    done: list[int] = []
    for t, i in events:
        done.append(i)
        finished = set(done)
        left = [j for j in range(len(cells)) if j not in finished]
        if end - t < 60 or not left:
            continue
        for rule, fn in RULES.items():
            eta = fn(done, left, cells) / workers
            errors[rule].append(abs(math.log(max(eta, 1.0) / (end - t))))
            first.setdefault(rule, (eta, end - t))
    before = sum(w.seconds() for _, w, _ in cells if w is not None) / workers
    rows = []
    for rule, e in errors.items():
        e = sorted(e)
        eta, left = first[rule]
        rows.append({
            "rule": rule, "events": len(e), "mean_abs_log": round(statistics.mean(e), 3),
            "p90_abs_log": round(e[int(0.9 * (len(e) - 1))], 3), "max_abs_log": round(e[-1], 3),
            "first_eta_min": round(eta / 60, 1), "first_left_min": round(left / 60, 1),
            "before_min": round(before / 60, 1) if rule == "work" else "",
            "replay_min": round(end / 60, 1),
        })  # fmt: skip
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("runs", nargs="*", help="FOLDER:PRESET of a finished `run all`")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    runs = args.runs or [f"runs/{p}:{p}" for p in ("quick", "deep") if Path("runs", p).is_dir()]
    if not runs:
        print("no finished run to replay (runs/quick, runs/deep): `make quick` makes one")
        return 0
    rows = []
    for spec in runs:
        folder, _, preset = spec.rpartition(":")
        if not folder:
            raise SystemExit(f"{spec!r}: give FOLDER:PRESET, e.g. runs/deep:deep")
        cells = load(Path(folder), preset)
        for row in replay(cells, args.workers):
            rows.append({"run": folder, "preset": preset, "cells": len(cells), **row})
            print(
                f"{folder:18s} {preset:6s} {row['rule']:10s} |ln(ETA/left)| mean "
                f"{row['mean_abs_log']:.2f}  p90 {row['p90_abs_log']:.2f}  max "
                f"{row['max_abs_log']:.2f}   first ETA {row['first_eta_min']} min, left "
                f"{row['first_left_min']} min"
            )
    write_csv("eta.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
