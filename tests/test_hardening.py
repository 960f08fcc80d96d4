"""Runs that survive the real world: reproducible seeds, interruptions that keep work, a full
disk, concurrent writers, killed sweeps, absurd losses, and sizes refused before allocation."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import depthlab as dl
from depthlab.cli import main
from depthlab.io import FolderLock
from depthlab.resources import check_fits, estimate
from depthlab.train import checkpoint as ckpt

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["train", "--model", "mlp", "--depth", "3", "--width", "16", "--quiet"]


def _cli(*args: str, **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "depthlab.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        **kw,
    )


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return torch.load(run / ckpt.FILENAME, weights_only=True)["model"]


def _same_weights(a: Path, b: Path) -> bool:
    wa, wb = _weights(a), _weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _wait_for(predicate, timeout: float = 60.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_same_seed_twice_is_bit_identical_in_fresh_processes(tmp_path):
    """Seeded before anything is built: two fresh processes give the same weights and curve
    (dropout included), and a different seed gives a different run."""
    args = [*TINY, "--steps", "6", "--seed", "3", "--set", "dropout=0.2"]
    procs = [_cli(*args, "--out", str(tmp_path / name)) for name in ("a", "b")]
    procs.append(_cli(*TINY, "--steps", "6", "--seed", "4", "--out", str(tmp_path / "c")))
    for p in procs:
        assert p.wait(120) == 0, p.stderr.read()
    assert _metrics(tmp_path / "a") == _metrics(tmp_path / "b")
    assert _same_weights(tmp_path / "a", tmp_path / "b")
    assert not _same_weights(tmp_path / "a", tmp_path / "c")
    # the written config.yaml reproduces the run too
    again = tmp_path / "again"
    assert (
        main(["train", "--config", str(tmp_path / "a" / "config.yaml"), "--out", str(again)]) == 0
    )
    assert _same_weights(tmp_path / "a", again)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_after_a_checkpoint_keeps_it_and_resume_is_bit_identical(tmp_path, sig):
    run = tmp_path / "run"
    p = _cli(*TINY, "--steps", "1000000", "--set", "checkpoint_every=10", "--out", str(run))
    assert _wait_for(lambda: (run / ckpt.FILENAME).is_file() or p.poll() is not None)
    p.send_signal(sig)
    rc = p.wait(120)
    err = p.stderr.read()
    assert rc == (130 if sig == signal.SIGINT else 143), err
    assert "is kept" in err and f"depthlab train --out {run} --resume" in err
    step = json.loads(torch.load(run / ckpt.FILENAME, weights_only=True)["metadata"])["step"]
    assert step >= 10 and step % 10 == 0
    total = str(step + 15)
    assert main(["train", "--out", str(run), "--resume", "--steps", total, "--quiet"]) == 0
    ref = tmp_path / "ref"
    assert main([*TINY, "--steps", total, "--set", "checkpoint_every=10", "--out", str(ref)]) == 0
    assert _same_weights(run, ref)
    assert _metrics(run) == _metrics(ref)


def test_a_run_killed_before_its_first_checkpoint_restarts_with_resume(tmp_path, capsys):
    run = tmp_path / "run"
    p = _cli(*TINY, "--steps", "1000000", "--out", str(run))
    assert _wait_for(lambda: (run / "metrics.jsonl").is_file() or p.poll() is not None)
    p.kill()
    p.wait(60)
    assert not (run / ckpt.FILENAME).exists()
    assert main([*TINY, "--steps", "4", "--out", str(run)]) == 2  # the plain run points to...
    assert "pass --resume to start it again" in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--quiet"]) == 0
    assert "starting it again from step 0" in capsys.readouterr().err
    ref = tmp_path / "ref"
    assert main([*TINY, "--steps", "4", "--out", str(ref)]) == 0
    assert _same_weights(run, ref) and _metrics(run) == _metrics(ref)


def test_a_full_disk_fails_cleanly_and_the_run_resumes_to_the_same_weights(
    tmp_path, capsys, monkeypatch
):
    """The second checkpoint write hits ENOSPC after writing half a file: exit 2 with a clear
    message, the first checkpoint intact, no temporary file left; with space back, --resume
    ends with the weights of an uninterrupted run."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    args = ["--steps", "12", "--set", "checkpoint_every=4"]
    real_save = torch.save
    calls = {"n": 0}

    def full_disk(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            Path(f).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(ckpt.torch, "save", full_disk)
    assert main([*TINY, *args, "--out", str(run)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no space left on the device" in err
    assert "the checkpoint of step 4 is kept" in err and "--resume" in err
    assert json.loads(torch.load(run / ckpt.FILENAME, weights_only=True)["metadata"])["step"] == 4
    assert not list(run.glob(".*.tmp"))
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert main(["train", "--out", str(run), "--resume", "--quiet"]) == 0
    assert main([*TINY, *args, "--out", str(ref)]) == 0
    assert _same_weights(run, ref) and _metrics(run) == _metrics(ref)


def test_stale_temp_files_are_swept_on_the_next_start(tmp_path):
    run = tmp_path / "run"
    assert main([*TINY, "--steps", "2", "--out", str(run)]) == 0
    stale = run / ".checkpoint.pt.x1y2.tmp"
    stale.write_bytes(b"left by a killed write")
    assert main(["train", "--out", str(run), "--resume", "--steps", "3", "--quiet"]) == 0
    assert not stale.exists()
    out = tmp_path / "exp"
    assert main(["run", "path-variance", "--preset", "smoke", "--out", str(out)]) == 0
    stale = out / "path-variance" / "cells" / ".abc.json.q.tmp"
    stale.write_text("{")
    assert main(["run", "path-variance", "--preset", "smoke", "--out", str(out)]) == 0
    assert not stale.exists()


def test_a_second_writer_into_the_same_folder_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    with FolderLock(run, "train"):
        assert main([*TINY, "--steps", "2", "--out", str(run)]) == 2
        assert "in use by another depthlab" in capsys.readouterr().err
        assert main(["run", "path-variance", "--preset", "smoke", "--out", str(run)]) == 2
        assert "in use by another depthlab" in capsys.readouterr().err
    assert [p.name for p in run.iterdir()] == []  # released, nothing written
    assert main([*TINY, "--steps", "2", "--out", str(run)]) == 0  # free again


def test_sigkill_of_a_parallel_sweep_leaves_no_worker_alive(tmp_path):
    """Workers watch their parent: after SIGKILL of ``depthlab run --jobs 2`` none survives."""
    out = tmp_path / "out"
    p = _cli("run", "depth-sweep", "--preset", "smoke", "--jobs", "2", "--out", str(out),
             "--set", "steps=100000", "--set", "depths=[8, 14]")  # fmt: skip

    def children() -> list[int]:
        kids = []
        for d in Path("/proc").iterdir():
            if d.name.isdigit():
                try:
                    stat = (d / "stat").read_text()
                except OSError:
                    continue
                if int(stat.rsplit(")", 1)[1].split()[1]) == p.pid:
                    kids.append(int(d.name))
        return kids

    def workers() -> list[int]:
        kids = children()
        return kids if len(kids) >= 2 else []

    assert _wait_for(lambda: bool(workers()) or p.poll() is not None, 120)
    kids = children()
    assert p.poll() is None and len(kids) >= 2
    p.kill()
    p.wait(30)

    def gone() -> bool:
        return not any(Path(f"/proc/{k}").exists() and _alive(k) for k in kids)

    assert _wait_for(gone, 30), [k for k in kids if _alive(k)]


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_an_overflowing_lr_and_an_absurd_initial_loss_are_divergence_not_crashes(tmp_path):
    run = tmp_path / "lr"
    assert main([*TINY, "--steps", "5", "--lr", "1e300", "--out", str(run)]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["diverged"] is True and summary["diverged_step"] is not None
    # a deep plain MLP's logits are already astronomically large at init (variance 2^depth):
    # never "10x the initial loss", so the absurd-loss rule must catch it at step 0
    net = dl.create_model("mlp", depth=200, width=32, scheme="plain")
    hist = dl.train(net, "digits", dl.TrainConfig(steps=5, lr=0.01))
    assert hist.diverged and hist.diverged_step == 0
    assert hist.records[0]["train_loss"] > 1e6 * torch.log(torch.tensor(10.0)).item()
    # a sane network is not flagged
    ok = dl.train(dl.create_model("mlp", depth=3, width=16), "digits", dl.TrainConfig(steps=3))
    assert not ok.diverged


def test_memory_estimates_refuse_huge_sizes_and_the_limit_can_be_raised(monkeypatch):
    monkeypatch.setenv("DEPTHLAB_MAX_MEMORY", "1")  # 1 GB
    with pytest.raises(dl.DepthlabError, match="would need about .* more than the 1.0 GiB"):
        dl.create_model("mlp", depth=10_000, width=512)
    with pytest.raises(dl.DepthlabError, match="batch of 1,000,000"):
        check_fits("resnet", {"depth": 20}, batch_size=1_000_000)
    monkeypatch.setenv("DEPTHLAB_MAX_MEMORY", "100000")
    assert check_fits("resnet", {"depth": 20}, batch_size=1_000_000) > 2**30
    # the estimate counts what the model really has (within the rounding of biases and norms)
    for name, kw in [
        ("mlp", {"depth": 6, "width": 32, "scheme": "rezero"}),
        ("resnet", {"depth": 20, "scheme": "fixup"}),
        ("transformer-lm", {"depth": 2, "d_model": 32, "nhead": 2, "context": 16}),
    ]:
        real = sum(p.numel() for p in dl.create_model(name, **kw).parameters())
        assert 0.7 < estimate(name, kw).params / real < 1.3, name


def test_python_api_values_are_checked_like_the_cli():
    with pytest.raises(dl.DepthlabError, match="lr must be a finite number"):
        dl.TrainConfig(lr=float("nan"))
    with pytest.raises(dl.DepthlabError, match="compile must be true or false"):
        dl.TrainConfig(compile="yes please")
    with pytest.raises(ValueError, match="depths in experiment 'depth-sweep' must be >"):
        dl.experiments.get_experiment("depth-sweep").config("smoke", {"depths": [0]})
    with pytest.raises(dl.DepthlabError, match="flat in data set 'digits' must be true or false"):
        dl.create_dataset("digits", flat="maybe")


def test_a_cell_cache_file_of_the_wrong_shape_is_recomputed(tmp_path):
    out = tmp_path / "exp"
    assert main(["run", "path-variance", "--preset", "smoke", "--out", str(out)]) == 0
    cells = sorted((out / "path-variance" / "cells").glob("*.json"))
    good = cells[0].read_text()
    cells[0].write_text(json.dumps({"records": "not a list"}))  # valid JSON, wrong shape
    cells[1].write_text(json.dumps([1, 2, 3]))
    assert main(["run", "path-variance", "--preset", "smoke", "--out", str(out)]) == 0
    assert json.loads(cells[0].read_text())["records"] == json.loads(good)["records"]
    assert isinstance(json.loads(cells[1].read_text())["records"], list)
