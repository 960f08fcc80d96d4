"""Run experiments: cells in parallel processes, each cached by the hash of its config.

Layout of one experiment's output folder ``OUT/NAME/``::

    config.yaml        the resolved config (preset + --set overrides)
    cells/<hash>.json  one finished cell: {"experiment", "cell", "records", "wall_time_s"}
    records.csv        every record of every cell
    summary.json       claims, timing, cell counts
    *.png, report.md   figures and the experiment's report

A cell file is written atomically when its cell finishes, so a sweep that is killed leaves only
complete cell files; re-running it recomputes only the cells whose file is missing.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import math
import multiprocessing as mp
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import pandas as pd

from depthlab.experiments.base import (
    PRESETS,
    Claim,
    Experiment,
    apply_overrides,
    config_dict,
    get_experiment,
    list_experiments,
)
from depthlab.experiments.cost import Eta, Work, cell_work
from depthlab.experiments.timing import StepTimes
from depthlab.heap import enabled as heap_enabled
from depthlab.heap import release_freed_memory, starting_workers
from depthlab.io import FolderLock, atomic_write_text, sweep_temp_files, write_json, write_yaml
from depthlab.registry import DepthlabError, unknown_choice
from depthlab.validate import check_out_dir

#: the most worker processes ``--jobs`` may ask for
MAX_JOBS = 256
#: where cells run: ``local`` processes (``--jobs``) or ``ray`` tasks (``--address``)
EXECUTORS = ("local", "ray")


@dataclass
class ExperimentResult:
    """What one experiment run produced."""

    name: str
    preset: str
    config: dict[str, Any]
    records: pd.DataFrame
    claims: list[Claim]
    figures: list[Path]
    out_dir: Path
    wall_time_s: float = 0.0
    cells: int = 0
    cached_cells: int = 0
    error: str | None = None
    title: str = ""
    paper: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def cell_hash(name: str, version: int, cell: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the experiment name, its version and the cell's JSON."""
    blob = json.dumps({"experiment": name, "version": version, "cell": cell}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _cell_path(out_dir: Path, exp: Experiment, cell: dict[str, Any]) -> Path:
    return out_dir / "cells" / f"{cell_hash(exp.name, exp.version, cell)}.json"


#: the cell key of a sweep run with denormals flushed to zero (``run(flush_denormal=True)``,
#: ``depthlab run --flush-denormal``); absent in an IEEE run, so its cells keep their cache keys
FLUSH_KEY = "flush_denormal"
#: what the setup column of such a run's claims says
FLUSH_NOTE = "denormals flushed to zero (not IEEE arithmetic; --no-flush-denormal keeps IEEE)"
#: presets whose sweeps flush denormals unless told otherwise (``flush_denormal=None``): the
#: CPU-sized paper depths, whose arms that are there to fail underflow into denormal numbers
#: and would take most of the sweep's time on a CPU (docs/benchmarks.md, denormals)
FLUSH_PRESETS = frozenset({"deep"})


def flush_denormals() -> None:
    """Flush denormal floats to zero (FTZ and DAZ) for this process's CPU arithmetic, from here
    on. It holds for the calling thread and for the threads created after it (torch's OpenMP
    workers inherit it when they start): so it is set in a fresh worker process before its
    first parallel op, never in a process that already has its workers."""
    import torch

    if not torch.set_flush_denormal(True):
        raise DepthlabError(
            "--flush-denormal: this CPU cannot flush denormals to zero; run without it"
        )


def flushing() -> bool:
    """Whether the calling thread flushes denormals now (a denormal times 1.0001, computed on
    this thread, comes out 0)."""
    import torch

    denormal = torch.tensor([0x00400000], dtype=torch.int32).view(torch.float32)  # 2⁻¹²⁷
    return bool((denormal * 1.0001).item() == 0.0)


def flush_supported() -> bool:
    """Whether this CPU can flush denormals (torch's FTZ/DAZ switch works here). Probed on the
    calling thread, whose own setting is read first (a one-element product, computed on this
    thread) and put back as it was."""
    import torch

    was_on = flushing()
    ok = torch.set_flush_denormal(True)
    torch.set_flush_denormal(was_on)
    return ok


def resolve_flush(
    flush: bool | None,
    preset: str,
    log: Callable[[str], None] = print,
    device: Any = "auto",
    gpus: Callable[[], float] | None = None,
) -> bool:
    """Whether a sweep flushes denormals: ``flush`` when given (True or False), else the
    preset's default — on for :data:`FLUSH_PRESETS` where the cells run on CPUs (``device``
    ``cpu``, or ``auto`` where there is no GPU) and this CPU can flush; elsewhere the sweep keeps
    IEEE arithmetic and ``log`` says why. ``gpus``: counts the GPUs of the machines that run the
    cells (a Ray cluster's, :func:`depthlab.experiments.ray_executor.cluster_gpus`), called only
    where the default depends on it; None: this machine's CUDA. Anything but True, False or None
    is refused."""
    if flush is not None and not isinstance(flush, bool):
        raise DepthlabError(f"flush_denormal must be True, False or None, got {flush!r}")
    if flush is not None or preset not in FLUSH_PRESETS:
        return bool(flush)
    if device == "auto":
        if gpus is None:
            import torch

            there = "this machine has CUDA" if torch.cuda.is_available() else ""
        else:
            count = gpus()
            there = f"the cluster has {count:g} GPU(s)" if count > 0 else ""
        if there:
            log(f"(--preset {preset} on device auto: IEEE arithmetic — {there}; "
                "the flush is for CPUs)")  # fmt: skip
            return False
    elif device != "cpu":
        log(f"(--preset {preset} on device {device}: IEEE arithmetic — the flush is for CPUs)")
        return False
    if not flush_supported():
        log(f"(--preset {preset}: IEEE arithmetic — this CPU cannot flush denormals)")
        return False
    return True


def _device(overrides: Any) -> Any:
    """The device a sweep's ``--set`` overrides ask for (``auto`` when they do not)."""
    return overrides.get("device", "auto") if isinstance(overrides, dict) else "auto"


def check_flush(flush: bool) -> None:
    """Refuse ``flush`` on a CPU that cannot flush denormals, before anything is written."""
    if flush and not flush_supported():
        raise DepthlabError(
            "--flush-denormal: this CPU cannot flush denormals to zero (torch's FTZ/DAZ switch "
            "is not available here); run without --flush-denormal"
        )


def with_flush(cells: list[dict[str, Any]], flush: bool) -> list[dict[str, Any]]:
    """``cells`` each marked ``flush_denormal: True`` when ``flush`` (their own cache keys and
    a record column), else as they are."""
    return [{**c, FLUSH_KEY: True} for c in cells] if flush else cells


def _worker_init(
    threads: int, parent: int | None = None, counter: Any = None, flush: bool = False
) -> None:
    import torch

    from depthlab.heap import keep_freed_memory

    if flush:  # before any torch op starts the worker's threads: they inherit it
        flush_denormals()
    torch.set_num_threads(threads)
    keep_freed_memory()  # a worker runs cells only; each cell releases what it held (_run_cell)
    if parent is not None:
        _watch_parent(parent)
    if counter is not None and torch.cuda.is_available():
        with counter.get_lock():  # worker k of N runs on GPU k mod G
            k = counter.value
            counter.value += 1
        torch.cuda.set_device(k % torch.cuda.device_count())


def _watch_parent(parent: int, every: float = 0.5) -> None:
    """Exit this worker as soon as its parent (the sweep's driver) is gone, even when it was
    killed with SIGKILL and could not tell its workers: a daemon thread polls the parent pid."""
    import threading

    def watch() -> None:
        while True:
            time.sleep(every)
            if os.getppid() != parent:
                os._exit(1)

    threading.Thread(target=watch, name="depthlab-parent-watch", daemon=True).start()


def _run_cell(module: str, name: str, cell: dict[str, Any]) -> tuple[list[dict], float]:
    """Worker entry point: import the experiment's module (registers it), run one cell."""
    from depthlab.experiments.base import EXPERIMENTS

    importlib.import_module(module)
    exp = EXPERIMENTS.get(name)()
    t0 = time.perf_counter()
    try:
        records = exp.run_cell(dict(cell))
    finally:
        release_freed_memory()  # what this cell held, free for the worker's next cell
    return stamp_node(records), time.perf_counter() - t0


def finished_cell_path(folder: Path, exp: Experiment, cell: dict[str, Any]) -> Path | None:
    """The cache file of a grid ``cell`` in an experiment's output ``folder``: an IEEE run's,
    else a flushed run's (the cell with ``flush_denormal: True``); None when neither is there.
    For tools that read finished runs of either kind (benchmarks/bench_eta.py, ...)."""
    for c in (cell, {**cell, FLUSH_KEY: True}):
        path = _cell_path(Path(folder), exp, c)
        if path.is_file():
            return path
    return None


def stamp_node(records: list[dict]) -> list[dict]:
    """Each record with ``node``: the host name of the machine that ran its cell."""
    import socket

    host = socket.gethostname()
    return [{**r, "node": host} for r in records]


def _save_cell(path: Path, exp: Experiment, cell: dict, records: list[dict], wall: float) -> None:
    payload = {"experiment": exp.name, "cell": cell, "records": records, "wall_time_s": wall}
    atomic_write_text(path, json.dumps(payload, default=_json_default) + "\n")


def _json_default(obj: Any) -> Any:
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def _load_cell(path: Path, cell: dict[str, Any] | None = None) -> list[dict] | None:
    """The records of a cached cell, or None (recompute) if the file is missing, corrupt, of
    the wrong shape, or written for another cell."""
    try:
        payload = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(payload, dict):
        return None
    records = payload.get("records")
    if not isinstance(records, list) or not all(isinstance(r, dict) for r in records):
        return None
    if cell is not None and payload.get("cell") != json.loads(json.dumps(cell)):
        return None
    return records


def run_cells(
    exp: Experiment,
    cells: list[dict[str, Any]],
    out_dir: Path,
    jobs: int = 1,
    log: Callable[[str], None] = print,
    pool: ProcessPoolExecutor | None = None,
) -> tuple[list[dict], int]:
    """Run every cell whose cache file is missing; return (all records in cell order, #cached).

    With ``jobs > 1`` cells run in ``jobs`` spawned processes with
    ``torch.set_num_threads(max(1, cores // jobs))`` each (or in ``pool`` when given, so that
    several experiments share one set of workers).
    """
    results: dict[int, list[dict]] = {}
    todo: list[int] = []
    for i, cell in enumerate(cells):
        cached = _load_cell(_cell_path(out_dir, exp, cell), cell)
        if cached is None:
            todo.append(i)
        else:
            results[i] = cached
    n_cached = len(results)
    total = len(cells)
    done = n_cached
    if n_cached:
        log(f"  [{exp.name}] {n_cached}/{total} cells cached")
    works = {i: cell_work(exp, cells[i]) for i in todo}
    eta, workers = Eta(), max(1, min(jobs, len(todo)))
    before = estimate_text(list(works.values()), [cells[i] for i in todo], workers)
    if before:
        log(f"  [{exp.name}] {before}")

    def finish(i: int, records: list[dict], wall: float) -> None:
        nonlocal done
        _save_cell(_cell_path(out_dir, exp, cells[i]), exp, cells[i], records, wall)
        results[i] = records
        done += 1
        eta.add(exp.name, works.pop(i), wall)
        left = sum(eta.seconds(exp.name, w) for w in works.values()) / workers
        label = " ".join(f"{k}={v}" for k, v in cells[i].items() if k != "seed")
        text = eta_seconds(left) if works else ""
        log(f"  [{exp.name}] cell {done}/{total} ({wall:.1f}s) {label}{text}")

    # denormals are flushed in worker processes only (flush_denormals), never in this one
    flush = any(c.get(FLUSH_KEY) for c in cells)
    if not todo or ((jobs <= 1 or len(todo) <= 1) and not flush):
        for i in todo:
            t0 = time.perf_counter()
            try:
                records = stamp_node(exp.run_cell(dict(cells[i])))
            finally:
                release_freed_memory()
            finish(i, records, time.perf_counter() - t0)
        return _merge(cells, results), n_cached
    own_pool = pool is None
    if own_pool:
        pool = make_pool(max(1, min(jobs, len(todo))), jobs, flush)
    module = type(exp).__module__
    pending = {pool.submit(_run_cell, module, exp.name, cells[i]): i for i in todo}
    try:
        while pending:
            finished, _ = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                i = pending.pop(fut)
                records, wall = fut.result()
                finish(i, records, wall)
    except BaseException:
        for fut in pending:
            fut.cancel()
        if own_pool:
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    if own_pool:
        pool.shutdown()
    return _merge(cells, results), n_cached


def eta_text(elapsed: float, finished: int, left: int) -> str:
    """``"; ETA 12 min"``: the cells ``left`` at the rate the ``finished`` ones took (wall time
    ``elapsed`` since they started, so parallel workers count); empty when none is left."""
    if left <= 0 or finished <= 0:
        return ""
    return eta_seconds(elapsed / finished * left)


def eta_seconds(seconds: float) -> str:
    """``"; ETA 12 min"`` (``"; ETA 40 s"`` under two minutes)."""
    return f"; ETA {_duration(seconds)}"


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.0f} min"


def estimate_text(works: list[Work | None], cells: list[dict[str, Any]], workers: int) -> str:
    """What the cells to run should take before any has run — their :class:`Work` at one CPU
    core's rate per worker (:data:`~depthlab.experiments.cost.CPU_FLOPS`, ``CPU_LAUNCH_S``) —
    or empty where that rate does not apply (a cell on a GPU) or nothing is to run."""
    import torch

    auto = "cuda" if torch.cuda.is_available() else "cpu"
    devices = {str(c.get("device", "cpu")).replace("auto", auto) for c in cells}
    known = [w for w in works if w is not None]
    if not known or devices != {"cpu"}:
        return ""
    text = (
        f"{len(works)} cells to run on {workers} worker{'s' * (workers > 1)}: about "
        f"{_duration(sum(w.seconds() for w in known) / workers)} by their FLOPs and kernel "
        "counts at one CPU core's rate per worker"
    )
    return text + _left_out(len(works), len(known))


def _left_out(cells: int, counted: int) -> str:
    """`` (k cells without a count left out)`` where some of ``cells`` have no estimate."""
    k = cells - counted
    return f" ({k} cell{'s' * (k > 1)} without a count left out)" if k > 0 else ""


def _check_jobs(jobs: Any) -> None:
    if not isinstance(jobs, int) or isinstance(jobs, bool) or not 1 <= jobs <= MAX_JOBS:
        raise DepthlabError(f"--jobs must be an integer in 1..{MAX_JOBS}, got {jobs!r}")


def plan(
    names: list[str] | str,
    preset: str = "quick",
    overrides: dict[str, Any] | None = None,
    jobs: int = 1,
    out: str | Path | None = None,
    log: Callable[[str], None] = print,
    measure: bool = False,
    flush_denormal: bool | None = None,
) -> float:
    """What :func:`run` would do, without running or writing anything: per experiment its
    cells, those already cached in ``out/NAME/cells/`` (a resume), and the rest's work at one
    CPU core's rate (:mod:`depthlab.experiments.cost`), then the sweep's on ``jobs`` workers.
    With ``measure``, the estimate comes from training steps timed on the cells' device instead
    (:mod:`depthlab.experiments.timing`: a few steps of each distinct network, with the
    threads a worker would have). The same checks as :func:`run` refuse bad names, presets and
    overrides. ``flush_denormal``: the cells of such a run (:func:`run`; None: the preset's
    default), whose cache entries are their own. Returns the estimated seconds (cells without
    a count left out)."""
    _check_jobs(jobs)
    flush_denormal = resolve_flush(flush_denormal, preset, log, _device(overrides))
    check_flush(flush_denormal)
    works: list[Work | None] = []
    todo: list[dict[str, Any]] = []
    timed: list[float | None] = []
    timings: list[str] = []  # the networks timed for an experiment, logged after its line
    clock = StepTimes(log=timings.append) if measure else None
    for exp, cfg in resolve(names, preset, overrides or {}):
        cells = with_flush(exp.grid(cfg), flush_denormal)
        folder = Path(out, exp.name) if out is not None else None
        left = [
            c for c in cells if folder is None or _load_cell(_cell_path(folder, exp, c), c) is None
        ]
        mine = [cell_work(exp, c) for c in left]
        known = [w for w in mine if w is not None]
        line = f"[{exp.name}] {len(cells)} cells, {len(left)} to run"
        if len(left) < len(cells):
            line += f" ({len(cells) - len(left)} cached in {folder})"
        if clock is not None:
            with _threads(jobs):
                secs = [clock.seconds(exp, c) for c in left]
            timed += secs
            known = [s for s in secs if s is not None]
            if known:
                line += f"; about {_duration(sum(known))} of timed training steps"
        elif known:
            line += f"; about {_duration(sum(w.seconds() for w in known))} on one core"
        if len(known) < len(left):
            line += f" ({len(left) - len(known)} without a count)"
        log(line)
        for text in timings:
            log(text)
        timings.clear()
        works += mine
        todo += left
    workers = max(1, min(jobs, len(todo)))
    if not todo:
        log("nothing to run: every cell is cached")
        return 0.0
    if clock is not None:
        return _timed_total(timed, todo, workers, clock, log)
    text = estimate_text(works, todo, workers)
    log(text or f"{len(todo)} cells to run; no estimate (they run on a GPU or have no count)")
    return sum(w.seconds() for w in works if w is not None) / workers


@contextmanager
def _threads(jobs: int) -> Iterator[None]:
    """torch's CPU threads set to what one of ``jobs`` workers gets (:func:`make_pool`)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // jobs) if jobs > 1 else before)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _timed_total(
    timed: list[float | None],
    cells: list[dict[str, Any]],
    workers: int,
    clock: StepTimes,
    log: Callable[[str], None],
) -> float:
    """The sweep's seconds from the cells' timed steps, on ``workers`` workers (cells on a GPU:
    at most one worker per GPU at a time); logs the line."""
    import torch

    known = [s for s in timed if s is not None]
    devices = sorted({s.device for s in clock.times})
    gpu = any(d.startswith("cuda") for d in devices)
    lanes = min(workers, max(1, torch.cuda.device_count())) if gpu else workers
    total = sum(known) / lanes
    text = (
        f"{len(cells)} cells to run on {lanes} worker{'s' * (lanes > 1)}: about "
        f"{_duration(total)} of training steps timed on {', '.join(devices) or 'no device'} "
        f"({len(clock.times)} network{'s' * (len(clock.times) != 1)} timed; evaluation and "
        "start-up not counted)"
    )
    log(text + _left_out(len(cells), len(known)))
    return total


def make_pool(workers: int, jobs: int, flush: bool = False) -> ProcessPoolExecutor:
    """``workers`` spawned processes, each with ``max(1, cores // jobs)`` torch threads; on a
    machine with G GPUs worker k is pinned to GPU k mod G (``torch.cuda.set_device``), so that a
    cell on ``cuda`` runs on its worker's GPU. ``flush``: each flushes denormals to zero
    (:func:`flush_denormals`) before anything else. All workers start here, with
    :func:`depthlab.heap.worker_environment` (huge pages for ``malloc``)."""
    heap_enabled()  # a bad DEPTHLAB_KEEP_FREED_MEMORY is refused here, not in the workers
    ctx = mp.get_context("spawn")
    with starting_workers():
        pool = ProcessPoolExecutor(
            max_workers=workers,
            mp_context=ctx,
            initializer=_worker_init,
            initargs=(max(1, (os.cpu_count() or 1) // jobs), os.getpid(), ctx.Value("i", 0), flush),
        )
        try:  # a pool spawns a worker per task submitted while none is idle: one each, now
            for f in [pool.submit(os.getpid) for _ in range(workers)]:
                f.result()
        except BaseException:
            pool.shutdown(cancel_futures=True)
            raise
    return pool


def _merge(cells: list[dict], results: dict[int, list[dict]]) -> list[dict]:
    """Every record prefixed with its cell's fields, in cell order."""
    return [{**cell, **rec} for i, cell in enumerate(cells) for rec in results[i]]


def check_writable(out: Path) -> None:
    """Refuse an output folder that cannot be created or written, before any work starts
    (:func:`depthlab.validate.check_out_dir`)."""
    check_out_dir(out)


def experiments_with(preset: str) -> list[str]:
    """The registered experiments that have ``preset`` (``all`` runs these: ``deep`` exists only
    for the experiments with a depth claim)."""
    return [n for n in list_experiments() if preset in get_experiment(n).presets]


def resolve(names: list[str] | str, preset: str, overrides: dict[str, Any]) -> list[tuple]:
    """Validate names, preset and overrides for every experiment before anything runs.

    ``all`` means every experiment that has ``preset``. With several experiments, a key is
    applied where the experiment has it and refused only if no experiment has it. Returns
    ``[(experiment, config), ...]``.
    """
    if not isinstance(preset, str):
        raise DepthlabError(f"preset must be a name ({', '.join(PRESETS)}), got {preset!r}")
    if names == "all" or names == ["all"]:
        names = experiments_with(preset)
        if not names:
            raise unknown_choice("preset", preset, list(PRESETS))
    elif isinstance(names, str):
        names = [names]
    if not names or not all(isinstance(n, str) for n in names):
        raise DepthlabError(f"name the experiments to run (or 'all'), got {names!r}")
    exps = [get_experiment(n) for n in names]
    for e in exps:
        if preset not in e.presets:
            raise unknown_choice(f"preset of experiment '{e.name}'", preset, list(e.presets))
    if len(exps) > 1:
        known = {k for e in exps for k in e.keys()}
        bad = [k for k in overrides if k not in known]
        if bad:
            raise DepthlabError(
                f"unknown key(s) {', '.join(bad)} in --set; no experiment has them; valid keys: "
                f"{', '.join(sorted(known))}"
            )
        return [
            (e, e.config(preset, {k: v for k, v in overrides.items() if k in e.keys()}))
            for e in exps
        ]
    return [(exps[0], exps[0].config(preset, overrides))]


def finalize(
    exp: Experiment, cfg: Any, preset: str, df: pd.DataFrame, out_dir: Path, **info: Any
) -> ExperimentResult:
    """Figures, claims, records.csv, summary.json and report.md from an experiment's records."""
    from depthlab.report.render import render_experiment_md, save_figures

    figures = save_figures(exp, df, cfg, out_dir)
    claims = exp.claims(df, cfg) if len(df) else []
    if FLUSH_KEY in df and df[FLUSH_KEY].eq(True).any():
        claims = [replace(c, setup=f"{c.setup}; {FLUSH_NOTE}" if c.setup else FLUSH_NOTE)
                  for c in claims]  # fmt: skip
    result = ExperimentResult(
        name=exp.name,
        preset=preset,
        config=config_dict(cfg),
        records=df,
        claims=claims,
        figures=figures,
        out_dir=out_dir,
        title=exp.title,
        paper=exp.paper,
        **info,
    )
    atomic_write_text(out_dir / "records.csv", df.to_csv(index=False))
    write_json(out_dir / "summary.json", summary_dict(result))
    atomic_write_text(out_dir / "report.md", render_experiment_md(result))
    return result


def summary_dict(r: ExperimentResult) -> dict[str, Any]:
    return {
        "experiment": r.name,
        "title": r.title,
        "paper": r.paper,
        "preset": r.preset,
        "config": r.config,
        "claims": [c.__dict__ for c in r.claims],
        "figures": [p.name for p in r.figures],
        "records": len(r.records),
        "cells": r.cells,
        "cached_cells": r.cached_cells,
        "wall_time_s": round(r.wall_time_s, 2),
        **({"cell_time_s": r.extra["cell_time_s"]} if "cell_time_s" in r.extra else {}),
        "error": r.error,
    }


def _prepare(
    exp: Experiment, cfg: Any, preset: str, out_dir: Path, log, flush: bool = False
) -> list[dict[str, Any]]:
    """Create ``out_dir``, sweep half-written files, write ``config.yaml``; return the grid."""
    out_dir.mkdir(parents=True, exist_ok=True)
    sweep_temp_files(out_dir)
    sweep_temp_files(out_dir / "cells")
    write_yaml(
        out_dir / "config.yaml", {"experiment": exp.name, "preset": preset, **config_dict(cfg)}
    )
    cells = with_flush(exp.grid(cfg), flush)
    note = ", denormals flushed to zero" if flush else ""
    log(f"[{exp.name}] {exp.title} — {len(cells)} cells, preset {preset}{note}")
    return cells


def run_experiment(
    exp: Experiment,
    cfg: Any,
    preset: str,
    out_dir: Path,
    jobs: int = 1,
    log: Callable[[str], None] = print,
    pool: ProcessPoolExecutor | None = None,
    flush_denormal: bool | None = None,
) -> ExperimentResult:
    """Run one experiment into ``out_dir`` (resuming from its cached cells); ``flush_denormal``
    as :func:`run`'s (None: the preset's default; True is refused before anything is written
    on a CPU that cannot flush)."""
    flush_denormal = resolve_flush(flush_denormal, preset, log, getattr(cfg, "device", "auto"))
    check_flush(flush_denormal)
    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    cells = _prepare(exp, cfg, preset, out_dir, log, flush_denormal)
    records, n_cached = run_cells(exp, cells, out_dir, jobs=jobs, log=log, pool=pool)
    df = pd.DataFrame.from_records(records)
    wall = round(time.perf_counter() - t0, 2)  # as summary.json stores it: re-renders agree
    result = finalize(
        exp, cfg, preset, df, out_dir, wall_time_s=wall, cells=len(cells), cached_cells=n_cached
    )
    log(f"[{exp.name}] done in {wall:.1f}s: {len(df)} records, {len(result.figures)} figures")
    return result


def run(
    names: list[str] | str,
    preset: str = "quick",
    out: str | Path = "runs/quick",
    overrides: dict[str, Any] | None = None,
    jobs: int = 1,
    log: Callable[[str], None] = print,
    keep_going: bool = True,
    executor: str = "local",
    address: str | None = None,
    flush_denormal: bool | None = None,
) -> list[ExperimentResult]:
    """Run experiments into ``out/NAME/``; with several, also write ``out/report.md|html``.

    Every name, the preset, the overrides and the output folder are checked before anything is
    written. With ``keep_going``, an experiment that raises is recorded as an error row and the
    others still run. ``executor="ray"`` runs every cell as a Ray task
    (:mod:`depthlab.experiments.ray_executor`) on the cluster at ``address`` (None: a local Ray
    started and stopped here); ``jobs`` is then ignored (the cluster's CPUs decide).

    ``flush_denormal``: every cell runs in a worker process that flushes denormal floats to
    zero (:func:`flush_denormals`; a pool of one for ``jobs=1``) — fast where signals underflow
    (the arms that are there to fail), but not IEEE arithmetic, so the records can differ: the
    cells carry ``flush_denormal: True`` (their own cache entries and a record column) and each
    claim's setup says so; with ``executor="ray"`` the job's workers flush from their start
    (:func:`depthlab.experiments.ray_executor.flush_worker`). None (the default): on for the
    ``deep`` preset (:data:`FLUSH_PRESETS`) where this CPU can flush, off otherwise
    (:func:`resolve_flush`); False keeps IEEE arithmetic everywhere.
    """
    if executor not in EXECUTORS:
        raise unknown_choice("executor", executor, list(EXECUTORS))
    if address is not None and executor != "ray":
        raise DepthlabError("--address is the Ray cluster's address: use it with --executor ray")
    gpus = None  # a Ray cluster's GPUs decide the deep default's arithmetic, not this machine's
    if executor == "ray" and address is not None:
        from depthlab.experiments import ray_executor

        gpus = partial(ray_executor.cluster_gpus, address)
    flush_denormal = resolve_flush(flush_denormal, preset, log, _device(overrides), gpus)
    check_flush(flush_denormal)
    _check_jobs(jobs)
    if overrides is not None and not isinstance(overrides, dict):
        raise DepthlabError(f"overrides must be a mapping of key: value, got {overrides!r}")
    plan = resolve(names, preset, overrides or {})
    out = check_out_dir(out)
    combined = len(plan) > 1
    if names == "all" or names == ["all"]:
        left = sorted(set(list_experiments()) - {e.name for e, _ in plan})
        if left:
            log(f"(no '{preset}' preset, not run: {', '.join(left)})")
    results = []
    if executor == "ray":
        from depthlab.experiments.ray_executor import RayBackend

        # refuses before anything is written when Ray is missing
        backend = RayBackend(address, flush=flush_denormal)
        with FolderLock(out, "run"):
            sweep_temp_files(out)
            with backend:
                _run_plan_overlapped(plan, preset, out, log, True, backend, results, flush_denormal)
            if combined:
                from depthlab.report.render import write_combined

                write_combined(results, out)
        return results
    with FolderLock(out, "run"):
        sweep_temp_files(out)
        pool = make_pool(jobs, jobs, flush_denormal) if jobs > 1 and combined else None
        try:
            if pool is not None:
                backend = PoolBackend(pool)
                _run_plan_overlapped(
                    plan, preset, out, log, keep_going, backend, results, flush_denormal
                )
            else:
                _run_plan(
                    plan, preset, out, jobs, log, keep_going, combined, pool, results,
                    flush_denormal,
                )  # fmt: skip
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)
        if combined:
            from depthlab.report.render import write_combined

            write_combined(results, out)
    return results


def _run_plan(
    plan, preset, out, jobs, log, keep_going, combined, pool, results, flush=False
) -> None:
    """Run each (experiment, config) of ``plan`` in turn, appending to ``results``."""
    for k, (exp, cfg) in enumerate(plan, 1):
        if combined:
            log(f"=== experiment {k}/{len(plan)}: {exp.name} ===")
        try:
            results.append(
                run_experiment(
                    exp,
                    cfg,
                    preset,
                    out / exp.name,
                    jobs=jobs,
                    log=log,
                    pool=pool,
                    flush_denormal=flush,
                )  # fmt: skip
            )
        except (KeyboardInterrupt, DepthlabError):
            raise
        except Exception as e:  # noqa: BLE001 - reported in the table, the sweep goes on
            if not keep_going or not combined:
                raise
            tb = traceback.format_exc(limit=3)
            log(f"[{exp.name}] FAILED: {type(e).__name__}: {e}")
            print(tb, file=sys.stderr)
            results.append(
                ExperimentResult(
                    name=exp.name,
                    preset=preset,
                    config=config_dict(cfg),
                    records=pd.DataFrame(),
                    claims=[],
                    figures=[],
                    out_dir=out / exp.name,
                    error=f"{type(e).__name__}: {e}",
                    title=exp.title,
                    paper=exp.paper,
                )
            )


@dataclass
class _Job:
    """One experiment of an overlapped sweep: its cells, what is done, what is left."""

    exp: Experiment
    cfg: Any
    out_dir: Path
    cells: list[dict[str, Any]]
    done: dict[int, list[dict]]
    todo: set[int]
    n_cached: int
    cell_time: float = 0.0
    finished: bool = False
    failed: list[str] = field(default_factory=list)
    works: dict[int, Work | None] = field(default_factory=dict)  # the pending cells' work


class PoolBackend:
    """Cells as futures of a local :class:`ProcessPoolExecutor`."""

    name = "local"

    def __init__(self, pool: ProcessPoolExecutor) -> None:
        self.pool = pool

    def submit(self, exp: Experiment, cell: dict[str, Any]) -> Any:
        return self.pool.submit(_run_cell, type(exp).__module__, exp.name, cell)

    def ready(self, handles: list[Any]) -> list[Any]:
        done, _ = wait(handles, return_when=FIRST_COMPLETED)
        return list(done)

    def result(self, handle: Any) -> tuple[list[dict], float]:
        return handle.result()

    def cancel(self, handle: Any) -> None:
        handle.cancel()


def _cell_label(cell: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in cell.items() if k != "device")


def _run_plan_overlapped(plan, preset, out, log, keep_going, backend, results, flush=False) -> None:
    """Every experiment's cells go to the backend at once (in plan order, so experiments finish
    roughly in turn); each experiment is finalized (figures, claims, reports) as soon as its last
    cell is in, while the workers go on with the next ones — no worker waits for a slow last
    cell or for the figures. A cell that raises is reported with its config; the other cells
    still run (and are cached), and its experiment becomes an error row naming the failed cells.
    ``wall_time_s`` of an experiment is the sweep's wall time between the previous experiment's
    finish and its own (they add up to the sweep's); ``cell_time_s`` the sum of its cells' run
    times."""
    sweep = _Sweep(preset, log, keep_going, backend, flush)
    for exp, cfg in plan:
        sweep.add(exp, cfg, out / exp.name)
    sweep.run()
    results.extend(sweep.slots[exp.name] for exp, _ in plan if exp.name in sweep.slots)


class _Sweep:
    """The state of an overlapped sweep (see :func:`_run_plan_overlapped`)."""

    def __init__(
        self, preset: str, log: Callable[[str], None], keep_going: bool, backend, flush=False
    ) -> None:
        self.preset, self.log, self.keep_going, self.backend = preset, log, keep_going, backend
        self.flush = flush
        self.jobs: list[_Job] = []
        self.handles: dict[Any, tuple[_Job, int]] = {}
        self.slots: dict[str, ExperimentResult] = {}
        self.t_prev = time.perf_counter()
        self.bar = None
        self.t0, self.n_run = time.perf_counter(), 0
        self.eta = Eta()

    def add(self, exp: Experiment, cfg: Any, out_dir: Path) -> None:
        """Prepare one experiment's folder and submit its cells that are not cached."""
        cells = _prepare(exp, cfg, self.preset, out_dir, self.log, self.flush)
        done = {}
        for i, cell in enumerate(cells):
            cached = _load_cell(_cell_path(out_dir, exp, cell), cell)
            if cached is not None:
                done[i] = cached
        job = _Job(exp, cfg, out_dir, cells, done, set(range(len(cells))) - set(done), len(done))
        job.works = {i: cell_work(exp, cells[i]) for i in job.todo}
        self.jobs.append(job)
        if job.n_cached:
            self.log(f"  [{exp.name}] {job.n_cached}/{len(cells)} cells cached")
        for i in sorted(job.todo):
            self.handles[self.backend.submit(exp, cells[i])] = (job, i)

    def run(self) -> None:
        workers = self._workers()
        # the CPU-rate estimate, unless a Ray cluster has GPUs (cells may run on them)
        if workers and not getattr(self.backend, "gpus", 0):
            left = list(self.handles.values())
            works = [job.works.get(i) for job, i in left]
            before = estimate_text(works, [job.cells[i] for job, i in left], workers)
            if before:
                self.log(f"[{self.backend.name}] {before}")
        self._start_bar()
        try:
            for job in self.jobs:
                self._finish(job)  # nothing left to run: every cell was cached
            while self.handles:
                for h in self.backend.ready(list(self.handles)):
                    self._collect(h)
        except BaseException:
            for h in self.handles:
                self.backend.cancel(h)
            raise
        finally:
            if self.bar is not None:
                self.bar.close()

    def _start_bar(self) -> None:
        """One progress bar over every cell still to run, on a TTY; log lines print above it."""
        if not self.handles or not sys.stderr.isatty():
            return
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(self.handles), unit="cell", dynamic_ncols=True,
                        desc=self.backend.name)  # fmt: skip
        emit = self.log

        def log(msg: str) -> None:
            with tqdm.external_write_mode(file=sys.stderr):
                emit(msg)

        self.log = log

    def _collect(self, handle: Any) -> None:
        """A finished cell: cache it (or record its failure), log it, finalize when done."""
        job, i = self.handles.pop(handle)
        cell = job.cells[i]
        work = job.works.pop(i, None)
        try:
            records, wall = self.backend.result(handle)
        except (KeyboardInterrupt, DepthlabError):
            raise
        except Exception as e:  # noqa: BLE001 - the other cells go on
            if not self.keep_going:
                raise
            first = (str(e).strip().splitlines()[-1:] or [""])[0][:200]
            job.failed.append(f"[{_cell_label(cell)}] {type(e).__name__}: {first}")
            self.log(f"  [{job.exp.name}] cell FAILED ({_cell_label(cell)}): {first}")
        else:
            _save_cell(_cell_path(job.out_dir, job.exp, cell), job.exp, cell, records, wall)
            job.done[i] = records
            job.cell_time += wall
            self.eta.add(job.exp.name, work, wall)
            n = len(job.done) + len(job.failed)
            label = " ".join(f"{k}={v}" for k, v in cell.items() if k != "seed")
            self.n_run += 1
            eta = self._eta()
            self.log(f"  [{job.exp.name}] cell {n}/{len(job.cells)} ({wall:.1f}s) {label}{eta}")
        job.todo.discard(i)
        if self.bar is not None:
            self.bar.update(1)
        self._finish(job)

    def _workers(self) -> int | None:
        """How many cells run at once: the backend's ``workers`` (Ray: the cluster's CPUs per
        cell's CPUs), the local pool's size, or None where unknown."""
        workers = getattr(self.backend, "workers", None)
        return workers or getattr(getattr(self.backend, "pool", None), "_max_workers", None)

    def _eta(self) -> str:
        """The cells still queued, each at its predicted time (:class:`~depthlab.experiments.
        cost.Eta`: its FLOPs and kernel count at the rate its experiment's finished cells ran,
        or all finished cells' rate for an experiment with none finished yet — then the text
        says how many experiments are such guesses), spread over the workers; the plain rate of
        the finished cells where the number of workers is unknown."""
        workers = self._workers()
        left = list(self.handles.values())
        if not workers or not left:
            return eta_text(time.perf_counter() - self.t0, self.n_run, len(left))
        seconds = sum(self.eta.seconds(job.exp.name, job.works.get(i)) for job, i in left)
        text = eta_seconds(seconds / workers)
        untimed = {job.exp.name for job, _ in left if not self.eta.timed(job.exp.name)}
        if untimed:  # a guess until one of their cells is in: say so
            n = len(untimed)
            text += (
                f" ({n} experiment{'s' * (n > 1)} not timed yet: a guess from FLOPs and "
                "kernel counts, or the mean cell)"
            )
        return text

    def _error_row(self, job: _Job, error: str) -> None:
        self.log(f"[{job.exp.name}] FAILED: {error}")
        self.slots[job.exp.name] = ExperimentResult(
            name=job.exp.name, preset=self.preset, config=config_dict(job.cfg),
            records=pd.DataFrame(), claims=[], figures=[], out_dir=job.out_dir, error=error,
            title=job.exp.title, paper=job.exp.paper, cells=len(job.cells),
            cached_cells=job.n_cached,
        )  # fmt: skip

    def _finish(self, job: _Job) -> None:
        """Figures, claims and reports of an experiment whose cells are all in (once)."""
        if job.finished or job.todo:
            return
        job.finished = True
        if job.failed:
            n = len(job.failed)
            self._error_row(job, f"{n} of {len(job.cells)} cells failed: " + "; ".join(job.failed))
            return
        df = pd.DataFrame.from_records(_merge(job.cells, job.done))
        try:
            result = finalize(
                job.exp, job.cfg, self.preset, df, job.out_dir, cells=len(job.cells),
                cached_cells=job.n_cached,
                wall_time_s=round(time.perf_counter() - self.t_prev, 2),
                extra={"cell_time_s": round(job.cell_time, 2)},
            )  # fmt: skip
        except (KeyboardInterrupt, DepthlabError):
            raise
        except Exception as e:  # noqa: BLE001 - reported in the table, the sweep goes on
            if not self.keep_going:
                raise
            print(traceback.format_exc(limit=3), file=sys.stderr)
            self._error_row(job, f"{type(e).__name__}: {e}")
            return
        self.t_prev = time.perf_counter()
        ran = len(job.cells) - job.n_cached
        cost = f"; {ran} cells run, {job.cell_time / ran:.1f}s per cell" if ran else ""
        self.log(f"[{job.exp.name}] done: {len(df)} records, {len(result.figures)} figures{cost}")
        self.slots[job.exp.name] = result


def load_result(folder: Path) -> ExperimentResult:
    """Re-build an experiment's result from ``config.yaml`` and ``records.csv`` (re-rendering
    figures, claims and report.md)."""
    from depthlab.io import load_yaml

    folder = Path(folder)
    meta = load_yaml(folder / "config.yaml")
    name, preset = meta.pop("experiment", None), meta.pop("preset", "quick")
    if not isinstance(name, str):
        raise DepthlabError(f"{folder / 'config.yaml'} names no experiment")
    exp = get_experiment(name)
    if not isinstance(preset, str) or preset not in exp.presets:
        preset = "quick" if "quick" in exp.presets else next(iter(exp.presets))
    cfg = apply_overrides(exp.presets[preset], meta, where=str(folder))
    csv = folder / "records.csv"
    if not csv.is_file():
        raise DepthlabError(f"{csv} is missing; re-run `depthlab run {name}` to produce it")
    df = read_records(csv, exp)
    check_out_dir(folder, "the report folder")
    old = {}
    try:
        old = json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        pass
    if not isinstance(old, dict):
        old = {}

    def num(key: str, default: float) -> float:
        try:
            return float(old.get(key, default))
        except (TypeError, ValueError):
            return default

    try:
        return finalize(
            exp,
            cfg,
            preset,
            df,
            folder,
            wall_time_s=num("wall_time_s", math.nan),
            cells=int(num("cells", 0)),
            cached_cells=int(num("cached_cells", 0)),
        )
    except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
        if isinstance(e, DepthlabError):
            raise
        raise DepthlabError(
            f"{csv} does not hold records this version of '{name}' can read "
            f"({type(e).__name__}: {str(e)[:100]}); re-run `depthlab run {name}`"
        ) from None


def read_records(csv: Path, exp: Experiment) -> pd.DataFrame:
    """``records.csv`` of a finished experiment, checked: UTF-8 text, complete (a file cut off
    mid-line is refused), non-empty, with every documented column of the experiment."""
    fix = f"re-run `depthlab run {exp.name}` to produce it again"
    from depthlab.io import read_text

    text = read_text(csv, "a CSV of records", fix)
    if not text.strip():
        raise DepthlabError(f"{csv} is empty; {fix}")
    if not text.endswith("\n"):
        raise DepthlabError(f"{csv} is truncated (its last line is incomplete); {fix}")
    import io

    try:
        df = pd.read_csv(io.StringIO(text))
    except (pd.errors.ParserError, pd.errors.EmptyDataError, ValueError) as e:
        raise DepthlabError(
            f"{csv} is not a valid CSV ({str(e).splitlines()[0][:100]}); {fix}"
        ) from None
    if not len(df):
        raise DepthlabError(f"{csv} holds no records; {fix}")
    missing = [c for c in exp.columns if c not in df.columns]
    if missing:
        raise DepthlabError(
            f"{csv} lacks the column(s) {', '.join(missing)} of experiment '{exp.name}'; {fix}"
        )
    return df
