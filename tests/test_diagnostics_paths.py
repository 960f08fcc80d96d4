"""Path variance (De & Smith 2020, arXiv 2002.10444, Fig. 3): exact Poisson-binomial shares."""

import itertools
import math
import time

import numpy as np
import pandas as pd
import pytest

import depthlab as dl
from depthlab.diagnostics import path_summary, path_variance_monte_carlo, poisson_binomial_pmf
from depthlab.diagnostics.paths import branch_weights


def share_le(df, k):
    return float(df.loc[df.path_length <= k, "share"].sum())


def test_batchnorm_10k_matches_paper_and_monte_carlo():
    df = dl.path_variance(10_000, "batchnorm")
    assert 0.96 <= share_le(df, 15) <= 0.99
    assert share_le(df, 15) == pytest.approx(0.98527, abs=1e-4)
    assert share_le(df, 14) == pytest.approx(0.97020, abs=1e-4)  # the paper's "97%"
    mc = path_variance_monte_carlo(10_000, "batchnorm", samples=5_000, seed=1)
    assert abs(share_le(mc, 15) - share_le(df, 15)) < 0.01
    assert abs(path_summary(mc)["mean_path_length"] - path_summary(df)["mean_path_length"]) < 0.15


def test_brute_force_subset_sum_small_depth():
    """share_k = Σ_{|S|=k} Π_{i∈S} w_i / Π(1+w_i), enumerated over all 2^d paths."""
    for scheme, alpha in [("batchnorm", None), ("batchnorm", 2.0), ("plain", 0.7)]:
        d = 10
        w = branch_weights(d, scheme, alpha)
        expect = np.zeros(d + 1)
        for bits in itertools.product([0, 1], repeat=d):
            expect[sum(bits)] += np.prod([w[i] for i in range(d) if bits[i]])
        expect /= np.prod(1 + w)
        got = dl.path_variance(d, scheme, alpha)["share"].to_numpy()
        np.testing.assert_allclose(got, expect[: len(got)], rtol=1e-12, atol=1e-15)


def test_log_space_dp_matches_row_dp():
    p = 900 / (np.arange(1, 2001) + 900.0)  # batchnorm alpha=30: Q_d underflows -> log space
    ref = np.zeros(2001)
    ref[0] = 1.0
    for pi in p:
        ref[1:] = ref[1:] * (1 - pi) + ref[:-1] * pi
        ref[0] *= 1 - pi
    got = poisson_binomial_pmf(p)
    np.testing.assert_allclose(got, ref[: len(got)], rtol=1e-9, atol=1e-300)
    assert got.sum() == pytest.approx(1.0, abs=1e-9)


@pytest.mark.parametrize("depth", [1, 7, 1001])
def test_plain_and_scaled_mean_is_half_depth(depth):
    for scheme in ("plain", "scaled", "postnorm"):
        s = path_summary(dl.path_variance(depth, scheme))
        assert s["mean_path_length"] == pytest.approx(depth / 2, rel=1e-9)


@pytest.mark.parametrize(
    "scheme,alpha",
    [
        ("batchnorm", None),
        ("plain", None),
        ("skipinit", None),
        ("rezero", 0.3),
        ("layernorm", 0.5),
        ("fixup", None),
        ("noskip", None),
    ],
)
def test_shares_sum_to_one(scheme, alpha):
    df = dl.path_variance(3000, scheme, alpha)
    assert df["share"].sum() == pytest.approx(1.0, abs=1e-9)
    assert df["cdf"].iloc[-1] == pytest.approx(1.0, abs=1e-9)
    assert (df["share"] >= 0).all()


def test_skipinit_is_shallow_and_extremes():
    d = 400
    s = path_summary(dl.path_variance(d, "skipinit"))  # alpha = 1/sqrt(d): p = 1/(d+1)
    assert s["mean_path_length"] == pytest.approx(d / (d + 1), rel=1e-9)
    assert dl.path_variance(d, "rezero")["share"].iloc[0] == 1.0  # alpha 0: only the skip path
    noskip = dl.path_variance(d, "noskip")
    assert noskip["share"].iloc[d] == 1.0 and noskip["share"].iloc[:d].sum() == 0.0


def test_depth_million_under_a_second():
    t = time.process_time()
    df = dl.path_variance(1_000_000, "batchnorm")
    assert time.process_time() - t < 1.0
    mean = path_summary(df)["mean_path_length"]
    assert mean == pytest.approx(sum(1 / (i + 1) for i in range(1, 1_000_001)), rel=1e-9)
    t = time.process_time()
    dl.path_variance(1_000_000, "plain")
    assert time.process_time() - t < 1.0


def test_bad_input():
    with pytest.raises(dl.DepthlabError, match="choose one of"):
        dl.path_variance(10, "batchnrom")
    with pytest.raises(dl.DepthlabError, match="no alpha"):
        dl.path_variance(10, "scaled", alpha=0.5)
    with pytest.raises(dl.DepthlabError, match="positive integer"):
        dl.path_variance(0)
    with pytest.raises(dl.DepthlabError, match="alpha"):
        dl.path_variance(10, "skipinit", alpha="one")
    assert math.isclose(dl.path_variance(100, "skipinit", "1/sqrt(d)")["share"].sum(), 1.0)


def test_the_path_law_comes_from_the_scheme_not_its_name():
    """The same blocks give the same path law whichever name built them: ``layernorm`` with
    ``placement="post"`` is Post-LN; a scheme instance's own α is used."""
    post = dl.path_variance(64, dl.get_scheme("layernorm", placement="post"))
    pd.testing.assert_frame_equal(post, dl.path_variance(64, "postnorm"))
    pd.testing.assert_frame_equal(
        dl.path_variance(64, dl.get_scheme("layernorm")), dl.path_variance(64, "prenorm")
    )
    gated = dl.path_variance(64, dl.get_scheme("skipinit", alpha_init=0.5))
    pd.testing.assert_frame_equal(gated, dl.path_variance(64, "skipinit", alpha=0.5))
    with pytest.raises(dl.DepthlabError, match="no analytic path model"):
        dl.path_variance(64, "deepnorm")
    with pytest.raises(dl.DepthlabError, match="placement"):
        dl.get_scheme("postnorm", placement="pre")


def test_diagnose_paths_is_the_same_for_postnorm_and_layernorm_post(capsys):
    from depthlab.cli import main

    lines = []
    for argv in (["--scheme", "postnorm"],
                 ["--scheme", "layernorm", "--set", "scheme_options.placement=post"]):  # fmt: skip
        assert main(["diagnose", "--model", "mlp", "--depth", "32", "--what", "paths", *argv]) == 0
        out = capsys.readouterr().out
        lines.append(next(x for x in out.splitlines() if x.startswith("paths (")))
    assert lines[0].split(":", 1)[1] == lines[1].split(":", 1)[1]  # the same figures
