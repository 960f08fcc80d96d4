"""Data parallelism: torchrun with 2 CPU processes reproduces the single-process loss curve."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch

from depthlab import DepthlabError
from depthlab.train.distributed import DistInfo, shard

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import depthlab as dl


    def main(path):
        torch.set_num_threads(1)
        torch.manual_seed(0)
        model = dl.create_model("mlp", depth=4, width=32, scheme="skipinit",
                                scheme_options={"alpha_init": 0.5})
        cfg = dl.TrainConfig(steps=12, lr=0.05, batch_size=64, eval_every=6, grad_clip=5.0)
        hist = dl.train(model, "digits", cfg)
        if int(os.environ.get("RANK", "0")) == 0:
            rec = {"loss": [r["train_loss"] for r in hist.records if "train_loss" in r],
                   "acc": hist.summary["test_accuracy"], "world": hist.summary["world_size"],
                   "alpha": [b.gate.alpha.item() for b in model.blocks]}
            with open(path, "w") as f:
                json.dump(rec, f)


    if __name__ == "__main__":
        main(sys.argv[1])
    """
)

# a BatchNorm ResNet: with sync_bn (the default) every rank normalizes over the global batch
SCRIPT_BN = textwrap.dedent(
    """
    import json, os, sys
    import torch
    import depthlab as dl


    def main(path):
        torch.set_num_threads(1)
        ranked = "RANK" in os.environ
        if ranked:  # one group for both runs (train() joins it, and leaves it to us)
            torch.distributed.init_process_group("gloo")
        rec = {}
        for sync in (True, False):
            torch.manual_seed(0)
            model = dl.create_model("resnet", depth=8, scheme="batchnorm", in_channels=1)
            cfg = dl.TrainConfig(steps=6, lr=0.05, batch_size=32, eval_every=6, sync_bn=sync)
            hist = dl.train(model, "digits", cfg)
            bn = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d)
                  or type(m).__name__ == "DistributedBatchNorm"]
            rec[str(sync)] = {
                "loss": [r["train_loss"] for r in hist.records if "train_loss" in r],
                "acc": hist.summary["test_accuracy"], "world": hist.summary["world_size"],
                "running_mean": bn[0].running_mean.tolist(),
                "kinds": sorted({type(m).__name__ for m in bn}),
            }
        if int(os.environ.get("RANK", "0")) == 0:
            with open(path, "w") as f:
                json.dump(rec, f)
        if ranked:
            torch.distributed.destroy_process_group()


    if __name__ == "__main__":
        main(sys.argv[1])
    """
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_and_torchrun(tmp_path, monkeypatch, source: str) -> tuple[dict, dict]:
    """``main(path)`` of ``source`` run in this process and under torchrun with 2 processes."""
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    script = tmp_path / "ddp.py"
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    namespace: dict = {"__name__": "in_process"}
    exec(source, namespace)
    namespace["main"](str(tmp_path / "single.json"))  # the single-process run, in this process
    for _attempt in range(2):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1"]
        cmd += ["--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
        ddp = subprocess.run(
            [*cmd, str(script), str(tmp_path / "ddp.json")],
            env=env, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        # Seen once on a heavily loaded machine: a rank aborting at interpreter exit inside the
        # C++ runtime ("terminate called without an active exception") after its work was done.
        # That is a crash of the launcher environment, not a numerical difference: retry once.
        if ddp.returncode == 0 or "terminate called" not in ddp.stderr:
            break
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = json.loads((tmp_path / "single.json").read_text())
    b = json.loads((tmp_path / "ddp.json").read_text())
    return a, b


@pytest.mark.slow
def test_torchrun_two_processes_matches_single_process(tmp_path, monkeypatch):
    a, b = _single_and_torchrun(tmp_path, monkeypatch, SCRIPT)
    assert (a["world"], b["world"]) == (1, 2)
    assert len(a["loss"]) == len(b["loss"]) == 12
    assert a["loss"][-1] < a["loss"][0]  # it trained
    torch.testing.assert_close(torch.tensor(b["loss"]), torch.tensor(a["loss"]), rtol=0, atol=1e-5)
    torch.testing.assert_close(
        torch.tensor(b["alpha"]), torch.tensor(a["alpha"]), rtol=0, atol=1e-5
    )
    assert b["acc"] == pytest.approx(a["acc"], abs=1e-9)


def test_shard_slices_the_global_batch():
    x = torch.arange(12)
    assert torch.equal(shard(x, DistInfo(rank=1, world_size=3)), torch.tensor([4, 5, 6, 7]))
    assert torch.equal(shard(x, DistInfo()), x)
    with pytest.raises(DepthlabError, match="not divisible by the world size 5"):
        shard(x, DistInfo(rank=0, world_size=5))


@pytest.mark.slow
def test_torchrun_batchnorm_syncs_statistics_on_cpu(tmp_path, monkeypatch):
    """A BatchNorm ResNet under torchrun on CPU (gloo): with ``sync_bn`` (DistributedBatchNorm)
    the loss curve, test accuracy and running statistics are the single process's on the whole
    batch; without it each rank normalizes over its half and the curve departs."""
    a, b = _single_and_torchrun(tmp_path, monkeypatch, SCRIPT_BN)
    single, synced, unsynced = a["True"], b["True"], b["False"]
    assert (single["world"], synced["world"]) == (1, 2)
    assert synced["kinds"] == ["DistributedBatchNorm"] and unsynced["kinds"] == ["BatchNorm2d"]
    assert single["loss"][-1] < single["loss"][0]
    torch.testing.assert_close(
        torch.tensor(synced["loss"]), torch.tensor(single["loss"]), rtol=0, atol=1e-5
    )
    torch.testing.assert_close(
        torch.tensor(synced["running_mean"]),
        torch.tensor(single["running_mean"]),
        atol=1e-5,
        rtol=0,
    )
    assert synced["acc"] == pytest.approx(single["acc"], abs=1e-9)
    gap = (torch.tensor(unsynced["loss"]) - torch.tensor(single["loss"])).abs().max()
    assert gap > 1e-3
