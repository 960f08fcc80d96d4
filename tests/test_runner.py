"""The experiment runner: cells cached by config hash, resume after a kill, parallel workers.

A fake experiment registered here counts its executions with marker files.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from denormal_cells import DenormalConfig, denormal_products  # registers test-denormal-cells
from depthlab.experiments import EXPERIMENTS, Claim, Experiment
from depthlab.experiments.runner import cell_hash, run

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class CountConfig:
    n: int = 6  # number of cells
    log: str = ""  # folder for execution markers
    scale: float = 1.0


@EXPERIMENTS.register()
class CountCells(Experiment):
    name = "test-count-cells"
    title = "counts executions"
    columns = ("i", "value")
    Config = CountConfig
    presets = {"smoke": CountConfig()}

    def cells(self, cfg):
        return [{"i": i, "log": cfg.log, "scale": cfg.scale} for i in range(cfg.n)]

    def run_cell(self, cell):
        phase = os.environ.get("DEPTHLAB_TEST_PHASE", "x")
        Path(cell["log"], f"{cell['i']}.{phase}").write_text(str(os.getpid()))
        if os.environ.get("DEPTHLAB_TEST_KILL_AT") == str(cell["i"]):
            os.kill(os.getpid(), signal.SIGKILL)  # a hard kill mid-sweep
        return [{"value": cell["i"] * cell["scale"]}, {"value": -cell["i"]}]

    def claims(self, df, cfg):
        ok = bool(
            (df.groupby("i")["value"].max() == df.groupby("i")["i"].first() * cfg.scale).all()
        )
        return [
            Claim(
                "values are i·scale",
                "i·scale",
                f"{len(df)} records",
                "reproduced" if ok else "not reproduced",
            )
        ]


@EXPERIMENTS.register()
class FailCell(CountCells):
    name = "test-fail-cell"

    def run_cell(self, cell):
        if cell["i"] == 1:
            raise ValueError("cell 1 breaks")
        return super().run_cell(cell)


def markers(log: Path, phase: str) -> list[int]:
    return sorted(int(p.name.split(".")[0]) for p in log.glob(f"*.{phase}"))


def test_killed_sweep_resumes_and_recomputes_only_missing_cells(tmp_path, monkeypatch):
    log, out = tmp_path / "log", tmp_path / "out"
    log.mkdir()
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import test_runner
        from depthlab.experiments.runner import run
        run("test-count-cells", preset="smoke", out={str(out)!r},
            overrides={{"log": {str(log)!r}}}, log=lambda s: None)
        """
    )
    env = {**os.environ, "DEPTHLAB_TEST_PHASE": "first", "DEPTHLAB_TEST_KILL_AT": "3"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    assert markers(log, "first") == [0, 1, 2, 3]
    cells_dir = out / "test-count-cells" / "cells"
    assert len(list(cells_dir.glob("*.json"))) == 3  # cell 3 died before its file was written
    assert not list(cells_dir.glob(".*.tmp"))  # no half-written cell files
    assert not (out / "test-count-cells" / "records.csv").exists()

    monkeypatch.setenv("DEPTHLAB_TEST_PHASE", "second")
    (result,) = run("test-count-cells", "smoke", out, {"log": str(log)}, log=lambda s: None)
    assert markers(log, "second") == [3, 4, 5]  # only the missing cells ran
    assert result.cached_cells == 3 and result.cells == 6
    df = pd.read_csv(out / "test-count-cells" / "records.csv")
    assert list(df["i"]) == [i for i in range(6) for _ in range(2)]  # cell order kept
    assert list(df["value"][::2]) == [float(i) for i in range(6)]
    assert result.claims[0].verdict == "reproduced"

    monkeypatch.setenv("DEPTHLAB_TEST_PHASE", "third")
    run("test-count-cells", "smoke", out, {"log": str(log)}, log=lambda s: None)
    assert markers(log, "third") == []  # a re-run reuses every finished cell

    monkeypatch.setenv("DEPTHLAB_TEST_PHASE", "fourth")
    run("test-count-cells", "smoke", out, {"log": str(log), "scale": 2.0}, log=lambda s: None)
    assert markers(log, "fourth") == list(range(6))  # a changed config is a new cell
    summary = json.loads((out / "test-count-cells" / "summary.json").read_text())
    assert summary["cells"] == 6 and summary["cached_cells"] == 0


def test_parallel_workers_run_each_missing_cell_once(tmp_path, monkeypatch):
    log, out = tmp_path / "log", tmp_path / "out"
    log.mkdir()
    monkeypatch.setenv("DEPTHLAB_TEST_PHASE", "par")
    monkeypatch.syspath_prepend(str(HERE))  # spawned workers import this module by name
    (r,) = run(
        "test-count-cells", "smoke", out, {"log": str(log), "n": 4}, jobs=2, log=lambda s: None
    )
    assert markers(log, "par") == [0, 1, 2, 3]
    pids = {p.read_text() for p in log.glob("*.par")}
    assert str(os.getpid()) not in pids  # ran in worker processes
    assert list(r.records["value"][::2]) == [0.0, 1.0, 2.0, 3.0]


def test_cell_hash_depends_on_name_version_and_every_field():
    base = cell_hash("a", 1, {"x": 1, "y": "s"})
    assert base == cell_hash("a", 1, {"y": "s", "x": 1})  # key order does not matter
    assert (
        len(
            {
                base,
                cell_hash("b", 1, {"x": 1, "y": "s"}),
                cell_hash("a", 2, {"x": 1, "y": "s"}),
                cell_hash("a", 1, {"x": 2, "y": "s"}),
            }
        )
        == 4
    )


def test_bad_overrides_and_presets_are_refused_before_writing(tmp_path):
    from depthlab import DepthlabError

    out = tmp_path / "out"
    with pytest.raises(DepthlabError, match="unknown key.*nope.*valid keys: n, log, scale"):
        run("test-count-cells", "smoke", out, {"nope": 1})
    with pytest.raises(DepthlabError, match="must be an integer"):
        run("test-count-cells", "smoke", out, {"n": "many"})
    with pytest.raises(DepthlabError, match="unknown preset.*choose one of: smoke"):
        run("test-count-cells", "quick", out)
    assert not out.exists()


def test_a_sweep_of_several_experiments_shares_the_workers(tmp_path, monkeypatch):
    """``run all``-style sweeps with jobs > 1 queue every experiment's cells at once: each cell
    runs once, a failing experiment becomes an error row while the others finish, results keep
    the plan's order, and the per-experiment wall times add up to at most the sweep's."""
    import time

    log, out = tmp_path / "log", tmp_path / "out"
    log.mkdir()
    monkeypatch.setenv("DEPTHLAB_TEST_PHASE", "ovl")
    monkeypatch.syspath_prepend(str(HERE))
    t0 = time.perf_counter()
    results = run(["test-fail-cell", "test-count-cells"], "smoke", out,
                  {"log": str(log), "n": 4}, jobs=2, log=lambda s: None)  # fmt: skip
    wall = time.perf_counter() - t0
    assert [r.name for r in results] == ["test-fail-cell", "test-count-cells"]
    failed, ok = results
    assert failed.error and "cell 1 breaks" in failed.error and not failed.claims
    assert ok.error is None and ok.claims[0].verdict == "reproduced"
    assert list(ok.records["value"][::2]) == [0.0, 1.0, 2.0, 3.0]
    summary = json.loads((out / "test-count-cells" / "summary.json").read_text())
    assert summary["cell_time_s"] >= 0 and summary["cells"] == 4
    done = [r for r in results if r.error is None]  # wall times are rounded to 0.01 s
    assert sum(r.wall_time_s for r in done) <= wall + 0.005 * len(done)
    assert (out / "report.md").is_file()
    monkeypatch.setenv("DEPTHLAB_TEST_PHASE", "again")
    (again,) = run(["test-count-cells"], "smoke", out, {"log": str(log), "n": 4}, jobs=2,
                   log=lambda s: None)  # fmt: skip
    assert again.cached_cells == 4 and markers(log, "again") == []


def test_ray_executor_without_ray_says_how_to_install(tmp_path, monkeypatch, capsys):
    from depthlab.cli import main

    monkeypatch.setitem(sys.modules, "ray", None)  # import ray raises ImportError
    out = tmp_path / "out"
    code = main(["run", "bn-signal", "--preset", "smoke", "--out", str(out), "--executor", "ray"])
    err = capsys.readouterr().err
    assert code == 2 and "pip install 'depthlab[ray]'" in err and len(err.strip().splitlines()) == 1
    assert not out.exists()


@pytest.mark.parametrize(
    "argv,match",
    [
        (["--executor", "spark"], "executor"),
        (["--address", "127.0.0.1:6379"], "--executor ray"),
    ],
)
def test_bad_executor_options_exit_2_before_writing(tmp_path, capsys, argv, match):
    from depthlab.cli import main

    out = tmp_path / "out"
    code = main(["run", "bn-signal", "--preset", "smoke", "--out", str(out), *argv])
    assert code == 2 and match in capsys.readouterr().err and not out.exists()


@dataclass(frozen=True)
class SizedConfig:
    n: int = 3
    device: str = "cpu"


@EXPERIMENTS.register()
class SizedCells(Experiment):
    """Cells that name a network and a budget (their work is counted) but train nothing."""

    name = "test-sized-cells"
    title = "sized cells"
    columns = ("i",)
    Config = SizedConfig
    presets = {"smoke": SizedConfig()}

    def cells(self, cfg):
        return [
            {"i": i, "depth": 10_000 * (i + 1), "width": 64, "steps": 1000, "batch_size": 64}
            for i in range(cfg.n)
        ]

    def run_cell(self, cell):
        return [{"i": cell["i"]}]

    def claims(self, df, cfg):
        return []


def test_run_says_what_the_cells_should_take_before_they_run(tmp_path):
    """Before the first cell: the cells' work at one CPU core's rate (FLOPs and kernel
    launches, :mod:`depthlab.experiments.cost`); after each cell but the last, an ETA. On a
    GPU the CPU rate does not apply, and nothing is said."""
    from depthlab.experiments import get_experiment
    from depthlab.experiments.cost import cell_work
    from depthlab.experiments.runner import estimate_text

    exp = get_experiment("test-sized-cells")
    cells = exp.grid(exp.config("smoke"))
    seconds = sum(cell_work(exp, c).seconds() for c in cells)
    lines: list[str] = []
    run("test-sized-cells", "smoke", tmp_path / "a", log=lines.append)
    assert f"[test-sized-cells] 3 cells to run on 1 worker: about {seconds / 60:.0f} min by " in (
        "\n".join(lines)
    )
    cell_lines = [s for s in lines if "] cell " in s]
    assert len(cell_lines) == 3 and all("; ETA " in s for s in cell_lines[:2])
    assert "ETA" not in cell_lines[2]
    works = [cell_work(exp, c) for c in cells]
    assert estimate_text(works, cells, 1).startswith("3 cells to run on 1 worker: about")
    assert estimate_text(works, [{**c, "device": "cuda"} for c in cells], 1) == ""
    assert estimate_text([None, None], cells[:2], 2) == ""  # nothing counted: nothing said
    assert estimate_text([works[0], None], cells[:2], 2).endswith(
        "(1 cell without a count left out)"
    )


def test_plan_counts_the_cells_to_run_and_their_work_without_writing(tmp_path):
    """``plan`` (``run --dry-run``): per experiment its cells, those cached under ``out`` and
    the rest's work at one core's rate; the sweep's estimate on ``jobs`` workers; nothing is
    written, and a finished run leaves nothing to run."""
    from depthlab.experiments import get_experiment
    from depthlab.experiments.cost import cell_work
    from depthlab.experiments.runner import plan

    exp = get_experiment("test-sized-cells")
    seconds = sum(cell_work(exp, c).seconds() for c in exp.grid(exp.config("smoke")))
    out, lines = tmp_path / "out", []
    assert plan("test-sized-cells", "smoke", jobs=2, out=out, log=lines.append) == seconds / 2
    assert not out.exists()
    assert lines[0] == (
        f"[test-sized-cells] 3 cells, 3 to run; about {seconds / 60:.0f} min on one core"
    )
    assert lines[1].startswith(f"3 cells to run on 2 workers: about {seconds / 120:.0f} min")
    run("test-sized-cells", "smoke", out, log=lambda s: None)
    lines.clear()
    assert plan("test-sized-cells", "smoke", out=out, log=lines.append) == 0.0
    assert lines == [
        f"[test-sized-cells] 3 cells, 0 to run (3 cached in {out / 'test-sized-cells'})",
        "nothing to run: every cell is cached",
    ]


def _can_flush() -> bool:
    from depthlab.experiments.runner import flush_supported

    return flush_supported()


needs_flush = pytest.mark.skipif(not _can_flush(), reason="this CPU cannot flush denormals")


@needs_flush
@pytest.mark.parametrize("jobs", [1, 2])
def test_flush_denormal_runs_every_cell_in_workers_that_flush(tmp_path, jobs):
    """Every cell's products flush on every thread of its worker (with one job the worker has
    all the cores' threads, which start after the flush is set); this process keeps IEEE
    arithmetic; the records and each claim's setup say so."""
    from depthlab.experiments.runner import FLUSH_KEY, FLUSH_NOTE

    size = DenormalConfig.size
    [res] = run("test-denormal-cells", "smoke", tmp_path / "out", jobs=jobs, flush_denormal=True)
    df = res.records
    assert (df["denormals"] == 0).all() and df[FLUSH_KEY].eq(True).all()
    assert (df["pid"] != os.getpid()).all()
    assert res.claims[0].setup == FLUSH_NOTE
    assert denormal_products(size)["denormals"] == size  # IEEE here, before and after


@needs_flush
def test_an_ieee_run_keeps_its_cells_apart_from_a_flushed_one(tmp_path):
    """The flushed cells have their own cache entries: an IEEE run into the same folder
    recomputes them with denormals kept, and a flushed run after it reuses its own."""
    from depthlab.experiments.runner import FLUSH_KEY

    out, size = tmp_path / "out", DenormalConfig.size
    [flushed] = run("test-denormal-cells", "smoke", out, jobs=1, flush_denormal=True)
    [ieee] = run("test-denormal-cells", "smoke", out, jobs=1)
    assert ieee.cached_cells == 0 and FLUSH_KEY not in ieee.records
    assert (ieee.records["denormals"] == size).all() and ieee.claims[0].setup == ""
    [again] = run("test-denormal-cells", "smoke", out, jobs=1, flush_denormal=True)
    assert again.cached_cells == len(again.records) == len(flushed.records)
    assert (again.records["denormals"] == 0).all()


def test_flush_denormal_on_a_cpu_that_cannot_exits_2_before_writing(tmp_path, monkeypatch, capsys):
    import torch

    from depthlab.cli import main

    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: False)  # as on a CPU without it
    out = tmp_path / "out"
    code = main(["run", "test-denormal-cells", "--preset", "smoke", "--out", str(out),
                 "--flush-denormal"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "run without --flush-denormal" in err and not out.exists()
    code = main(["run", "test-denormal-cells", "--preset", "smoke", "--dry-run",
                 "--flush-denormal"])  # fmt: skip
    assert code == 2


def test_run_experiment_refuses_flush_on_a_cpu_that_cannot_before_writing(tmp_path, monkeypatch):
    import torch

    from depthlab import DepthlabError
    from depthlab.experiments.runner import run_experiment

    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: False)  # as on a CPU without it
    exp = EXPERIMENTS.get("test-denormal-cells")()
    out = tmp_path / "out"
    with pytest.raises(DepthlabError, match="run without --flush-denormal"):
        run_experiment(exp, DenormalConfig(), "smoke", out, flush_denormal=True)
    assert not out.exists()


def test_probing_for_flush_support_keeps_this_threads_arithmetic():
    """The probe reads this thread's setting and puts it back: IEEE stays IEEE."""
    from depthlab.experiments.runner import flush_supported

    flush_supported()
    assert denormal_products(16)["denormals"] == 16


def test_the_deep_preset_flushes_by_default_and_the_others_keep_ieee():
    """``flush_denormal=None`` is the preset's default: on for ``deep`` only (where this CPU
    can flush, with local workers), and an explicit True or False always wins."""
    from depthlab import DepthlabError
    from depthlab.experiments.runner import FLUSH_PRESETS, flush_supported, resolve_flush

    assert FLUSH_PRESETS == {"deep"}
    for preset in ("smoke", "quick", "full"):
        assert resolve_flush(None, preset) is False
        assert resolve_flush(True, preset) is True
    assert resolve_flush(None, "deep", log=lambda s: None) is flush_supported()
    assert resolve_flush(False, "deep") is False
    with pytest.raises(DepthlabError, match="True, False or None"):
        resolve_flush("yes", "deep")


def test_where_the_deep_default_cannot_flush_the_sweep_keeps_ieee_and_says_why(monkeypatch):
    """On a CPU without FTZ/DAZ the default falls back to IEEE arithmetic with a line that says
    why (an explicit --flush-denormal is refused there instead)."""
    import torch

    from depthlab.experiments.runner import resolve_flush

    lines: list[str] = []
    monkeypatch.setattr(torch, "set_flush_denormal", lambda on: False)  # as on a CPU without it
    assert resolve_flush(None, "deep", lines.append) is False
    assert lines == ["(--preset deep: IEEE arithmetic — this CPU cannot flush denormals)"]


def test_the_deep_default_flushes_only_cells_that_run_on_the_cpu(monkeypatch):
    """Flushing is CPU arithmetic: cells on a GPU (``device`` cuda, or auto where CUDA is
    there) keep the IEEE default and their claims no denormal note; ``--set device=cpu`` on such
    a machine flushes."""
    import torch

    from depthlab.experiments.runner import flush_supported, resolve_flush

    lines: list[str] = []
    assert resolve_flush(None, "deep", lines.append, "cuda") is False
    assert lines == ["(--preset deep on device cuda: IEEE arithmetic — the flush is for CPUs)"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_flush(None, "deep", lambda s: None, "auto") is False
    assert resolve_flush(None, "deep", lambda s: None, "cpu") is flush_supported()
    assert resolve_flush(True, "deep", lambda s: None, "cuda") is True  # asked for: as given


def test_the_deep_default_follows_the_gpus_of_the_machines_that_run_the_cells(monkeypatch):
    """``gpus`` (a Ray cluster's) decides ``device=auto``, not this machine's CUDA: a cluster
    with GPUs keeps IEEE and says why; a CPU-only one flushes even where the driver has CUDA."""
    import torch

    from depthlab.experiments.runner import flush_supported, resolve_flush

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    lines: list[str] = []
    assert resolve_flush(None, "deep", lines.append, "auto", gpus=lambda: 4.0) is False
    assert lines == [
        "(--preset deep on device auto: IEEE arithmetic — the cluster has 4 GPU(s); the flush "
        "is for CPUs)"
    ]
    assert (
        resolve_flush(None, "deep", lambda s: None, "auto", gpus=lambda: 0.0) is flush_supported()
    )
    assert resolve_flush(None, "deep", lambda s: None, "cpu", gpus=lambda: 4.0) is flush_supported()


def test_a_ray_sweep_asks_the_cluster_for_gpus_before_its_deep_default(tmp_path, monkeypatch):
    """``run(..., executor="ray", address=...)`` with the ``deep`` default and ``device=auto``
    decides the flush from the cluster's GPUs (``ray_executor.cluster_gpus``), before its
    workers start; an explicit flag, a device or a local Ray (no address) asks nothing."""
    from depthlab.experiments import ray_executor, runner

    class Started(Exception):
        pass

    class Backend:  # stands in for RayBackend: records the sweep's flush, connects nowhere
        def __init__(self, address=None, cpus_per_cell=1, flush=False):
            seen.append(flush)
            raise Started

    asked: list[str] = []
    seen: list[bool] = []
    monkeypatch.setattr(runner, "FLUSH_PRESETS", frozenset({"smoke"}))
    monkeypatch.setattr(ray_executor, "RayBackend", Backend)
    for gpus in (2.0, 0.0):
        monkeypatch.setattr(ray_executor, "cluster_gpus", lambda a, g=gpus: asked.append(a) or g)
        with pytest.raises(Started):
            run("test-denormal-cells", "smoke", tmp_path / "o", executor="ray",
                address="head:6379", log=lambda s: None)  # fmt: skip
    assert asked == ["head:6379"] * 2 and seen == [False, runner.flush_supported()]
    for kwargs in ({"flush_denormal": False}, {"overrides": {"device": "cpu"}}, {}):
        address = None if not kwargs else "head:6379"
        with pytest.raises(Started):
            run("test-denormal-cells", "smoke", tmp_path / "o", executor="ray", address=address,
                log=lambda s: None, **kwargs)  # fmt: skip
    assert asked == ["head:6379"] * 2


@needs_flush
def test_a_flushing_preset_flushes_unless_told_not_to(tmp_path, monkeypatch):
    """A preset of ``FLUSH_PRESETS`` (``deep``; here the test experiment's ``smoke``) runs its
    cells in workers that flush without the flag; ``--no-flush-denormal`` (or
    ``flush_denormal=False``) keeps IEEE arithmetic, in cells cached apart."""
    from depthlab.cli import main
    from depthlab.experiments import runner

    monkeypatch.setattr(runner, "FLUSH_PRESETS", frozenset({"smoke"}))
    size, out = DenormalConfig.size, tmp_path / "out"
    [flushed] = run("test-denormal-cells", "smoke", out, log=lambda s: None)
    assert (flushed.records["denormals"] == 0).all()
    assert flushed.records[runner.FLUSH_KEY].eq(True).all()
    assert flushed.claims[0].setup == runner.FLUSH_NOTE
    assert main(["run", "test-denormal-cells", "--preset", "smoke", "--out", str(out),
                 "--no-flush-denormal"]) == 0  # fmt: skip
    ieee = pd.read_csv(out / "test-denormal-cells" / "records.csv")
    assert (ieee["denormals"] == size).all() and runner.FLUSH_KEY not in ieee
    [again] = run("test-denormal-cells", "smoke", out, log=lambda s: None)
    assert again.cached_cells == len(again.records) and (again.records["denormals"] == 0).all()


@needs_flush
def test_finished_cell_path_finds_an_ieee_or_a_flushed_runs_cell(tmp_path):
    """Tools reading finished runs find a grid cell's cache file whichever arithmetic the run
    used: the IEEE one first, else the flushed one, else None."""
    from depthlab.experiments.runner import FLUSH_KEY, _cell_path, finished_cell_path

    exp = EXPERIMENTS.get("test-denormal-cells")()
    cell = exp.grid(DenormalConfig())[0]
    folder = tmp_path / "out" / exp.name
    assert finished_cell_path(folder, exp, cell) is None
    run("test-denormal-cells", "smoke", tmp_path / "out", flush_denormal=True, log=lambda s: None)
    flushed = _cell_path(folder, exp, {**cell, FLUSH_KEY: True})
    assert finished_cell_path(folder, exp, cell) == flushed and flushed.is_file()
    run("test-denormal-cells", "smoke", tmp_path / "out", flush_denormal=False, log=lambda s: None)
    ieee = finished_cell_path(folder, exp, cell)
    assert ieee == _cell_path(folder, exp, cell) and ieee != flushed and ieee.is_file()
