"""Gradient norms against hand-derived backpropagation."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depthlab as dl
from depthlab.nn import Residual


def test_two_layer_net_matches_hand_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    y = torch.randn(6, 3, dtype=torch.float64)
    df = dl.gradient_norms(net, x, y)  # MSE for float targets
    w1, b1, w2, b2 = (p.detach() for p in net.parameters())
    z = x @ w1.T + b1
    h = z.clamp(min=0)
    yhat = h @ w2.T + b2
    g = 2 * (yhat - y) / yhat.numel()  # dL/dŷ for L = mean((ŷ - y)²)
    dz = (g @ w2) * (z > 0)
    expect = {"0.weight": dz.T @ x, "0.bias": dz.sum(0), "2.weight": g.T @ h, "2.bias": g.sum(0)}
    got = df[df.kind == "param"].set_index("name")["norm"]
    for name, grad in expect.items():
        assert got[name] == pytest.approx(float(grad.norm()), rel=1e-12)
    assert df.attrs["loss"] == pytest.approx(float(((yhat - y) ** 2).mean()), rel=1e-12)
    assert all(p.grad is None for p in net.parameters())  # .grad untouched
    assert (df[df.kind == "param"]["block"] == -1).all()


def test_block_activation_gradients_match_hand_computation():
    torch.manual_seed(0)
    a, b, c = nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False), nn.Linear(4, 3)
    net = nn.Sequential(Residual(a), Residual(b), c).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y = torch.tensor([0, 2, 1, 1, 0])
    df = dl.gradient_norms(net, x, y)  # cross-entropy for integer targets
    wa, wb, wc = a.weight.detach(), b.weight.detach(), c.weight.detach()
    h0 = x + x @ wa.T
    h1 = h0 + h0 @ wb.T
    logits = h1 @ wc.T + c.bias.detach()
    g = (torch.softmax(logits, 1) - F.one_hot(y, 3)) / 5  # dL/dlogits, mean cross-entropy
    g1 = g @ wc  # dL/dh1
    g0 = g1 + g1 @ wb  # dL/dh0 = dL/dh1 (I + W_b)
    act = df[df.kind == "activation"].set_index("block")["norm"]
    assert act[1] == pytest.approx(float(g1.norm()), rel=1e-12)
    assert act[0] == pytest.approx(float(g0.norm()), rel=1e-12)
    params = df[df.kind == "param"].set_index("name")
    assert (
        params.loc["0.branch.weight", "block"] == 0 and params.loc["1.branch.weight", "block"] == 1
    )
    assert params.loc["1.branch.weight", "norm"] == pytest.approx(float((g1.T @ h0).norm()))
    assert df.attrs["loss"] == pytest.approx(float(F.cross_entropy(logits, y)), rel=1e-12)


def test_fixup_init_has_zero_branch_gradients_except_last_layers():
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=4, width=16, scheme="fixup")
    df = dl.gradient_norms(model, torch.randn(8, 64), torch.randint(0, 10, (8,)))
    got = df[df.kind == "param"].set_index("name")["norm"]
    # zero classifier: no gradient reaches the blocks; only the classifier weight/bias move
    assert got["classifier.weight"] > 0 and got["classifier.bias"] > 0
    assert (df[df.kind == "activation"]["norm"] == 0).all()
    summary = dl.diagnostics.block_gradient_summary(df)
    assert list(summary["block"]) == [0, 1, 2, 3] and (summary["param_grad"] == 0).all()
