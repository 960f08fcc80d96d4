"""``depthlab run --executor ray`` against a real Ray head node on this machine (marker ``ray``:
``make test-ray``; skipped without the ``ray`` extra): records identical to the local executor's,
a killed worker retried, a killed driver resumed from the cell cache, a raising cell reported
while the others finish."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

ray = pytest.importorskip("ray")

import ray_cells  # noqa: E402,F401 - registers test-ray-faults (the workers import it too)
from depthlab.cli import main  # noqa: E402
from depthlab.experiments.runner import run  # noqa: E402
from ray_head import head  # noqa: E402

pytestmark = pytest.mark.ray
HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A real head node bound to 127.0.0.1 with 2 CPUs (:func:`ray_head.head`)."""
    with head(tmp_path_factory.mktemp("ray")) as address:
        yield address


def _markers(log: Path) -> dict[int, int]:
    """Runs per cell index, from the marker files."""
    out: dict[int, int] = {}
    for p in log.glob("*.run"):
        i = int(p.name.split(".")[0])
        out[i] = out.get(i, 0) + 1
    return out


def _frame(out: Path, name: str) -> pd.DataFrame:
    df = pd.read_csv(out / name / "records.csv")
    return df.drop(columns=[c for c in df.columns if c == "node" or "time" in c])


def test_records_equal_the_local_executors(cluster, tmp_path):
    names = ["nonlinear-degeneracy", "bn-signal"]
    local = run(names, "smoke", tmp_path / "local", jobs=2, log=lambda s: None)
    remote = run(names, "smoke", tmp_path / "ray", executor="ray", address=cluster,
                 log=lambda s: None)  # fmt: skip
    assert [r.error for r in remote] == [None, None]
    for name in names:
        pd.testing.assert_frame_equal(
            _frame(tmp_path / "local", name), _frame(tmp_path / "ray", name)
        )
    assert (tmp_path / "ray" / "report.md").is_file()
    nodes = set(pd.read_csv(tmp_path / "ray" / names[0] / "records.csv")["node"])
    assert nodes == {socket.gethostname()}
    assert [c.verdict for r in remote for c in r.claims] == [
        c.verdict for r in local for c in r.claims
    ]


def test_a_killed_worker_is_retried(cluster, tmp_path):
    log = tmp_path / "log"
    log.mkdir()
    victim = log / "victim.pid"

    def kill_when_ready() -> None:
        for _ in range(600):
            if victim.exists() and victim.read_text():
                time.sleep(0.3)
                os.kill(int(victim.read_text()), signal.SIGKILL)
                return
            time.sleep(0.1)

    killer = threading.Thread(target=kill_when_ready, daemon=True)
    killer.start()
    (r,) = run("test-ray-faults", "smoke", tmp_path / "out",
               {"log": str(log), "n": 4, "victim": 2, "sleep": 0.2},
               executor="ray", address=cluster, log=lambda s: None)  # fmt: skip
    killer.join(timeout=5)
    assert r.error is None and sorted(r.records["i"]) == [0, 1, 2, 3]
    runs = _markers(log)
    assert runs[2] == 2 and all(runs[i] == 1 for i in (0, 1, 3))  # the victim ran twice


def test_a_killed_driver_resumes_with_only_the_missing_cells(cluster, tmp_path):
    log, out = tmp_path / "log", tmp_path / "out"
    log.mkdir()
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(HERE)!r})
        import ray_cells
        from depthlab.experiments.runner import run
        run("test-ray-faults", "smoke", {str(out)!r}, {{"log": {str(log)!r}, "n": 10,
            "sleep": 1.0}}, executor="ray", address={cluster!r}, log=lambda s: None)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    cells = out / "test-ray-faults" / "cells"
    try:
        for _ in range(1200):
            if len(list(cells.glob("*.json"))) >= 3:
                break
            time.sleep(0.1)
    finally:
        proc.kill()
        proc.wait()
    time.sleep(2)  # the dead driver's tasks are torn down by Ray
    cached = {p.name for p in cells.glob("*.json")}
    assert 3 <= len(cached) < 10
    before = set(log.glob("*.run"))
    (r,) = run("test-ray-faults", "smoke", out, {"log": str(log), "n": 10, "sleep": 1.0},
               executor="ray", address=cluster, log=lambda s: None)  # fmt: skip
    assert r.error is None and r.cached_cells == len(cached) and len(r.records) == 10
    again = {int(p.name.split(".")[0]) for p in set(log.glob("*.run")) - before}
    assert len(again) == 10 - len(cached)  # only the missing cells ran


def test_a_raising_cell_is_named_and_the_others_finish(cluster, tmp_path, capsys):
    log, out = tmp_path / "log", tmp_path / "out"
    log.mkdir()
    code = main(["run", "test-ray-faults", "--preset", "smoke", "--out", str(out),
                 "--executor", "ray", "--address", cluster, "--set", f"log={log}",
                 "--set", "fails=1", "--set", "n=4"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 1
    assert "i=1" in err and "breaks on purpose" in err and "test-ray-faults" in err
    assert sorted(_markers(log)) == [0, 1, 2, 3]
    assert len(list((out / "test-ray-faults" / "cells").glob("*.json"))) == 3  # the others


def test_ray_workers_flush_when_the_sweep_does_and_start_with_huge_pages(cluster, tmp_path):
    """A flushed sweep's Ray workers flush denormals on the task's threads (set up before their
    first torch operation), an IEEE sweep's do not, and both start with glibc's huge-page
    tunable for malloc where the driver would give it to local workers."""
    from depthlab.experiments.runner import FLUSH_KEY, FLUSH_NOTE
    from depthlab.heap import TUNABLES_VAR, worker_environment

    size = 1 << 20
    (flushed,) = run("test-ray-env", "smoke", tmp_path / "flush", executor="ray",
                     address=cluster, flush_denormal=True, log=lambda s: None)  # fmt: skip
    assert flushed.error is None and (flushed.records["denormals"] == 0).all()
    assert flushed.records[FLUSH_KEY].eq(True).all() and flushed.claims[0].setup.endswith(
        FLUSH_NOTE
    )
    (ieee,) = run("test-ray-env", "smoke", tmp_path / "ieee", executor="ray", address=cluster,
                  log=lambda s: None)  # fmt: skip
    assert ieee.error is None and (ieee.records["denormals"] == size).all()
    want = worker_environment().get(TUNABLES_VAR) or ""
    for r in (flushed, ieee):
        assert r.records["tunables"].fillna("").eq(want).all()


def test_the_deep_default_on_a_cpu_cluster_flushes(cluster, tmp_path, monkeypatch):
    """With ``--address``, the ``deep`` default (here the test experiment's ``smoke``) asks the
    cluster for GPUs, not this machine: a CPU-only cluster runs the cells flushed even where
    the driver's machine has CUDA."""
    import torch

    from depthlab.experiments import runner
    from depthlab.experiments.ray_executor import cluster_gpus

    assert cluster_gpus(cluster) == 0
    monkeypatch.setattr(runner, "FLUSH_PRESETS", frozenset({"smoke"}))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # the driver's machine
    (res,) = run("test-ray-env", "smoke", tmp_path / "out", executor="ray", address=cluster,
                 log=lambda s: None)  # fmt: skip
    assert res.error is None and (res.records["denormals"] == 0).all()
    assert res.records[runner.FLUSH_KEY].eq(True).all()
