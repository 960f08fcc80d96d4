"""Criticality, the hard-tanh and sigmoid units, and the nonlinear-degeneracy experiment's
measurements: the critical point solves the mean-field equations, orthogonal hard-tanh nets at
criticality are isometric at depths 10 and 100 while ReLU nets spread, and the folding map's
closed-form Jacobian is the map's derivative."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import integrate

import depthlab as dl
from depthlab.diagnostics.criticality import critical_point, jjt_moments
from depthlab.experiments.nonlinear_degeneracy import _spectrum, fold_trace
from depthlab.registry import DepthlabError


def _gauss(f, q):
    """E[f(√q z)] by adaptive quadrature, independent of the module's Gauss–Hermite rule."""
    pts = [-1 / math.sqrt(q), 0.0, 1 / math.sqrt(q)]
    val, _ = integrate.quad(
        lambda z: f(math.sqrt(q) * z) * math.exp(-z * z / 2) / math.sqrt(2 * math.pi),
        -12, 12, points=pts, limit=200,
    )  # fmt: skip
    return val


PHI = {
    "relu": (lambda h: max(h, 0.0), lambda h: float(h > 0)),
    "linear": (lambda h: h, lambda h: 1.0),
    "hardtanh": (lambda h: min(max(h, -1.0), 1.0), lambda h: float(abs(h) < 1)),
    "tanh": (math.tanh, lambda h: 1 - math.tanh(h) ** 2),
}


@pytest.mark.parametrize("act", sorted(PHI))
@pytest.mark.parametrize("q_star", [1 / 64, 0.5])
def test_critical_point_solves_the_mean_field_equations(act, q_star):
    """χ = σ_w² E[φ'²] = 1 and q* = σ_w² E[φ²] + σ_b² at the returned (σ_w, σ_b)."""
    sw, sb = critical_point(act, q_star)
    phi, dphi = PHI[act]
    assert sw**2 * _gauss(lambda h: dphi(h) ** 2, q_star) == pytest.approx(1.0, rel=1e-6)
    assert sw**2 * _gauss(lambda h: phi(h) ** 2, q_star) + sb**2 == pytest.approx(q_star, rel=1e-6)


def test_critical_points_of_relu_and_linear_are_the_known_ones():
    assert critical_point("relu", 0.3) == pytest.approx((math.sqrt(2), 0.0))
    assert critical_point("linear", 2.0) == pytest.approx((1.0, 0.0))


@pytest.mark.parametrize(
    "args,match",
    [(("sigmoid", 1 / 64), "no critical point"), (("softplus", 0.1), "softplus"),
     (("relu", 0.0), "q_star"), (("relu", math.nan), "q_star")],
)  # fmt: skip
def test_critical_point_refuses_what_has_none(args, match):
    with pytest.raises(DepthlabError, match=match):
        critical_point(*args)


def test_jjt_moments_are_those_of_the_squared_singular_values():
    s = np.array([2.0, 1.0, 0.0, 1.0])
    lam = s**2
    assert jjt_moments(s) == pytest.approx((lam.mean(), lam.var()))
    assert jjt_moments(torch.tensor(s)) == pytest.approx((1.5, np.var([4, 1, 0, 1])))
    with pytest.raises(DepthlabError):
        jjt_moments([])


@pytest.mark.parametrize("act,ref", [("hardtanh", torch.nn.functional.hardtanh),
                                     ("sigmoid", torch.sigmoid)])  # fmt: skip
def test_new_activations_compute_what_they_name(act, ref):
    """A no-skip MLP block is ``W σ(x) + b`` with σ the named unit; gradients flow."""
    torch.manual_seed(0)
    m = dl.create_model("mlp", depth=3, width=8, in_dim=8, scheme="noskip", activation=act)
    x = (torch.randn(5, 8) * 2).requires_grad_()
    (lin,) = [mod for mod in m.blocks[0].modules() if isinstance(mod, torch.nn.Linear)]
    want = ref(x) @ lin.weight.T + (lin.bias if lin.bias is not None else 0)
    torch.testing.assert_close(m.blocks[0](x), want)
    m(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert m.init_gain == 1.0


def test_resnet_builds_with_the_new_units():
    m = dl.create_model("resnet", depth=8, scheme="skipinit", activation="hardtanh", in_channels=1)
    assert any(isinstance(mod, torch.nn.Hardtanh) for mod in m.modules())
    assert m(torch.randn(2, 1, 8, 8)).shape == (2, 10)


def _cell(act, init, depths, seed=0, examples=4):
    return {"activation": act, "init": init, "seed": seed, "depth": max(depths),
            "depths": ",".join(map(str, depths)), "width": 64, "examples": examples,
            "q_star": 1 / 64}  # fmt: skip


def test_orthogonal_hardtanh_is_isometric_at_depths_10_and_100():
    """Pennington et al. 2017: at criticality (q* = 1/64) every singular value of J stays at 1."""
    for rec in _spectrum(_cell("hardtanh", "orthogonal", (10, 100))):
        assert rec["jjt_mean"] == pytest.approx(1.0, abs=1e-3), rec
        assert rec["jjt_var"] < 1e-3 and rec["jjt_nvar"] < 1e-3, rec


@pytest.mark.parametrize("seed", [0, 1])
def test_relu_and_gaussian_spectra_spread_with_depth(seed):
    """Orthogonal ReLU at criticality: the spread of J Jᵀ's eigenvalues (var/mean², the paper's
    variance at mean 1) grows from 10 to 100 layers, about ∝ depth; Gaussian hard-tanh spreads
    where orthogonal does not."""
    recs = _spectrum(_cell("relu", "orthogonal", (10, 100), seed))
    relu = {r["depth"]: r["jjt_nvar"] for r in recs}
    assert relu[100] > 3 * relu[10] > 3.0
    gauss = _spectrum(_cell("hardtanh", "gaussian", (100,), seed))[0]
    assert gauss["jjt_nvar"] > 10.0


@pytest.mark.parametrize("skip", [False, True])
def test_fold_jacobian_is_the_derivative_of_the_map(skip):
    """The closed-form accumulated Jacobian equals central finite differences of the same random
    map (same seed), at every layer."""
    torch.manual_seed(0)
    x0 = torch.rand(7, 2, dtype=torch.float64) * 2 - 1
    eps = 1e-6
    base = list(fold_trace(x0, 3, 16, 6, skip))
    for i in range(2):
        e = torch.zeros(2, dtype=torch.float64)
        e[i] = eps
        plus = list(fold_trace(x0 + e, 3, 16, 6, skip))
        minus = list(fold_trace(x0 - e, 3, 16, 6, skip))
        for (_, _, jac), (_, xp, _), (_, xm, _) in zip(base, plus, minus, strict=True):
            torch.testing.assert_close(jac[:, :, i], (xp - xm) / (2 * eps), rtol=1e-5, atol=1e-7)


def test_no_skip_fold_collapses_to_rank_one():
    """Deep no-skip GP compositions: the 2×2 Jacobian's s₂/s₁ falls by orders of magnitude."""
    x0 = torch.rand(50, 2, dtype=torch.float64) * 2 - 1
    ratios = {}
    for layer, _, jac in fold_trace(x0, 0, 32, 32, False):
        sv = torch.linalg.svdvals(jac)
        ratios[layer] = float((sv[:, 1] / sv[:, 0]).median())
    assert ratios[32] < 1e-3 * ratios[1]
