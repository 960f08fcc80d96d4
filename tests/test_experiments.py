"""Every experiment's smoke preset runs, its records carry the documented columns, and the claims
that are robust at small scale hold."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from depthlab.experiments import EXPERIMENTS, get_experiment, list_experiments
from depthlab.experiments.runner import run

REAL = [n for n in list_experiments() if not n.startswith("test-")]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """Run each smoke preset at most once per module (single thread: tiny models)."""
    out = tmp_path_factory.mktemp("smoke")
    cache = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)

    def get(name):
        if name not in cache:
            (cache[name],) = run(name, "smoke", out, log=lambda s: None)
        return cache[name]

    yield get
    torch.set_num_threads(threads)


@pytest.mark.parametrize("name", REAL)
def test_smoke_preset_runs_with_documented_columns(smoke, name):
    r = smoke(name)
    exp = EXPERIMENTS.get(name)
    assert len(r.records) > 0
    missing = set(exp.columns) - set(r.records.columns)
    assert not missing, f"{name} records lack {missing}"
    assert r.claims, f"{name} produced no claim rows"
    assert all(c.verdict in ("reproduced", "partly", "not reproduced") for c in r.claims)
    assert r.figures and all(p.stat().st_size > 1000 for p in r.figures)
    report = (r.out_dir / "report.md").read_text()
    assert report.count("| `" + name + "` |") == len(r.claims)
    assert "| paper's setup | our setup |" in report
    import json

    summary = json.loads((r.out_dir / "summary.json").read_text())
    assert all(c["setup"] and c["paper_setup"] for c in summary["claims"]), name


@pytest.mark.parametrize("name", REAL)
def test_presets_are_complete_and_smoke_is_smallest(name):
    exp = get_experiment(name)
    from depthlab.experiments.runner import experiments_with

    # deep: only the experiments with a depth claim (tests/test_deep_presets.py names them)
    extra = {"deep"} if name in experiments_with("deep") else set()
    assert set(exp.presets) == {"smoke", "quick", "full"} | extra
    assert len(exp.cells(exp.presets["smoke"])) <= len(exp.cells(exp.presets["full"]))
    if extra:
        assert len(exp.cells(exp.presets["smoke"])) <= len(exp.cells(exp.presets["deep"]))


def test_path_variance_shares_match_the_binomial_and_the_bn_claim(smoke):
    df = smoke("path-variance").records
    analytic, measured = df[df["part"] == "analytic"], df[df["part"] == "measured"]
    for (_d, _v), g in analytic.groupby(["depth", "variant"]):
        assert g["share"].sum() == pytest.approx(1.0, abs=1e-9)
    for _, g in measured.groupby(["depth", "variant", "width", "seed"]):  # the tail is the rest
        assert g["share"].sum() + g["tail_share"].iloc[0] == pytest.approx(1.0, abs=1e-9)
    assert set(measured["variant"]) == {"real batchnorm", "real fixed"}
    one = analytic[(analytic["depth"] == 100) & (analytic["variant"] == "alpha=1")]
    # α = 1: Binomial(d, 1/2) — the mode is d/2 and the share at d/2 is C(100,50)/2^100
    assert int(one.loc[one["share"].idxmax(), "path_length"]) == 50
    assert one.set_index("path_length").loc[50, "share"] == pytest.approx(
        math.comb(100, 50) / 2**100, rel=1e-9
    )
    bn = df[(df["depth"] == 1000) & (df["variant"] == "batchnorm")]
    short = bn[bn["path_length"] <= 15]["share"].sum()
    assert short > 0.95  # most variance through short paths (paper: 97% at d = 10,000)
    mean_len = float((bn["path_length"] * bn["share"]).sum())
    assert mean_len == pytest.approx(sum(1 / (i + 1) for i in range(1, 1001)), rel=1e-6)


def test_rezero_loss_below_plain_fc_after_n_steps(smoke):
    df = smoke("fc-convergence").records
    final = df.groupby("scheme")["smoothed_loss"].last()
    assert final["rezero"] < final["noskip"] - 0.3
    assert final["rezero"] < final["plain"]


def test_fold1_has_larger_gradients_yet_trains_worse_than_fold0(smoke):
    df = smoke("degeneracy").records
    tr = df[df["part"] == "train"]
    grad = tr[tr["step"] > 0].groupby("init")["grad_norm"].mean()  # during training
    loss = get_experiment("degeneracy").final_losses(tr)
    assert grad["fold:1"] > grad["fold:0"]
    assert loss["fold:1"] > loss["fold:0"] + 0.05
    assert loss["orthogonal"] < 0.5 * loss["fold:0"]  # orthogonal: smallest gradients, best loss
    assert grad["orthogonal"] < grad["fold:0"]


def test_plain_fails_where_skipinit_trains(smoke):
    df = smoke("depth-sweep").records
    for _, seed in df[df["depth"] == df["depth"].max()].groupby("seed"):
        deep = seed.set_index("scheme")
        assert not deep.loc["skipinit", "diverged"] and deep.loc["skipinit", "test_accuracy"] > 0.6
        plain_failed = deep.loc["plain", "diverged"] or deep.loc["plain", "test_accuracy"] < 0.3
        assert plain_failed
    # the control and the conv ResNet cells are in the records; SkipInit and ReZero differ
    assert "frozen" in set(df["scheme"])


def test_rezero_jacobian_is_the_identity_at_init(smoke):
    df = smoke("transformer-jacobian").records
    rz = df[(df["scheme"] == "rezero") & (df["phase"] == "init")]
    assert np.allclose(rz["singular_value"], 1.0, atol=1e-4)
    pn = df[(df["scheme"] == "postnorm") & (df["phase"] == "init")]
    assert not np.allclose(pn["singular_value"], 1.0, atol=1e-2)


def test_bn_skip_variance_grows_linearly_with_depth(smoke):
    df = smoke("bn-signal").records
    g = df[(df["model"] == "linear-mlp") & (df["seed"] == 0)].sort_values("block")
    slope = np.polyfit(g["block"], g["skip_var"], 1)[0]
    assert 0.5 < slope / g["skip_var"].iloc[0] < 2.0 or 0.5 < slope < 2.0
    assert 0.5 < float(np.median(g["branch_var"])) < 2.0
