"""dl.loss_landscape against the closed form of a quadratic loss, and what it leaves alone."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import depthlab as dl


def _quadratic(d: int = 6, n: int = 40):
    """L(w) = ½·mean((X w)²) = ½ wᵀHw with H = XᵀX/n, as a bias-free linear model."""
    torch.manual_seed(0)
    model = nn.Linear(d, 1, bias=False).double()
    x = torch.randn(n, d, dtype=torch.float64) * torch.linspace(0.2, 3.0, d, dtype=torch.float64)
    y = torch.zeros(n, 1, dtype=torch.float64)
    h = x.T @ x / n
    return model, x, y, h, lambda out, target: 0.5 * ((out - target) ** 2).mean()


def test_quadratic_loss_matches_the_closed_form():
    model, x, y, h, loss_fn = _quadratic()
    w = model.weight.detach().flatten()
    g = h @ w
    etas = (0.01, 0.1, 0.5)
    df = dl.loss_landscape(model, x, y, etas=etas, loss_fn=loss_fn)
    base = 0.5 * float(w @ h @ w)
    assert df.attrs["loss"] == pytest.approx(base, rel=1e-12)
    assert df.attrs["grad_norm"] == pytest.approx(float(g.norm()), rel=1e-12)
    # β along the gradient = ‖Hg‖/‖g‖ at every step size (the Hessian along the gradient)
    along = float((h @ g).norm() / g.norm())
    assert df["beta"].to_numpy() == pytest.approx([along] * 3, rel=1e-10)
    assert df.attrs["beta_smoothness"] == pytest.approx(along, rel=1e-10)
    assert along <= float(torch.linalg.eigvalsh(h)[-1]) + 1e-12  # at most the top eigenvalue
    for eta, loss, change in zip(etas, df["loss"], df["grad_change"], strict=True):
        # L(w − ηg) = L(w) − η‖g‖² + ½η² gᵀHg, and the gradient moves by η‖Hg‖
        exact = base - eta * float(g @ g) + 0.5 * eta**2 * float(g @ h @ g)
        assert loss == pytest.approx(exact, rel=1e-10)
        assert change == pytest.approx(eta * float((h @ g).norm()), rel=1e-10)


def test_model_state_and_grads_are_left_as_they_were():
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=4, width=16, in_dim=8, scheme="batchnorm").train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(32, 8), torch.randint(0, 10, (32,))
    df = dl.loss_landscape(model, x, y)
    assert list(df.columns) == ["eta", "loss", "loss_change", "grad_change", "beta"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert (df["grad_change"] > 0).all() and df.attrs["loss_range"] > 0


def test_bad_step_sizes_are_refused():
    model, x, y, _, loss_fn = _quadratic()
    with pytest.raises(dl.DepthlabError, match="etas"):
        dl.loss_landscape(model, x, y, etas=(0.1, -1.0), loss_fn=loss_fn)


def test_noisy_batchnorm_shifts_and_scales_in_training_only():
    torch.manual_seed(0)
    layer = dl.nn.norm.NoisyBatchNorm(4, "channels", mean=1.0, std=3.0)
    x = torch.randn(64, 4, 5, 5)
    y = layer.train()(x)
    per_unit_mean = y.mean(dim=(0, 2, 3))
    per_unit_std = y.std(dim=(0, 2, 3))
    assert per_unit_mean.abs().max() > 0.05 and (per_unit_std > 0.99).all()
    assert (per_unit_mean.abs() <= 1.0 + 1e-5).all() and (per_unit_std <= 3.0 + 1e-3).all()
    assert not torch.allclose(layer(x), y)  # resampled every step
    layer.eval()
    torch.testing.assert_close(layer(x), layer.norm(x) * 2.0)  # eval: the noise's expectation
    net = dl.create_model(
        "resnet", depth=8, scheme="batchnorm", scheme_options={"noise_mean": 0.5, "noise_std": 2}
    )
    assert any(isinstance(m, dl.nn.norm.NoisyBatchNorm) for m in net.modules())
    with pytest.raises(dl.DepthlabError, match="noise_std"):
        dl.get_scheme("batchnorm", noise_std=0.5)
