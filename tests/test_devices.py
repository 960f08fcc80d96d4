"""The ``device`` setting of experiments: it reaches every training cell's model and batches,
and a device the machine lacks is refused before anything runs."""

from __future__ import annotations

import importlib

import pytest
import torch

import depthlab as dl
from depthlab.experiments import get_experiment

TRAINING = ("depth-sweep", "deep-fc", "batch-size", "fc-convergence", "transformer-convergence",
            "transformer-jacobian", "degeneracy")  # fmt: skip


@pytest.mark.parametrize("name", TRAINING)
def test_every_cell_carries_the_device(name):
    exp = get_experiment(name)
    assert exp.presets["quick"].device == "auto"  # CUDA when present
    cells = exp.grid(exp.config("smoke", {"device": "cpu"}))
    assert cells and all(c["device"] == "cpu" for c in cells)


@pytest.mark.parametrize("name", ["depth-sweep", "degeneracy", "transformer-jacobian"])
def test_the_device_reaches_the_model_and_the_batches(name, monkeypatch):
    """A spy on ``depthlab.train`` sees the cell's device in the TrainConfig, and the model's
    parameters and every batch the model sees are on it."""
    dt = importlib.import_module("depthlab.train")  # the package (dl.train is the function)
    seen, batches = [], []
    real = dt.train

    def spy(model, data, cfg, **kw):
        seen.append(cfg.device)
        hook = model.register_forward_pre_hook(lambda m, inp: batches.append(inp[0].device))
        try:
            return real(model, data, cfg, **kw)
        finally:
            hook.remove()

    monkeypatch.setattr(dt, "train", spy)
    exp = get_experiment(name)
    cell = exp.grid(exp.config("smoke", {"device": "cpu"}))[0]
    assert exp.run_cell(dict(cell))
    assert seen and set(seen) == {"cpu"}
    assert batches and {d.type for d in batches} == {"cpu"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_missing_device_is_refused_before_anything_runs(tmp_path):
    exp = get_experiment("depth-sweep")
    with pytest.raises(dl.DepthlabError, match="CUDA is not available"):
        exp.config("smoke", {"device": "cuda"})
    with pytest.raises(dl.DepthlabError, match="not on this machine|CUDA is not available"):
        exp.config("smoke", {"device": "cuda:3"})
    with pytest.raises(dl.DepthlabError, match="unknown device"):
        exp.config("smoke", {"device": "tpu"})
    with pytest.raises(dl.DepthlabError):
        dl.run_experiments(["depth-sweep"], preset="smoke", out=tmp_path / "o",
                           overrides={"device": "cuda"})  # fmt: skip
    assert not (tmp_path / "o").exists()
