"""Building and training very deep models with and without the collector kept off the hot paths.

    .venv/bin/python benchmarks/bench_gc.py                  # every case, 2 pairs
    .venv/bin/python benchmarks/bench_gc.py --cases mlp-10000-rezero --pairs 3 --steps 20

Each case is a ``deep``-preset cell, run as the sweep runs it (the experiment's ``run_cell``,
with ``--steps`` training steps instead of the preset's), in a fresh process per measurement —
``as-is`` (:mod:`depthlab.gctools`' two context managers replaced by no-ops: CPython's collector
as it comes) and ``kept-off`` (depthlab as shipped: the collector paused while
:func:`depthlab.create_model` builds, every object of the run frozen for the training loop and
full collections rare in it) — the two in turn, ``--pairs`` times, so that drift in the
machine's load falls on both. A process first builds the cell's model once on its own
(``build_s``; then dropped), then runs the cell
(``cell_s``: building again, training, the test evaluation), counting the collector's full
(generation-2) collections and the time spent in them (``gc.callbacks``). ``build-only`` cases
only build. One thread, freed memory kept (:func:`depthlab.heap.keep_freed_memory`, as in the
sweep's workers). The records of the two modes must be the same: the script checks that the
last record of every pair matches. CSV ``benchmarks/results/gc.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import json
import statistics
import time

from _results import child_result, chosen, in_turn, print_table, write_csv

MLP = ("mlp", {"depth": 10000, "width": 64, "in_dim": 64})
LM = ("transformer-lm", {"depth": 128, "d_model": 32, "nhead": 4, "context": 32})
RESNET = ("resnet", {"depth": 10004, "width": 1, "variant": "postact", "in_channels": 1})
#: name: (experiment, the cell's fields, trains (False: build only), (model, its sizes))
CASES = {
    "mlp-10000-rezero": ("deep-fc", {"scheme": "rezero", "depth": 10000, "seed": 0}, True, MLP),
    "mlp-10000-layernorm": ("deep-fc", {"scheme": "layernorm", "depth": 10000, "seed": 0}, True,
                            MLP),
    "lm-128-rezero": ("transformer-convergence",
                      {"part": "deep", "variant": "rezero", "depth": 128, "seed": 0}, True, LM),
    "resnet-10004-bn": ("depth-sweep", {"scheme": "batchnorm", "depth": 10004, "seed": 0}, False,
                        RESNET),
}  # fmt: skip
MODES = ("as-is", "kept-off")


def _cell(name: str, steps: int) -> tuple:
    from depthlab.experiments.base import get_experiment

    exp_name, match, *_ = CASES[name]
    exp = get_experiment(exp_name)
    cells = exp.cells(exp.config("deep"))
    cell = next(c for c in cells if all(c.get(k) == v for k, v in match.items()))
    return exp, {**cell, "steps": steps}


def child(name: str, mode: str, steps: int) -> dict:
    """One measurement in this (fresh) process."""
    from depthlab.heap import keep_freed_memory

    keep_freed_memory()
    import torch

    import depthlab as dl

    if mode == "as-is":  # the collector as CPython runs it
        importlib.import_module("depthlab.models").paused = contextlib.nullcontext
        importlib.import_module("depthlab.train.loop").frozen = contextlib.nullcontext
    torch.set_num_threads(1)
    exp, cell = _cell(name, steps)
    model_name, kw = CASES[name][3]
    scheme, options = exp.cell_scheme(cell)
    t0 = time.perf_counter()
    model = dl.create_model(model_name, scheme=scheme, scheme_options=options or None, **kw)
    build = time.perf_counter() - t0
    del model
    gc.collect()
    out = {"build_s": build}
    if not CASES[name][2]:
        return out
    full: list[float] = []
    start = [0.0]

    def watch(phase: str, info: dict) -> None:
        if info["generation"] == 2:
            if phase == "start":
                start[0] = time.perf_counter()
            else:
                full.append(time.perf_counter() - start[0])

    gc.callbacks.append(watch)
    t0 = time.perf_counter()
    records = exp.run_cell(cell)
    out["cell_s"] = time.perf_counter() - t0
    gc.callbacks.remove(watch)
    out.update(full_collections=len(full), full_gc_s=sum(full), last=records[-1])
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", default=",".join(CASES), help=f"comma list of: {', '.join(CASES)}")
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=30, help="training steps per cell")
    ap.add_argument("--csv", default=None)
    ap.add_argument("--child", nargs=2, metavar=("CASE", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(*args.child, args.steps), default=str))
        return 0
    rows = []
    for name in chosen(ap, args.cases, CASES):

        def show(p: int, mode: str, r: dict, name: str = name) -> None:
            print(f"{name:20s} pair {p} {mode:8s} build {r['build_s']:6.2f} s"
                  + (f"  cell {r['cell_s']:7.2f} s  {r['full_collections']:3d} full "
                     f"collections {r['full_gc_s']:6.2f} s" if "cell_s" in r else ""),
                  flush=True)  # fmt: skip

        def measure(mode: str, name: str = name) -> dict:
            return child_result(__file__, "--child", name, mode, "--steps", str(args.steps))

        got = in_turn(MODES, args.pairs, measure, show)
        row: dict = {"case": name, "pairs": args.pairs}
        trains = CASES[name][2]
        row["steps"] = args.steps if trains else 0
        keys = ["build_s"] + (["cell_s", "full_collections", "full_gc_s"] if trains else [])
        for mode in MODES:
            for k in keys:
                row[f"{mode}_{k}"] = round(statistics.median(r[k] for r in got[mode]), 3)
        for k in ("build_s", "cell_s") if trains else ("build_s",):
            row[f"ratio_{k}"] = round(row[f"kept-off_{k}"] / row[f"as-is_{k}"], 3)
        if trains:
            lasts = {json.dumps(r["last"], sort_keys=True) for m in MODES for r in got[m]}
            row["same_records"] = len(lasts) == 1
        rows.append(row)
    columns = [("case", "20"), ("as-is_build_s", "7"), ("kept-off_build_s", "7"),
               ("ratio_build_s", "6"), ("as-is_cell_s", "7"), ("kept-off_cell_s", "7"),
               ("ratio_cell_s", "6"), ("as-is_full_collections", "5"), ("as-is_full_gc_s", "6"),
               ("kept-off_full_collections", "5"), ("kept-off_full_gc_s", "6"),
               ("same_records", "5")]  # fmt: skip
    for row in rows:  # build-only cases: blank training columns
        for k in dict.fromkeys([k for r in rows for k in r] + [k for k, _ in columns]):
            row.setdefault(k, "")
    print_table(rows, columns)
    write_csv("gc.csv", rows, args.csv)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
