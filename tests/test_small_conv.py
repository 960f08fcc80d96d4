"""The 3×3 convolution on 2×2 maps as one matrix product: equal to ``F.conv2d`` (values,
gradients, double backward, every memory layout), taken exactly where it applies, and the layer
type depthlab's schemes build."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depthlab as dl
from depthlab.nn import Conv2d, conv3x3_2x2

LAYOUTS = (torch.contiguous_format, torch.channels_last)


def _tensors(n, c_in, c_out, x_fmt, w_fmt, bias, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c_in, 2, 2, generator=g, dtype=dtype).contiguous(memory_format=x_fmt)
    w = torch.randn(c_out, c_in, 3, 3, generator=g, dtype=dtype).contiguous(memory_format=w_fmt)
    b = torch.randn(c_out, generator=g, dtype=dtype) if bias else None
    return x.requires_grad_(), w.requires_grad_(), None if b is None else b.requires_grad_()


@pytest.mark.parametrize("x_fmt", LAYOUTS)
@pytest.mark.parametrize("w_fmt", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(3, 5, 4), (1, 1, 1), (2, 7, 3)])
def test_equals_conv2d_values_and_gradients(x_fmt, w_fmt, bias, shape):
    x, w, b = _tensors(*shape, x_fmt, w_fmt, bias)
    y = conv3x3_2x2(x, w, b)
    ref = F.conv2d(x, w, b, padding=1)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(ref)
    inputs = (x, w) if b is None else (x, w, b)
    got = torch.autograd.grad(y, inputs, g)
    want = torch.autograd.grad(ref, inputs, g)
    for a, e in zip(got, want, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("x_fmt", LAYOUTS)
def test_gradcheck_and_double_backward(x_fmt):
    x, w, b = _tensors(2, 3, 2, x_fmt, torch.contiguous_format, True)
    assert torch.autograd.gradcheck(conv3x3_2x2, (x, w, b))
    assert torch.autograd.gradgradcheck(conv3x3_2x2, (x, w, b))


@pytest.mark.parametrize("fmt", LAYOUTS)
def test_output_keeps_input_layout_and_float32_matches(fmt):
    x, w, b = _tensors(8, 16, 16, fmt, torch.channels_last, True, torch.float32)
    y1 = conv3x3_2x2(x, w, b)
    ref1 = F.conv2d(x, w, b, padding=1)
    assert y1.is_contiguous(memory_format=fmt)
    y2 = conv3x3_2x2(y1, w, b)
    assert y2.is_contiguous(memory_format=fmt)
    ref = F.conv2d(ref1, w, b, padding=1)
    torch.testing.assert_close(y2, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("x_fmt", LAYOUTS)
def test_its_backward_keeps_only_the_input_and_the_weight(x_fmt):
    """One autograd node that saves the input and the weight, not the gathered 16-tap matrix
    (4·C_in × 4·C_out, gathered again in the backward pass): what a 10,004-layer ResNet's last
    stage would otherwise hold 3,334 of."""
    x, w, b = _tensors(4, 8, 6, x_fmt, torch.channels_last, True)
    saved: list[torch.Tensor] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = conv3x3_2x2(x, w, b)
    assert [t.data_ptr() for t in saved] == [x.data_ptr(), w.data_ptr()]
    assert y.grad_fn.name().endswith("_Conv2x2Backward")


@pytest.mark.parametrize("x_fmt", LAYOUTS)
@pytest.mark.parametrize("bias", [True, False])
def test_its_backward_is_autograds_to_the_bit(x_fmt, bias):
    """The written-out backward gives float32 gradients identical to autograd's backward of the
    same product as ordinary ops (the same kernels on the same operands): training records do
    not move by a rounding."""
    from depthlab.nn.conv import _gather, _product

    x, w, b = _tensors(32, 64, 48, x_fmt, torch.channels_last, bias, torch.float32)
    last = x_fmt == torch.channels_last
    inputs = (x, w) if b is None else (x, w, b)
    g = torch.randn(32, 48, 2, 2).contiguous(memory_format=x_fmt)
    y = conv3x3_2x2(x, w, b)
    ref = _product(x, _gather(w, last), b, last)
    assert torch.equal(y, ref) and y.grad_fn.name().endswith("_Conv2x2Backward")
    for got, want in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g)):
        assert torch.equal(got, want)


def _stack(x, ws, conv):
    for w in ws:
        x = torch.relu(conv(x, w))
    return x


@pytest.mark.parametrize("x_fmt", LAYOUTS)
def test_reused_buffers_do_not_leak_between_calls(x_fmt):
    """The gathered matrix and the product behind the weight's gradient go to per-thread buffers
    reused from call to call (they stay in the cache): a stack of layers of one shape, every
    call writing the same buffers, has ``F.conv2d``'s outputs and gradients — with grad mode
    on and off, and in four threads at once (float64: a buffer read after another call wrote it
    would be off by O(1), not by the 1e-12 of rounding through four layers)."""
    import threading

    def case(seed):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(8, 16, 2, 2, generator=g, dtype=torch.float64)
        x = x.contiguous(memory_format=x_fmt).requires_grad_()
        ws = [torch.randn(16, 16, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
              for _ in range(4)]  # fmt: skip
        return x, ws

    def check(seed, errors):
        try:
            x, ws = case(seed)
            y = _stack(x, ws, conv3x3_2x2)
            ref = _stack(x, ws, lambda x, w: F.conv2d(x, w, padding=1))
            torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-9)
            got = torch.autograd.grad(y.square().sum(), [x, *ws])
            want = torch.autograd.grad(ref.square().sum(), [x, *ws])
            for a, e in zip(got, want, strict=True):
                torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
            with torch.no_grad():
                torch.testing.assert_close(
                    _stack(x, ws, conv3x3_2x2), ref.detach(), rtol=1e-9, atol=1e-9
                )
        except Exception as e:  # noqa: BLE001 - reported by the main thread
            errors.append(e)

    errors: list[Exception] = []
    check(0, errors)

    def repeat(seed, errors):
        for _ in range(5):
            check(seed, errors)

    threads = [threading.Thread(target=repeat, args=(seed, errors)) for seed in (1, 2, 3, 4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors


@pytest.mark.parametrize("x_fmt", LAYOUTS)
def test_transforms_forward_ad_and_autocast_run_it_as_ordinary_ops(x_fmt):
    """Where a custom autograd node cannot run (``torch.func`` transforms, forward-mode AD) or
    picks no dtypes (autocast), the same product runs as ordinary ops: Jacobians, JVPs and the
    autocast output agree with ``F.conv2d``'s."""
    x, w, b = _tensors(2, 3, 4, x_fmt, torch.contiguous_format, True)
    jac = torch.func.jacrev(lambda x: conv3x3_2x2(x, w, b))(x)
    ref = torch.func.jacrev(lambda x: F.conv2d(x, w, b, padding=1))(x)
    torch.testing.assert_close(jac, ref, rtol=1e-12, atol=1e-12)
    v = torch.randn_like(x)
    with torch.autograd.forward_ad.dual_level():
        out = conv3x3_2x2(torch.autograd.forward_ad.make_dual(x, v), w, b)
        tangent = torch.autograd.forward_ad.unpack_dual(out).tangent
    torch.testing.assert_close(tangent, F.conv2d(v, w, padding=1), rtol=1e-12, atol=1e-12)
    x32, w32, b32 = (t.detach().float() for t in (x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = conv3x3_2x2(x32, w32, b32)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(
        got.float(), F.conv2d(x32, w32, b32, padding=1), rtol=0.05, atol=0.05
    )


def test_rejects_other_shapes():
    with pytest.raises(ValueError, match="F.conv2d"):
        conv3x3_2x2(torch.randn(1, 2, 4, 4), torch.randn(3, 2, 3, 3))
    with pytest.raises(ValueError, match="F.conv2d"):
        conv3x3_2x2(torch.randn(1, 2, 2, 2), torch.randn(3, 2, 1, 1))


def _count_fast(monkeypatch):
    calls = []
    real = dl.nn.conv.conv3x3_2x2

    def spy(*a):
        calls.append(a[0].shape)
        return real(*a)

    monkeypatch.setattr(dl.nn.conv, "conv3x3_2x2", spy)
    return calls


@pytest.mark.parametrize(
    ("kwargs", "hw", "fast"),
    [
        ({}, 2, True),
        ({"padding": "same"}, 2, True),
        ({}, 4, False),  # larger maps: oneDNN's kernel
        ({"stride": 2}, 2, False),
        ({"dilation": 2, "padding": 2}, 2, False),
        ({"padding_mode": "reflect"}, 2, False),
    ],
)
def test_layer_takes_the_path_exactly_where_it_applies(monkeypatch, kwargs, hw, fast):
    torch.manual_seed(0)
    kw = {"padding": 1, **kwargs}
    layer = Conv2d(4, 4, 3, **kw)
    ref = nn.Conv2d(4, 4, 3, **kw)
    ref.load_state_dict(layer.state_dict())
    calls = _count_fast(monkeypatch)
    x = torch.randn(5, 4, hw, hw)
    torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    assert bool(calls) == fast
    calls.clear()
    with dl.nn.fusion(False):
        torch.testing.assert_close(layer(x), ref(x), rtol=1e-5, atol=1e-5)
    assert not calls
    layer.to(torch.bfloat16)  # reduced precision: F.conv2d's own kernels
    torch.testing.assert_close(layer(x.bfloat16()), ref.to(torch.bfloat16)(x.bfloat16()))
    assert not calls


def test_schemes_build_it_and_a_deep_resnet_trains_the_same(monkeypatch):
    """A CIFAR ResNet on 8×8 inputs reaches 2×2 maps in its last stage: its convolutions there
    take the matrix-product path, and one SGD step equals the module-by-module one (float64)."""
    torch.manual_seed(0)
    for scheme in ("skipinit", "fixup", "batchnorm"):
        m = dl.create_model("resnet", depth=14, scheme=scheme, in_channels=1).double()
        convs = [x for x in m.modules() if isinstance(x, nn.Conv2d) and x.kernel_size == (3, 3)]
        assert convs and all(type(x) is Conv2d for x in convs)
        ref = dl.create_model("resnet", depth=14, scheme=scheme, in_channels=1).double()
        ref.load_state_dict(m.state_dict())
        x = torch.randn(6, 1, 8, 8, dtype=torch.float64).contiguous(
            memory_format=torch.channels_last
        )
        y = torch.randint(0, 10, (6,))
        calls = _count_fast(monkeypatch)
        F.cross_entropy(m(x), y).backward()
        assert calls and all(tuple(s[2:]) == (2, 2) for s in calls)
        with dl.nn.fusion(False):
            F.cross_entropy(ref(x), y).backward()
        for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-9, atol=1e-9, msg=name)
        monkeypatch.undo()
