"""Input-output Jacobian spectra (ReZero, Bachlechner et al. 2020, arXiv 2003.04887, Fig. 5)."""

import math

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

import depthlab as dl
from depthlab.diagnostics.jacobian import hutchinson_mean_sq


def small_mlp():
    torch.manual_seed(0)
    return dl.create_model(
        "mlp",
        depth=3,
        width=16,
        in_dim=12,
        num_classes=7,
        scheme="skipinit",
        scheme_options={"alpha_init": 0.5},
    ).double()


def test_dense_equals_autograd_jacobian_svdvals():
    model = small_mlp()
    x = torch.randn(3, 12, dtype=torch.float64)
    df = dl.jacobian_spectrum(model, x, method="dense")
    assert set(df["kind"]) == {"all"} and len(df) == 3 * 7
    for e in range(3):
        jac = torch.autograd.functional.jacobian(lambda v: model(v[None])[0], x[e])
        ref = torch.linalg.svdvals(jac).numpy()
        got = df[df.example == e].sort_values("index")["singular_value"].to_numpy()
        np.testing.assert_allclose(got, ref, atol=1e-5, rtol=1e-5)
    assert model.training and next(model.parameters()).requires_grad  # state restored


def test_matrix_free_top_bottom_within_one_percent_of_dense():
    torch.manual_seed(0)
    net = dl.create_model(
        "mlp", depth=2, width=2048, scheme="skipinit", scheme_options={"alpha_init": 1}
    )
    stage1 = nn.Sequential(net.blocks, nn.Linear(2048, 200)).double()
    x = torch.randn(1, 2048, dtype=torch.float64)  # input dimension 2,048
    dense = dl.jacobian_spectrum(stage1, x, method="dense", k=5)
    free = dl.jacobian_spectrum(stage1, x, method="lanczos", k=5, tol=1e-3)
    for kind in ("top", "bottom"):
        d = dense[dense.kind == kind].sort_values("index")
        f = free[free.kind == kind].sort_values("index")
        assert list(d["index"]) == list(f["index"])
        np.testing.assert_allclose(f["singular_value"], d["singular_value"], rtol=0.01)
    assert list(free[free.kind == "bottom"]["index"]) == list(range(195, 200))


def test_arpack_solver_matches_dense():
    model = small_mlp()
    x = torch.randn(2, 12, dtype=torch.float64)
    dense = dl.jacobian_spectrum(model, x, method="dense", k=3)
    free = dl.jacobian_spectrum(model, x, method="lanczos", k=3, solver="arpack", tol=1e-10)
    np.testing.assert_allclose(free["singular_value"], dense["singular_value"], rtol=1e-6)
    assert list(free["kind"]) == list(dense["kind"]) and list(free["index"]) == list(dense["index"])
    top = dl.jacobian_spectrum(model, x, method="lanczos", k=3, which="top", tol=1e-6)
    assert set(top["kind"]) == {"top"}
    d_top = dense[dense.kind == "top"]["singular_value"].to_numpy()
    np.testing.assert_allclose(top["singular_value"], d_top, rtol=1e-6)


def test_orthogonal_linear_network_is_isometric():
    torch.manual_seed(0)
    model = dl.create_model("linear", depth=20, width=32, init="orthogonal")
    df = dl.jacobian_spectrum(model, torch.randn(2, 32))
    np.testing.assert_allclose(df["singular_value"], 1.0, atol=1e-4)
    assert dl.spectrum_summary(df)["share_within_2"] == 1.0
    v = torch.randn(32, dtype=torch.float64)
    model = model.double()
    ms = hutchinson_mean_sq(lambda u: model(u[None])[0], v, samples=4)
    assert ms == pytest.approx(1.0, abs=1e-5)  # ‖Jᵀu‖² = ‖u‖² for orthogonal J (float32 init)


def test_rezero_stack_has_identity_jacobian():
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=16, width=24, scheme="rezero")
    h = torch.randn(4, 24)
    df = dl.jacobian_spectrum(model.blocks, h)
    np.testing.assert_allclose(df["singular_value"], 1.0, atol=1e-6)
    jac = torch.autograd.functional.jacobian(lambda v: model.blocks(v[None])[0], h[0])
    torch.testing.assert_close(jac, torch.eye(24))


def test_hutchinson_estimates_mean_squared_singular_value():
    model = small_mlp()
    x = torch.randn(1, 12, dtype=torch.float64)
    dense = dl.jacobian_spectrum(model, x, method="dense")["singular_value"].to_numpy()
    hut = dl.jacobian_spectrum(model, x, method="hutchinson", samples=400)
    assert list(hut["kind"]) == ["rms"]
    assert hut["singular_value"].iloc[0] ** 2 == pytest.approx((dense**2).mean(), rel=0.1)


def test_bad_input_errors_and_batchnorm_modes():
    model = small_mlp()
    x = torch.randn(2, 12, dtype=torch.float64)
    with pytest.raises(dl.DepthlabError, match="exceeds the Jacobian's dimension"):
        dl.jacobian_spectrum(model, x, method="dense", k=8)
    with pytest.raises(dl.DepthlabError, match="method='dense'"):
        dl.jacobian_spectrum(model, x, method="lanczos", k=7)
    with pytest.raises(dl.DepthlabError, match="choose one of"):
        dl.jacobian_spectrum(model, x, method="svd")
    with pytest.raises(dl.DepthlabError, match="floating-point"):
        dl.jacobian_spectrum(model, torch.ones(2, 12, dtype=torch.long))
    bn = dl.create_model("mlp", depth=2, width=8, in_dim=6, scheme="batchnorm")
    with pytest.raises(dl.DepthlabError, match="couples the examples"):
        dl.jacobian_spectrum(bn, torch.randn(4, 6), train_mode=True)
    # default: eval mode (per-example Jacobian defined), train mode restored afterwards
    df = dl.jacobian_spectrum(bn, torch.randn(4, 6))
    assert len(df) == 4 * 6 and bn.training


def test_spectrum_summary_known_values():
    s = np.array([math.e, 1.0, 1 / math.e, 0.25])
    df = pd.DataFrame(
        {"example": 0, "index": range(4), "singular_value": s, "kind": "all", "method": "dense"}
    )
    out = dl.spectrum_summary(df)
    logs = np.log(s)
    assert out["mean_log_sv"] == pytest.approx(logs.mean())
    assert out["std_log_sv"] == pytest.approx(logs.std())
    assert out["share_within_2"] == 0.25


def test_block_lanczos_stagnation_stop_resolves_a_clustered_bottom():
    """A clustered lower end (the usual case for Jacobians) defeats the residual test within the
    basis budget, while the Ritz values are already accurate: the ``rtol`` stagnation stop
    returns the bottom 5 within 1% of the exact singular values."""
    from depthlab.diagnostics.jacobian import block_lanczos_singular_values

    n = 2000
    gen = torch.Generator().manual_seed(0)
    s = torch.cat([0.1 + 0.005 * torch.arange(40.0), torch.linspace(0.3, 2.0, n - 40)])
    s = s.double()
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = (u * s) @ w.T

    def g(v):
        return a @ v

    v = torch.zeros(n, dtype=torch.float64)
    exact = np.sort(s.numpy())[:5][::-1]
    with pytest.raises(dl.DepthlabError, match="did not converge.*singular values now .*per check"):
        block_lanczos_singular_values(g, v, 5, which="bottom", tol=1e-3, max_dim=600)
    res = block_lanczos_singular_values(g, v, 5, which="bottom", tol=1e-3, max_dim=800, rtol=1e-3)
    assert np.abs(res["bottom"] / exact - 1).max() < 1e-3
    assert res["dim"] <= 600


def _random_operator(n, s, seed=0):
    gen = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    w, _ = torch.linalg.qr(torch.randn(n, n, generator=gen, dtype=torch.float64))
    a = (u * s) @ w.T
    return lambda v: a @ v


@pytest.mark.slow
def test_partial_reorthogonalisation_matches_full_with_fewer_passes():
    """Simon's partial reorthogonalisation gives the Ritz values of the fully reorthogonalised
    block Lanczos (to 1e-9 here) while reorthogonalising against the whole basis far less
    often than once per block."""
    from depthlab.diagnostics.jacobian import block_lanczos_singular_values

    n = 1500
    s = torch.cat([torch.linspace(0.05, 0.2, 30), torch.linspace(0.3, 3.0, n - 30)]).double()
    g = _random_operator(n, s)
    v = torch.zeros(n, dtype=torch.float64)
    kw = dict(which="both", tol=1e-8, max_dim=1200, block=6)
    full = block_lanczos_singular_values(g, v, 4, reorth="full", **kw)
    part = block_lanczos_singular_values(g, v, 4, reorth="partial", **kw)
    exact = np.sort(s.numpy())[::-1]
    for kind, ref in (("top", exact[:4]), ("bottom", exact[-4:])):
        np.testing.assert_allclose(part[kind], full[kind], rtol=1e-9)
        np.testing.assert_allclose(part[kind], ref, rtol=1e-7)
    steps = int(part["dim"]) // 6
    assert int(full["reorths"]) == steps and int(part["reorths"]) < steps // 2
    with pytest.raises(dl.DepthlabError, match="partial, full"):
        block_lanczos_singular_values(g, v, 4, reorth="none")


def test_banded_ritz_residual_bounds_the_eigenvalue_error():
    """The residual bound from inverse iteration on the banded T equals ‖B y_last‖ of T's exact
    eigenvector for an isolated Ritz value, and bounds the distance to an eigenvalue of G."""
    from depthlab.diagnostics.jacobian import _banded_ritz_residuals

    rng = np.random.default_rng(0)
    n, w = 60, 3
    t = np.zeros((n, n))
    for o in range(w + 1):
        d = rng.standard_normal(n - o)
        t += np.diag(d, -o) + (np.diag(d, o) if o else 0)
    band = np.zeros((w + 1, n))
    for o in range(w + 1):
        band[o, : n - o] = np.diag(t, -o)
    b_last = np.triu(rng.standard_normal((w, w)))
    lam, vec = np.linalg.eigh(t)
    got = _banded_ritz_residuals(band, lam[[0, -1]], b_last)
    ref = np.linalg.norm(b_last @ vec[n - w :, [0, -1]], axis=0)
    np.testing.assert_allclose(got, ref, rtol=1e-8, atol=1e-12)
    # the full symmetric matrix [[T, Bᵀ-block], [B-block, C]] has an eigenvalue within the bound
    m = n + w
    big = np.zeros((m, m))
    big[:n, :n] = t
    big[n:, n - w : n] = b_last
    big[n - w : n, n:] = b_last.T
    big[n:, n:] = np.diag(rng.standard_normal(w))
    lam_big = np.linalg.eigvalsh(big)
    for theta, bound in zip(lam[[0, -1]], got):
        assert np.abs(lam_big - theta).min() <= bound + 1e-12


def test_block_lanczos_on_an_identity_jacobian_stops_after_one_block():
    """ReZero at init: J = I, so the first block spans an invariant subspace (a breakdown the
    solver continues past with fresh directions) and every singular value is exactly 1."""
    from depthlab.diagnostics.jacobian import block_lanczos_singular_values

    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=8, width=300, scheme="rezero")
    g = lambda v: model.blocks(v[None])[0]  # noqa: E731
    res = block_lanczos_singular_values(g, torch.randn(300), 5, tol=1e-6)
    np.testing.assert_allclose(res["top"], 1.0, atol=1e-6)
    np.testing.assert_allclose(res["bottom"], 1.0, atol=1e-6)
    assert int(res["products"]) == 8 + 8  # the first block and one fresh block
