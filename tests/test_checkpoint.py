"""Checkpoints: kill -9 mid-run and resume gives bit-identical weights; bad files are refused."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import depthlab as dl
from depthlab import DepthlabError, TrainConfig
from depthlab.train import checkpoint as ckpt

SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    import torch
    import depthlab as dl


    def main(out, kill_at, resume):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = dl.create_model("mlp", depth=4, width=32, scheme="skipinit",
                                scheme_options={"alpha_init": 0.3})
        # dropout (torch RNG), momentum (optimizer state), cosine (schedule), mixup (data streams)
        cfg = dl.TrainConfig(steps=12, lr=0.05, batch_size=64, eval_every=1, checkpoint_every=4,
                             dropout=0.2, schedule="cosine", warmup_steps=2, mixup=0.2,
                             weight_decay=1e-3)

        def killer(step, model, hist):
            if step == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

        dl.train(model, "digits", cfg, out_dir=out, callbacks=[killer], resume=resume)


    if __name__ == "__main__":
        main(sys.argv[1], int(sys.argv[2]), sys.argv[3] == "1")
    """
)


pytestmark = pytest.mark.usefixtures("one_thread")


def _run(script, out, kill_at, resume):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return subprocess.run(
        [sys.executable, str(script), str(out), str(kill_at), "1" if resume else "0"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.slow
def test_sigkill_and_resume_is_bit_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT)
    full, cut = tmp_path / "full", tmp_path / "cut"
    namespace: dict = {"__name__": "in_process"}
    exec(SCRIPT, namespace)
    namespace["main"](str(full), -1, False)  # the uninterrupted run, in this process
    r = _run(script, cut, 6, False)  # killed after update 7; last checkpoint after 4
    assert r.returncode == -signal.SIGKILL
    meta = ckpt.load_checkpoint(cut / ckpt.FILENAME)["metadata"]
    assert meta["step"] == 4 and not (cut / "summary.json").exists()
    r = _run(script, cut, -1, True)
    assert r.returncode == 0, r.stderr
    a = ckpt.load_checkpoint(full / ckpt.FILENAME)
    b = ckpt.load_checkpoint(cut / ckpt.FILENAME)
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["metadata"]["step"] == b["metadata"]["step"] == 12
    assert a["metadata"]["records"] == b["metadata"]["records"]  # same losses, no duplicates
    lines_a = (full / "metrics.jsonl").read_text().splitlines()
    lines_b = (cut / "metrics.jsonl").read_text().splitlines()
    assert len(lines_a) == len(lines_b) == 13


def test_rng_states_round_trip():
    torch.manual_seed(3)
    np.random.seed(3)  # noqa: NPY002
    state = ckpt.rng_state()
    a = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    ckpt.set_rng_state(state)
    b = (torch.rand(3), np.random.rand(3), random.random())  # noqa: NPY002
    assert torch.equal(a[0], b[0]) and np.array_equal(a[1], b[1]) and a[2] == b[2]


def _small_run(out):
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=2, width=16)
    dl.train(model, "digits", TrainConfig(steps=3), out_dir=out)
    return model


def test_corrupt_foreign_and_mismatched_checkpoints_are_refused(tmp_path):
    out = tmp_path / "run"
    model = _small_run(out)
    path = out / ckpt.FILENAME
    # resuming a finished run adds nothing and keeps the records
    hist = dl.train(model, "digits", TrainConfig(steps=3), out_dir=out, resume=True)
    assert [r["step"] for r in hist.records] == [0, 1, 2, 3]
    other = dl.create_model("mlp", depth=3, width=16)
    with pytest.raises(DepthlabError, match="different model .*depth"):
        dl.train(other, "digits", TrainConfig(steps=3), out_dir=out, resume=True)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DepthlabError, match="corrupt or not a depthlab checkpoint"):
        ckpt.load_checkpoint(path)
    torch.save({"state_dict": {"w": torch.zeros(2)}}, path)  # someone else's file
    with pytest.raises(DepthlabError, match="corrupt or not a depthlab checkpoint"):
        ckpt.load_checkpoint(path)
    torch.save({"metadata": '{"format": "other"}'}, path)
    with pytest.raises(DepthlabError, match="not a depthlab checkpoint"):
        ckpt.load_checkpoint(path)
    with pytest.raises(DepthlabError, match="no checkpoint"):
        ckpt.load_checkpoint(tmp_path / "none.pt")


def test_checkpoint_file_loads_with_weights_only(tmp_path):
    _small_run(tmp_path)
    payload = torch.load(tmp_path / ckpt.FILENAME, weights_only=True)
    assert set(payload) == {"metadata", "model", "optimizer", "rng"}
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file
