"""Degeneracy measures (Orhan & Pitkow 2018, arXiv 1701.09175; Saxe et al. 2013,
arXiv 1312.6120)."""

import numpy as np
import pytest
import torch
from torch import nn

import depthlab as dl
from depthlab.diagnostics import (
    effective_rank,
    layer_maps,
    participation_ratio,
    product_spectrum,
    stable_rank,
)


def test_effective_and_stable_rank_known_values():
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0, rel=1e-12)
    u, v = torch.randn(6, 1), torch.randn(1, 9)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    assert stable_rank(torch.eye(7)) == pytest.approx(7.0)
    assert stable_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    s = np.array([3.0, 1.0])
    p = s / s.sum()
    assert effective_rank(s, singular_values=True) == pytest.approx(np.exp(-(p * np.log(p)).sum()))


def test_fold_one_halves_the_effective_rank():
    torch.manual_seed(0)
    std = dl.create_model("linear", depth=6, width=64, init="standard")
    fold = dl.create_model("linear", depth=6, width=64, init="fold:1")
    r_std = dl.degeneracy(std).query("quantity == 'weight_effective_rank'")["value"].to_numpy()
    r_fold = dl.degeneracy(fold).query("quantity == 'weight_effective_rank'")["value"].to_numpy()
    assert (r_fold <= 32 + 1e-6).all()  # rank n/2 bounds the effective rank
    assert 0.45 <= (r_fold / r_std).mean() <= 0.65


def test_products_of_linear_network_and_skip_connections():
    torch.manual_seed(0)
    model = dl.create_model("linear", depth=10, width=16, scheme="plain").double()
    x = torch.randn(3, 16, dtype=torch.float64)
    prod = torch.eye(16, dtype=torch.float64)
    for m in layer_maps(model):  # M_i = I + W_i
        prod = m @ prod
    torch.testing.assert_close(model(x).detach(), x @ prod.T)
    df = dl.degeneracy(model, ks=[1, 5, 10])
    top = df.query("quantity == 'product_max_sv'").set_index("layer")["value"]
    assert top[10] == pytest.approx(float(torch.linalg.matrix_norm(prod, 2)), rel=1e-10)
    orth = dl.create_model("linear", depth=30, width=16, init="orthogonal")
    eff = dl.degeneracy(orth).query("quantity == 'product_effective_rank'")["value"]
    np.testing.assert_allclose(eff, 16.0, rtol=1e-4)  # orthogonal products stay isometric


def test_product_spectrum_spreads_with_depth():
    df = product_spectrum([1, 10, 50], width=40, init="standard")
    spread = df.groupby("num_matrices")["singular_value"].agg(lambda s: np.log(s).std())
    assert spread[1] < spread[10] < spread[50]
    orth = product_spectrum([1, 50], width=20, init="orthogonal")
    np.testing.assert_allclose(orth["singular_value"], 1.0, atol=1e-4)
    assert len(orth) == 40 and set(orth["num_matrices"]) == {1, 50}


def test_participation_ratio_and_dead_relus():
    a = torch.tensor([1.0, 0.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0, 0.0])
    h = torch.stack([a, -a, b, -b])  # two equal directions of variance
    assert participation_ratio(h) == pytest.approx(2.0, rel=1e-12)
    lin = nn.Linear(4, 8)
    with torch.no_grad():
        lin.bias[:6] = -100.0  # 6 of 8 units never fire
        lin.bias[6:] = 100.0
    model = nn.Sequential(lin, nn.ReLU())
    df = dl.degeneracy(model, torch.randn(16, 4))
    dead = df.query("quantity == 'dead_relu_share'")
    assert list(dead["layer"]) == [1] and dead["value"].iloc[0] == pytest.approx(0.75)


def test_activation_records_for_residual_model():
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=4, width=16, scheme="plain")
    df = dl.degeneracy(model, torch.randn(64, 64))
    pr = df.query("quantity == 'participation_ratio'")
    assert list(pr["layer"]) == [1, 2, 3, 4]
    assert ((pr["value"] >= 1) & (pr["value"] <= 16)).all()
    assert len(df.query("quantity == 'dead_relu_share'")) == 5  # 4 blocks + head
