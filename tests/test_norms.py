"""Reference BatchNorm/LayerNorm against torch's modules; the norm factory; scalar gates."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import depthlab as dl
from depthlab.nn import ReferenceBatchNorm, ReferenceLayerNorm, create_norm


def _randomize_affine(*mods: nn.Module) -> None:
    w, b = torch.randn(mods[0].weight.shape), torch.randn(mods[0].bias.shape)
    with torch.no_grad():
        for m in mods:
            m.weight.copy_(w)
            m.bias.copy_(b)


@pytest.mark.parametrize(
    ("torch_cls", "shape"),
    [(nn.BatchNorm1d, (16, 5)), (nn.BatchNorm1d, (8, 5, 7)), (nn.BatchNorm2d, (6, 5, 4, 3))],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_batchnorm_matches_torch(torch_cls, shape, dtype):
    """Train outputs, running mean/var after several steps (momentum 0.1, unbiased running var)
    and eval outputs agree with torch to 1e-6 (float64: absolute; float32: absolute or relative,
    i.e. a few ulp of outputs of size ~5)."""
    tol = dict(atol=1e-6, rtol=0 if dtype == torch.float64 else 1e-6)
    ref = ReferenceBatchNorm(5).to(dtype)
    bn = torch_cls(5).to(dtype)
    _randomize_affine(ref, bn)
    for _ in range(5):
        x = (3 * torch.randn(shape) + 2).to(dtype)  # mean and variance far from 0 and 1
        y_ref, y = ref(x), bn(x)
        torch.testing.assert_close(y_ref, y, **tol)
    torch.testing.assert_close(ref.running_mean, bn.running_mean, **tol)
    torch.testing.assert_close(ref.running_var, bn.running_var, **tol)
    assert ref.num_batches_tracked.item() == bn.num_batches_tracked.item() == 5
    assert (bn.running_var - 1).abs().max() > 1  # the statistics really moved
    ref.eval(), bn.eval()
    x = (3 * torch.randn(shape) + 2).to(dtype)
    torch.testing.assert_close(ref(x), bn(x), **tol)


def test_reference_batchnorm_gradients_match_torch():
    ref, bn = ReferenceBatchNorm(4).double(), nn.BatchNorm2d(4).double()
    _randomize_affine(ref, bn)
    x = torch.randn(3, 4, 5, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(3, 4, 5, 5, dtype=torch.float64)
    (gx_ref,) = torch.autograd.grad(ref(x), x, g)
    (gx,) = torch.autograd.grad(bn(x), x, g)
    torch.testing.assert_close(gx_ref, gx)


def test_reference_batchnorm_refuses_wrong_channels():
    with pytest.raises(ValueError, match=r"\(N, 5, \.\.\.\)"):
        ReferenceBatchNorm(5)(torch.randn(4, 3))


@pytest.mark.parametrize(
    ("normalized", "shape"), [(6, (4, 6)), (6, (2, 3, 6)), ((3, 6), (2, 3, 6))]
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_reference_layernorm_matches_torch(normalized, shape, dtype):
    tol = dict(atol=1e-6, rtol=0 if dtype == torch.float64 else 1e-6)
    ref, ln = ReferenceLayerNorm(normalized).to(dtype), nn.LayerNorm(normalized).to(dtype)
    _randomize_affine(ref, ln)
    x = (5 * torch.randn(shape) - 3).to(dtype)
    torch.testing.assert_close(ref(x), ln(x), **tol)
    ref.eval(), ln.eval()
    torch.testing.assert_close(ref(x), ln(x), **tol)


def test_layernorm_is_per_sample():
    ln = ReferenceLayerNorm(8)
    x = torch.randn(5, 8)
    torch.testing.assert_close(ln(x)[2:3], ln(x[2:3]))  # batch size and neighbours do not matter
    torch.testing.assert_close(ln(x).mean(-1), torch.zeros(5), atol=1e-6, rtol=0)


def test_create_norm_layouts():
    x = torch.randn(4, 6, 5, 5)
    # LayerNorm of conv activations: per sample over (C, H, W)
    torch.testing.assert_close(
        create_norm("layernorm", 6, "channels")(x),
        ReferenceLayerNorm((6, 5, 5))(x),
        atol=1e-5,
        rtol=0,
    )
    # BatchNorm of token sequences (N, T, C): statistics over batch and tokens
    t = torch.randn(4, 7, 6)
    y = create_norm("batchnorm", 6, "tokens")(t)
    torch.testing.assert_close(y, nn.BatchNorm1d(6)(t.reshape(-1, 6)).reshape(4, 7, 6))
    assert isinstance(create_norm("batchnorm", 6, "features"), nn.BatchNorm1d)
    assert isinstance(create_norm("layernorm", 6, "tokens"), nn.LayerNorm)


def test_create_norm_refuses_unknown_names():
    with pytest.raises(dl.DepthlabError, match="choose one of: batchnorm, layernorm"):
        create_norm("groupnorm", 4, "channels")
    with pytest.raises(dl.DepthlabError, match="features, channels, tokens"):
        create_norm("batchnorm", 4, "pixels")


def test_gate_and_bias():
    g, fixed, b = dl.Gate(0.0), dl.Gate(0.5, learnable=False), dl.Bias()
    x = torch.randn(3, 4)
    assert torch.equal(g(x), torch.zeros_like(x))
    assert torch.equal(fixed(x), 0.5 * x) and torch.equal(b(x), x)
    assert [n for n, _ in g.named_parameters()] == ["alpha"]
    assert list(fixed.parameters()) == [] and "alpha" in fixed.state_dict()
    with torch.no_grad():
        g.alpha.fill_(3.0)
        b.bias.fill_(2.0)
    torch.testing.assert_close(b(g(x)), 3 * x + 2)
    g.reset_parameters(), b.reset_parameters()
    assert g.alpha.item() == 0.0 and b.bias.item() == 0.0


@pytest.fixture
def one_rank_group():
    """A gloo process group of one rank in this process (removed afterwards)."""
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def _same_step(ref: nn.Module, new: nn.Module, x: torch.Tensor) -> None:
    """One train step of both norms on ``x``: equal outputs, input and parameter gradients."""
    outs = []
    for bn in (ref, new):
        bn.zero_grad()
        xi = x.clone().requires_grad_(True)
        y = bn(xi)
        (y * torch.linspace(-1, 2, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append((y.detach(), xi.grad, bn.weight.grad, bn.bias.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("momentum,channels_last", [(0.1, False), (None, True)])
def test_distributed_batchnorm_equals_torch_batchnorm(one_rank_group, momentum, channels_last):
    """Through its all-gather/all-reduce path (a one-rank group), DistributedBatchNorm gives
    torch's BatchNorm2d outputs, input and parameter gradients and running statistics over
    three train steps, then the same eval output; conversion keeps dtype and values."""
    from depthlab.nn import DistributedBatchNorm, convert_distributed_batchnorm

    ref = nn.BatchNorm2d(6, momentum=momentum).double()
    _randomize_affine(ref)
    with torch.no_grad():
        ref.running_mean.uniform_(-1, 1)
        ref.running_var.uniform_(0.5, 2)
    model = convert_distributed_batchnorm(nn.Sequential(nn.Identity(), ref.__class__(6)))
    assert isinstance(model[1], DistributedBatchNorm)
    new = convert_distributed_batchnorm(ref.__class__(6, momentum=momentum).double())
    new.load_state_dict(ref.state_dict())
    assert new.weight.dtype == torch.float64 and new.momentum == momentum
    for step in range(3):
        x = torch.randn(8, 6, 5, 4, dtype=torch.float64) * (step + 1) + step
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        _same_step(ref, new, x)
        torch.testing.assert_close(new.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(new.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
    assert int(new.num_batches_tracked) == int(ref.num_batches_tracked) == 3
    ref.eval(), new.eval()
    x = torch.randn(4, 6, 5, 4, dtype=torch.float64)
    torch.testing.assert_close(new(x), ref(x), rtol=1e-12, atol=1e-12)


def test_distributed_batchnorm_on_token_layout(one_rank_group):
    from depthlab.nn import convert_distributed_batchnorm

    ref = create_norm("batchnorm", 5, "tokens").double()
    _randomize_affine(ref)
    new = convert_distributed_batchnorm(create_norm("batchnorm", 5, "tokens").double())
    new.load_state_dict(ref.state_dict())
    assert new.layout == "tokens"
    x = torch.randn(3, 7, 5, dtype=torch.float64)  # (N, T, C)
    _same_step(ref, new, x)
    torch.testing.assert_close(new.running_var, ref.running_var, rtol=1e-12, atol=1e-12)
