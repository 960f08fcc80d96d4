"""The ``deep`` presets hold the papers' depths and settings (the configured values, asserted),
``run all --preset deep`` runs exactly the experiments that have one, and the runner's ETA."""

from __future__ import annotations

import pytest

from depthlab import DepthlabError
from depthlab.experiments import get_experiment
from depthlab.experiments.base import PRESETS
from depthlab.experiments.runner import eta_text, experiments_with, resolve

DEEP = {"deep-fc", "depth-sweep", "fixup-ablation", "transformer-convergence",
        "transformer-jacobian"}  # fmt: skip


def test_deep_is_a_preset_between_quick_and_full_and_all_runs_those_that_have_it():
    assert PRESETS == ("smoke", "quick", "deep", "full")
    assert set(experiments_with("deep")) == DEEP
    assert {e.name for e, _ in resolve("all", "deep", {})} == DEEP
    with pytest.raises(DepthlabError, match="deep"):  # named explicitly: refused, presets listed
        resolve("bn-signal", "deep", {})


def test_deep_fc_is_10000_layers_against_every_control():
    cfg = get_experiment("deep-fc").config("deep")
    assert cfg.depth == 10_000 and len(cfg.seeds) >= 2
    assert set(cfg.schemes) == {"rezero", "frozen", "noskip", "plain", "layernorm"}
    assert cfg.optimizer == "adam" and cfg.lr == 0.001  # the paper's Adam, no warm-up or clipping
    assert cfg.target_loss == pytest.approx(0.230, abs=1e-3)  # ln(10)/10, fixed in advance


def test_depth_sweep_deep_is_fixups_fig3_protocol():
    exp = get_experiment("depth-sweep")
    cfg = exp.config("deep")
    assert cfg.depths == (14, 110, 1004, 10_004)  # ≈ 10, 100, 1,000, 10,000 layers (6n+2)
    assert cfg.lr == 0.1 and cfg.grad_clip == 0 and cfg.weight_decay == 5e-4
    assert cfg.steps * cfg.batch_size <= 1438 < (cfg.steps + 1) * cfg.batch_size  # one epoch
    assert cfg.judge_depths == (1004, 10_004) and len(cfg.seeds) >= 2
    top = [c for c in exp.grid(cfg) if c["depth"] == 10_004]
    arms = {(c["scheme"], c["variant"]) for c in top}
    assert arms == {("batchnorm", "postact"), ("fixup", "postact"), ("frozen", "postact")}
    at_1004 = {c["scheme"] for c in exp.grid(cfg) if c["depth"] == 1004}
    assert at_1004 == {"batchnorm", "skipinit", "fixup", "rezero", "frozen", "plain", "scaled"}
    assert all(c["channels_last"] for c in top)


def test_transformer_deep_parts_are_64_and_128_layers():
    cfg = get_experiment("transformer-convergence").config("deep")
    assert cfg.deep_depths == (64, 128) and cfg.variants == ()
    assert set(cfg.deep_variants) == {"rezero", "postnorm", "postnorm+warmup", "rezero-alpha1"}
    cells = get_experiment("transformer-convergence").grid(cfg)
    assert {c["depth"] for c in cells} == {64, 128} and {c["part"] for c in cells} == {"deep"}
    assert all((c["warmup_steps"] > 0) == (c["variant"] == "postnorm+warmup") for c in cells)
    jac = get_experiment("transformer-jacobian").config("deep")
    assert {"postnorm-64", "postnorm-128", "rezero-64", "rezero-128"} <= set(jac.models)


def test_fixup_ablation_deep_is_at_least_1000_layers_at_two_learning_rates():
    cfg = get_experiment("fixup-ablation").config("deep")
    assert cfg.depth >= 1000 and (cfg.depth - 2) % 6 == 0
    assert cfg.lrs == (0.1, 1.0) and {"fixup", "frozen", "no-rescale"} <= set(cfg.arms)


def test_depth_sweep_refuses_unknown_top_arms_and_judge_depths_not_run():
    exp = get_experiment("depth-sweep")
    with pytest.raises(DepthlabError, match="top_schemes"):
        exp.config("smoke", {"top_schemes": ["fixup:sideways"]})
    with pytest.raises(DepthlabError, match="judge_depths"):
        exp.config("smoke", {"judge_depths": [56]})


def test_eta_from_the_rate_of_the_finished_cells():
    assert eta_text(60.0, 2, 1) == "; ETA 30 s"
    assert eta_text(600.0, 2, 4) == "; ETA 20 min"
    assert eta_text(10.0, 0, 3) == "" and eta_text(10.0, 3, 0) == ""
