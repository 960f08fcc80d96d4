"""TensorBoard events carry what a user of this library opens TensorBoard for: nested loss tags,
throughput, every gate α and Fixup's scalars over time, and periodic per-block diagnostics —
read back with tensorboard's EventAccumulator."""

from __future__ import annotations

import pytest
import torch

import depthlab as dl

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import (  # noqa: E402
    EventAccumulator,
)


def _events(folder):
    acc = EventAccumulator(str(folder / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    return acc


def test_gates_throughput_and_diagnostics_are_logged(tmp_path):
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=4, width=16, scheme="rezero")
    cfg = dl.TrainConfig(steps=6, lr=0.05, optimizer="adam", batch_size=32, eval_every=3,
                         diagnose_every=2)  # fmt: skip
    dl.train(model, "digits", cfg, out_dir=tmp_path)
    acc = _events(tmp_path)
    scalars, hists = set(acc.Tags()["scalars"]), set(acc.Tags()["histograms"])
    assert {"train/loss", "train/accuracy", "train/lr", "train/examples_per_s", "test/loss",
            "test/accuracy"} <= scalars  # fmt: skip
    assert {f"gates/alpha/{i:03d}" for i in range(4)} <= scalars
    assert "gates/alpha" in hists and "gates/alpha_mean_abs" in scalars
    final = {e.step: e.value for e in acc.Scalars("gates/alpha/002")}
    assert final[6] == pytest.approx(float(model.blocks[2].gate.alpha.detach()), abs=1e-6)
    assert final[0] == 0.0 and final[6] != 0.0  # α leaves 0 as the net trains
    assert {"diagnostics/block_out_var", "diagnostics/block_grad_norm"} <= hists
    steps = [e.step for e in acc.Scalars("diagnostics/block_grad_norm_last")]
    assert steps == [0, 2, 4]
    assert all(e.value > 0 for e in acc.Scalars("train/examples_per_s"))


def test_fixup_scalars_are_logged_apart_from_gates(tmp_path):
    torch.manual_seed(0)
    model = dl.create_model("resnet", depth=8, scheme="fixup", in_channels=1)
    dl.train(model, "digits", dl.TrainConfig(steps=2, batch_size=16, lr=0.01), out_dir=tmp_path)
    acc = _events(tmp_path)
    hists = set(acc.Tags()["histograms"])
    assert {"scalars/bias", "scalars/multiplier"} <= hists and "gates/alpha" not in hists
    n_bias = sum(isinstance(m, dl.nn.Bias) for m in model.modules())
    assert {f"scalars/bias/{i:03d}" for i in range(n_bias)} <= set(acc.Tags()["scalars"])
