"""Two finished runs of the same grid, cell by cell: what changed, what it cost.

    .venv/bin/python benchmarks/compare_runs.py runs/deep runs/deep-flush

For two ``depthlab run`` output folders (e.g. the same preset with IEEE arithmetic and with
``--flush-denormal``), every cell of the first is matched to the cell of the second with the same
config (``flush_denormal`` left out of the match) and their records are compared field by field,
leaving out what differs by design (wall time, host, process). Per experiment: the cells matched,
those whose records are identical, the largest absolute difference of any numeric field (NaN and
infinities equal to themselves) and the field it was in, the sum of the cells' run times in each run
and their ratio, and whether every claim's verdict is the same ("?" where either run holds only part
of the other's grid). Rows go to ``benchmarks/results/run_compare.csv`` (``--csv`` elsewhere). The
run times are measured in two different runs, so their ratio is not a side-by-side figure."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from _results import print_table, write_csv

#: record fields that differ between two runs of the same cell by design
IGNORED = {"wall_time_s", "node", "pid", "flush_denormal"}


def cells(folder: Path) -> dict[str, tuple[dict, list[dict], float]]:
    """``{experiment/config key: (cell, records, wall seconds)}`` of a run folder."""
    out = {}
    for path in sorted(folder.glob("*/cells/*.json")):
        payload = json.loads(path.read_text())
        cell = {k: v for k, v in payload["cell"].items() if k != "flush_denormal"}
        key = path.parent.parent.name + "/" + json.dumps(cell, sort_keys=True)
        out[key] = (cell, payload["records"], float(payload["wall_time_s"]))
    return out


def _diff(a: object, b: object) -> float:
    """0 for equal values (NaN = NaN), the absolute difference of two numbers, inf otherwise."""
    if a == b:
        return 0.0
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        if math.isnan(a) and math.isnan(b):
            return 0.0
        d = abs(float(a) - float(b))
        return d if math.isfinite(d) else math.inf
    return math.inf


def compare(recs_a: list[dict], recs_b: list[dict]) -> tuple[float, str]:
    """The largest difference between two cells' records and the field it is in."""
    if len(recs_a) != len(recs_b):
        return math.inf, "(record count)"
    worst, where = 0.0, ""
    for ra, rb in zip(recs_a, recs_b, strict=True):
        for k in (set(ra) | set(rb)) - IGNORED:
            d = _diff(ra.get(k), rb.get(k))
            if d > worst:
                worst, where = d, k
    return worst, where


def verdicts(folder: Path, name: str) -> list[str]:
    path = folder / name / "summary.json"
    if not path.is_file():
        return []
    return [c["verdict"] for c in json.loads(path.read_text())["claims"]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("a", help="a finished run folder")
    ap.add_argument("b", help="the same grid run again (e.g. with --flush-denormal)")
    ap.add_argument("--csv", default=None)
    args = ap.parse_args(argv)
    a, b = Path(args.a), Path(args.b)
    ca, cb = cells(a), cells(b)
    if not ca or not cb:
        raise SystemExit(f"no cells in {a if not ca else b} (a `depthlab run` output folder?)")
    rows = []
    for name in sorted({k.split("/", 1)[0] for k in ca}):
        keys = [k for k in ca if k.startswith(name + "/") and k in cb]
        if not keys:
            continue
        diffs = [compare(ca[k][1], cb[k][1]) for k in keys]
        worst = max(diffs, key=lambda d: d[0])
        ta, tb = sum(ca[k][2] for k in keys), sum(cb[k][2] for k in keys)
        whole = (
            len(keys)
            == sum(k.startswith(name + "/") for k in ca)
            == sum(k.startswith(name + "/") for k in cb)
        )  # the same grid in both runs: their verdicts compare
        va, vb = (verdicts(a, name), verdicts(b, name)) if whole else ([], [])
        rows.append({
            "experiment": name, "cells": len(keys),
            "identical": sum(d[0] == 0 for d in diffs),
            "max_abs_diff": f"{worst[0]:.3g}", "in_field": worst[1],
            "cell_time_a_s": round(ta), "cell_time_b_s": round(tb),
            "ratio_b_over_a": round(tb / ta, 3) if ta else "",
            "same_verdicts": "yes" if va == vb and va else ("no" if va and vb else "?"),
        })  # fmt: skip
    total_a = sum(r["cell_time_a_s"] for r in rows)
    total_b = sum(r["cell_time_b_s"] for r in rows)
    rows.append({
        "experiment": "all", "cells": sum(r["cells"] for r in rows),
        "identical": sum(r["identical"] for r in rows), "max_abs_diff": "", "in_field": "",
        "cell_time_a_s": total_a, "cell_time_b_s": total_b,
        "ratio_b_over_a": round(total_b / total_a, 3) if total_a else "",
        "same_verdicts": min((r["same_verdicts"] for r in rows), key=["no", "?", "yes"].index),
    })  # fmt: skip
    print(f"a = {a}, b = {b}")
    print_table(rows, [("experiment", "24"), ("cells", "5"), ("identical", "9"),
                       ("max_abs_diff", "12"), ("in_field", "16"), ("cell_time_a_s", "8"),
                       ("cell_time_b_s", "8"), ("ratio_b_over_a", "6"),
                       ("same_verdicts", "4")])  # fmt: skip
    write_csv("run_compare.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
