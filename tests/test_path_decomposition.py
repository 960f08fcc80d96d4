"""dl.path_decomposition: exact sums over paths of a real network, two extraction methods, the
analytic model as a limit, and what it refuses."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from torch import nn

import depthlab as dl
from depthlab.diagnostics.paths import path_summary

pytestmark = pytest.mark.filterwarnings("ignore:TF32 acceleration")


def _bn_linear_mlp(depth: int, width: int = 16, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return dl.create_model(
        "mlp", depth=depth, width=width, in_dim=8, scheme="batchnorm", activation="linear"
    )


def _fixed_scale_mlp(depth: int, width: int, seed: int) -> nn.Module:
    """A linear residual MLP with branch i scaled by 1/√i and no normalization: w_i = 1/i with
    no feedback from the skip path, the analytic model's BN branch weights."""
    torch.manual_seed(seed)
    net = dl.create_model(
        "mlp",
        depth=depth,
        width=width,
        in_dim=width,
        scheme="skipinit",
        activation="linear",
        scheme_options={"learnable": False},
    )
    with torch.no_grad():
        for i, blk in enumerate(dl.residual_blocks(net), 1):
            blk.gate.alpha.fill_(1 / math.sqrt(i))
    return net


def _stream_output(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The residual stream after the last block, from the model's own forward pass (float64,
    training mode: BatchNorm on this batch's statistics)."""
    out = {}
    last = dl.residual_blocks(net)[-1]
    h = last.register_forward_hook(lambda m, i, o: out.__setitem__("y", o.detach()))
    with torch.no_grad():
        net.double().train()(x.double())
    h.remove()
    return out["y"]


def test_coefficients_sum_to_the_networks_output_and_the_methods_agree():
    net = _bn_linear_mlp(depth=12)
    x = torch.randn(32, 8)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    roots = dl.path_decomposition(net, x, method="roots")
    rec = dl.path_decomposition(net, x, max_k=12)
    after = net.state_dict()  # the model itself is untouched (dtype, BN statistics)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert next(net.parameters()).dtype == torch.float32
    y = _stream_output(net, x)
    for df in (roots, rec):
        c = df.attrs["coefficients"]
        assert c.shape == (13, 32, 16) and c.dtype == torch.float64
        torch.testing.assert_close(c.sum(0), y, rtol=0, atol=1e-12)
        assert df.attrs["tail_var"] < 1e-20
    torch.testing.assert_close(
        roots.attrs["coefficients"], rec.attrs["coefficients"], rtol=0, atol=1e-12
    )


def test_coefficients_are_the_sums_over_paths():
    """P_k = Σ over the blocks S with |S| = k of the ordered product of their branch maps."""
    torch.manual_seed(0)
    net = dl.create_model(
        "mlp",
        depth=4,
        width=5,
        in_dim=5,
        scheme="skipinit",
        activation="linear",
        scheme_options={"alpha_init": 0.7},
    )
    x = torch.randn(6, 5, dtype=torch.float64)
    df = dl.path_decomposition(net, x, method="roots")
    h0 = net.double().stem(x)
    maps = [
        blk.gate.alpha.item() * blk.branch[1].weight.double() for blk in dl.residual_blocks(net)
    ]
    for k in range(5):
        total = torch.zeros_like(h0)
        for subset in itertools.combinations(range(4), k):
            h = h0
            for i in subset:
                h = h @ maps[i].T
            total = total + h
        torch.testing.assert_close(df.attrs["coefficients"][k], total, rtol=0, atol=1e-12)


def test_fixed_branch_scale_agrees_with_the_analytic_model_within_its_spread():
    """Independent random branches with w_i = 1/i: the measured shares, the mean path length
    and the absence of cross terms match ``path_variance(d, "batchnorm")`` within the spread
    over seeds (3 standard errors)."""
    depth = 50
    analytic = dl.path_variance(depth, "batchnorm")
    runs = []
    for seed in range(4):
        torch.manual_seed(100 + seed)
        runs.append(
            dl.path_decomposition(
                _fixed_scale_mlp(depth, 128, seed), torch.randn(128, 128), max_k=20
            )
        )
    means = np.array([r.attrs["mean_path_length"] for r in runs])
    target = path_summary(analytic)["mean_path_length"]
    se = max(means.std(ddof=1), 1e-3) / math.sqrt(len(means))
    assert abs(means.mean() - target) < 3 * se + 0.02
    shares = np.stack([r["share"].to_numpy()[:10] for r in runs])
    se_k = np.maximum(shares.std(0, ddof=1), 1e-4) / math.sqrt(len(runs))
    assert np.all(np.abs(shares.mean(0) - analytic["share"].to_numpy()[:10]) < 3 * se_k + 2e-3)
    cross = np.array([r.attrs["cross_share"] for r in runs])
    assert abs(cross.mean()) < 3 * max(cross.std(ddof=1), 1e-3) / math.sqrt(len(cross)) + 0.01


def test_batchnorm_network_has_negative_cross_terms():
    """BN's feedback (each branch normalised by the whole stream, itself the sum of the
    earlier paths) correlates paths of different lengths: the cross terms are negative."""
    runs = [
        dl.path_decomposition(_bn_linear_mlp(200, width=64, seed=s), torch.randn(64, 8), max_k=30)
        for s in range(2)
    ]
    assert all(r.attrs["cross_share"] < -0.1 for r in runs)
    assert all(r["cross"].iloc[1:6].lt(0).all() for r in runs)


def test_net_shares_and_tail_add_up_to_the_output_variance():
    df = dl.path_decomposition(_bn_linear_mlp(40, width=32), torch.randn(64, 8), max_k=6)
    y, c = df.attrs["output"], df.attrs["coefficients"]
    tail = y - c.sum(0)
    yc, tc = y - y.mean(0), tail - tail.mean(0)
    tail_net = float((tc * yc).mean()) / df.attrs["output_var"]
    assert df["net_share"].sum() + tail_net == pytest.approx(1.0, abs=1e-12)
    assert df.attrs["tail_var"] > 0  # truncated at 6 of 40 branches
    assert df["cdf"].iloc[-1] == pytest.approx(1 - df.attrs["tail_share"], abs=1e-12)


def test_nonlinear_networks_need_linearize():
    net = dl.create_model("mlp", depth=6, width=16, in_dim=8, scheme="batchnorm")  # ReLU
    x = torch.randn(32, 8)
    with pytest.raises(dl.DepthlabError, match="linearize=True"):
        dl.path_decomposition(net, x)
    roots = dl.path_decomposition(net, x, linearize=True, method="roots")
    rec = dl.path_decomposition(net, x, linearize=True, max_k=6)
    y = _stream_output(net, x)
    torch.testing.assert_close(roots.attrs["coefficients"].sum(0), y, rtol=0, atol=1e-12)
    torch.testing.assert_close(
        roots.attrs["coefficients"], rec.attrs["coefficients"], rtol=0, atol=1e-12
    )


def test_conv_resnet_with_projection_shortcuts():
    torch.manual_seed(0)
    net = dl.create_model(
        "resnet", depth=8, scheme="batchnorm", activation="linear", variant="preact", in_channels=1
    )
    x = torch.randn(8, 1, 8, 8)
    roots = dl.path_decomposition(net, x, method="roots")
    rec = dl.path_decomposition(net, x)
    torch.testing.assert_close(
        roots.attrs["coefficients"], rec.attrs["coefficients"], rtol=0, atol=1e-12
    )
    torch.testing.assert_close(
        roots.attrs["coefficients"].sum(0), _stream_output(net, x), rtol=0, atol=1e-12
    )


def test_refuses_post_activation_blocks_and_bad_arguments():
    x = torch.randn(4, 3, 8, 8)
    with pytest.raises(dl.DepthlabError, match="after the sum"):
        dl.path_decomposition(dl.create_model("resnet", depth=8, scheme="fixup"), x)
    net = _bn_linear_mlp(4)
    with pytest.raises(dl.DepthlabError, match="method"):
        dl.path_decomposition(net, torch.randn(4, 8), method="fft")
    with pytest.raises(dl.DepthlabError, match="max_k"):
        dl.path_decomposition(net, torch.randn(4, 8), max_k=-1)
