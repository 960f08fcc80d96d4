"""Residual blocks with the gate and identity skip fused (``x + α·f(x)`` as one ``addcmul``)
against the module-by-module path, and activation checkpointing: same gradients, and BatchNorm
running statistics updated once per step."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depthlab as dl
import depthlab.nn.fusion.branch as fusion_branch
from depthlab.nn import Gate, Residual
from depthlab.nn.residual import Branch


def _block(width: int, alpha: float, bias: bool = True, learnable: bool = True) -> Residual:
    lin = nn.Linear(width, width, bias=bias)
    with torch.no_grad():
        lin.weight.normal_(0, width**-0.5)
        if bias:
            lin.bias.normal_()
    return Residual(Branch(nn.ReLU(), lin), gate=Gate(alpha, learnable=learnable))


def _stack(depth: int, width: int, alpha: float, **kw) -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(*[_block(width, alpha, **kw) for _ in range(depth)]).double()


def _unfused(model: nn.Module):
    """A no-op forward hook on every gate: forces the module-by-module path."""
    return [m.register_forward_hook(lambda *a: None) for m in model.modules() if type(m) is Gate]


def _grads(model, x, create_graph=False):
    x = x.clone().requires_grad_(True)
    out = model(x)
    loss = (out.sin() * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).sum()
    inputs = [x] + [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, inputs, create_graph=create_graph)
    second = None
    if create_graph:
        second = torch.autograd.grad(sum((g**2).sum() for g in grads), inputs)
    return out, grads, second


def _compare(model, x, create_graph=False):
    fused = _grads(model, x, create_graph)
    hooks = _unfused(model)
    try:
        plain = _grads(model, x, create_graph)
    finally:
        for h in hooks:
            h.remove()
    return fused, plain


@pytest.mark.parametrize("alpha", [0.0, 0.37])
@pytest.mark.parametrize("bias", [True, False])
def test_fused_gate_skip_gradients_equal_module_path(alpha, bias):
    model = _stack(4, 12, alpha, bias=bias)
    x = torch.randn(7, 12, dtype=torch.float64)
    (out_f, g_f, _), (out_p, g_p, _) = _compare(model, x)
    assert out_f.grad_fn.name() == "AddcmulBackward0"  # skip + α·f(x) in one op
    assert out_p.grad_fn.name() == "AddBackward0"
    torch.testing.assert_close(out_f, out_p, rtol=0, atol=1e-12)
    assert len(g_f) == len(g_p) == 1 + 4 * (3 if bias else 2)
    for a, b in zip(g_f, g_p, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    # the gate gradient is ⟨g, W relu(x) + b⟩: nonzero even at α = 0 (ReZero's init)
    assert all(g.abs() > 1e-6 for g in g_f if g.dim() == 0)


def test_fixed_gate_and_double_backward_equal_module_path():
    model = _stack(3, 10, 0.5, learnable=False)  # α a buffer: no gate gradient
    x = torch.randn(5, 10, dtype=torch.float64)
    (out_f, g_f, s_f), (_, g_p, s_p) = _compare(model, x, create_graph=True)
    assert out_f.grad_fn.name() == "AddcmulBackward0"
    assert len(g_f) == 1 + 3 * 2
    for a, b in zip(g_f + s_f, g_p + s_p, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
    assert max(s.abs().max() for s in s_f) > 1e-3  # second derivatives really are nonzero


def test_hooks_and_no_grad_and_functorch():
    model = _stack(3, 8, 0.4)
    x = torch.randn(6, 8, dtype=torch.float64)
    seen = []
    h = model[1].branch.register_forward_hook(lambda m, i, o: seen.append(o.clone()))
    out = model(x)
    h.remove()
    assert len(seen) == 1  # the hooked block ran as modules; the hook saw W relu(x) + b
    lin = model[1].branch[1]
    x1 = model[0](x)
    torch.testing.assert_close(seen[0], F.linear(torch.relu(x1), lin.weight, lin.bias))
    with torch.no_grad():
        torch.testing.assert_close(model(x), out, rtol=0, atol=1e-12)
    # torch.func (the Jacobian diagnostics) through the fused blocks
    jac = torch.func.jacrev(model)(x[:1])[0, :, 0, :]
    jac_ref = torch.autograd.functional.jacobian(lambda v: model(v), x[:1])[0, :, 0, :]
    torch.testing.assert_close(jac, jac_ref, rtol=0, atol=1e-12)
    # forward-mode AD with dual tensors (no torch.func): J v
    v = torch.randn_like(x[:1])
    with torch.autograd.forward_ad.dual_level():
        dual = model(torch.autograd.forward_ad.make_dual(x[:1], v))
        tangent = torch.autograd.forward_ad.unpack_dual(dual).tangent
    torch.testing.assert_close(tangent[0], jac_ref @ v[0], rtol=0, atol=1e-12)


def test_rezero_mlp_checkpointing_gives_same_gradients():
    torch.manual_seed(1)
    model = dl.create_model("mlp", depth=9, width=16, in_dim=8, scheme="rezero").double()
    with torch.no_grad():
        for blk in model.blocks:
            blk.gate.alpha.fill_(0.2)
    x, y = torch.randn(10, 8, dtype=torch.float64), torch.randint(0, 10, (10,))

    def grads():
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        return [p.grad.clone() for p in model.parameters()]

    ref = grads()
    model.blocks.checkpoint_segments = 3  # segments of 3 blocks: 2 checkpointed, 1 run plainly
    for a, b in zip(grads(), ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("model_name", ["mlp", "resnet"])
def test_checkpointing_updates_batchnorm_statistics_once(model_name):
    """Recomputation in the backward pass must not update running statistics a second time."""
    kw = dict(depth=6, width=16, in_dim=8) if model_name == "mlp" else dict(depth=8, width=4)
    shape = (12, 8) if model_name == "mlp" else (12, 3, 8, 8)

    def train(segments: int):
        torch.manual_seed(0)
        model = dl.create_model(model_name, scheme="batchnorm", **kw)
        model.blocks.checkpoint_segments = segments
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        gen = torch.Generator().manual_seed(3)
        for _ in range(3):
            x = torch.randn(shape, generator=gen)
            y = torch.randint(0, 10, (12,), generator=gen)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
        return model.state_dict()

    plain, ckpt = train(0), train(3)
    assert plain.keys() == ckpt.keys()
    counters = [k for k in plain if k.endswith("num_batches_tracked")]
    assert counters and all(int(plain[k]) == int(ckpt[k]) == 3 for k in counters)
    running = [k for k in plain if "running_" in k]
    assert running
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-6, msg=k)


def _fixup_branch(conv: type, k: int, stride: int, padding: int) -> Branch:
    """Fixup's bottleneck-style branch: relu, +b, layer, +b, relu, +b, layer, ·s, +b."""
    from depthlab.nn import Bias

    torch.manual_seed(3)
    c = 4
    if conv is nn.Linear:
        layers = [nn.Linear(c, c, bias=False), nn.Linear(c, c)]
    else:
        layers = [
            conv(c, c, k, stride=stride, padding=padding, bias=False),
            conv(c, c, 1, bias=True),
        ]
    branch = Branch(
        nn.ReLU(), Bias(), layers[0], Bias(), nn.ReLU(), Bias(), layers[1], Gate(1.0), Bias()
    ).double()
    with torch.no_grad():
        for p in branch.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return branch


@pytest.mark.parametrize(
    "conv,dims,k,stride,padding",
    [
        (nn.Conv2d, 2, 1, 1, 0),
        (nn.Conv2d, 2, 1, 2, 0),
        (nn.Conv2d, 2, 3, 1, 0),
        (nn.Conv2d, 2, 3, 2, 1),  # zero-padded: the first bias stays an add
        (nn.Conv1d, 1, 1, 1, 0),
        (nn.Conv3d, 3, 1, 1, 0),
        (nn.Linear, 0, 1, 1, 0),
    ],
)
def test_scalar_biases_before_a_layer_fold_exactly(
    conv, dims, k, stride, padding, module_by_module
):
    """Fixup's scalar biases between a ReLU and a linear layer or an unpadded conv are folded into
    the layer's bias (``W(h + b) = W h + b·ΣW``): outputs and every gradient, the biases'
    included, equal the module-by-module computation."""
    branch = _fixup_branch(conv, k, stride, padding)
    torch.manual_seed(4)
    x = torch.randn(16, 4, *([7] * dims), dtype=torch.float64)
    calls = []
    real = fusion_branch._fused_layer

    def spy(*args, **kw):
        calls.append(args[4] if len(args) > 4 else kw.get("pre"))
        return real(*args, **kw)

    def grads():
        xg = x.clone().requires_grad_(True)
        out = branch(xg)
        loss = (out.sin() * torch.arange(out.numel(), dtype=out.dtype).view_as(out).cos()).sum()
        return out.detach(), torch.autograd.grad(loss, [xg, *branch.parameters()])

    fusion_branch._fused_layer = spy
    try:
        out, g = grads()
    finally:
        fusion_branch._fused_layer = real
    folded = [pre is not None for pre in calls]
    assert folded == ([False, True] if padding else [True, True])
    ref_out, ref_g = module_by_module(grads)
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(g, ref_g, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("channels_last", [False, True])
def test_post_relu_bias_before_a_padded_conv_is_one_threshold(channels_last, module_by_module):
    """Fixup's ``relu(z) + b`` before a zero-padded 3×3 conv runs as ``threshold(z + b, b, b)``
    with ``b`` folded into the previous conv's bias: the forward is bit-identical to the ReLU and
    the add, and all gradients (the bias's included, and second order) equal the module path."""
    from depthlab.nn import Bias
    from depthlab.nn.fusion.branch import _ReluShifted

    torch.manual_seed(6)
    branch = Branch(
        nn.ReLU(),
        Bias(),
        nn.Conv2d(4, 4, 3, padding=1, bias=False),
        Bias(),
        nn.ReLU(),
        Bias(),
        nn.Conv2d(4, 4, 3, stride=2, padding=1, bias=False),
        Gate(1.0),
        Bias(),
    ).double()
    with torch.no_grad():
        for p in branch.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    x = torch.randn(5, 4, 6, 6, dtype=torch.float64)
    if channels_last:
        x, branch = (
            x.to(memory_format=torch.channels_last),
            branch.to(memory_format=torch.channels_last),
        )
    used = []
    real = _ReluShifted.forward

    def spy(ctx, y, b):
        used.append(b.item())
        return real(ctx, y, b)

    def grads(create_graph=False):
        xg = x.clone().requires_grad_(True)
        out = branch(xg)
        loss = (out.sin() * torch.arange(out.numel(), dtype=out.dtype).view_as(out).cos()).sum()
        params = [xg, *branch.parameters()]
        g = torch.autograd.grad(loss, params, create_graph=create_graph)
        second = None
        if create_graph:
            second = torch.autograd.grad(sum((v**2).sum() for v in g), params)
        return out.detach(), g, second

    _ReluShifted.forward = staticmethod(spy)
    try:
        out, g, second = grads(create_graph=True)
    finally:
        _ReluShifted.forward = staticmethod(real)
    assert used == [branch[5].bias.item()]  # the post-ReLU bias went through the threshold
    ref_out, ref_g, ref_second = module_by_module(lambda: grads(create_graph=True))
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    for a, b in zip(g + second, ref_g + ref_second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.slow
def test_torch_compile_of_a_fixup_resnet_matches_eager():
    """``torch.compile`` traces the fused Fixup branch (the threshold rewrite, which reads a
    bias as a Python number, steps aside while tracing): same outputs and gradients as eager."""
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    torch.manual_seed(0)
    # float64: the comparison is about the traced graph, not float32 rounding (compiled kernels
    # reassociate sums, which moved a float32 gradient element by 2e-5 on one host)
    net = dl.create_model("resnet", depth=8, scheme="fixup", in_channels=1).double()
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    ref = net(x)
    ref.square().sum().backward()
    ref_grads = [p.grad.clone() for p in net.parameters()]
    net.zero_grad()
    try:
        out = torch.compile(net)(x)
    except Exception as e:  # a toolchain problem of the machine, not of depthlab
        if "Compil" in type(e).__name__ or "compil" in str(e).lower():
            pytest.skip(f"torch.compile unavailable here: {type(e).__name__}")
        raise
    out.square().sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for p, g in zip(net.parameters(), ref_grads, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-10, atol=1e-12)
