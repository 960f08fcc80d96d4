"""A stack of gated linear blocks run as fused autograd nodes (``depthlab.nn.fusion.stack``)
against the module-by-module stack: same outputs and gradients, the saved memory it claims, and
the fallbacks (hooks, ``fuse=False``, double backward)."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
import torch

import depthlab as dl
from depthlab.nn.fusion import stack as fused

CASES = [
    ("rezero", "relu", {}),
    ("skipinit", "tanh", {"alpha_init": 0.3}),
    ("skipinit", "relu", {"alpha_init": 0.7, "learnable": False}),
    ("plain", "linear", {}),
    ("scaled", "relu", {}),
    ("noskip", "tanh", {}),
    ("layernorm", "relu", {}),
    ("layernorm", "tanh", {}),
]


def _model(scheme: str, act: str, opts: dict, depth: int = 9) -> torch.nn.Module:
    torch.manual_seed(0)
    m = dl.create_model(
        "mlp", depth=depth, width=12, in_dim=5, scheme=scheme, activation=act, scheme_options=opts
    ).double()
    with torch.no_grad():  # move off the init (gates 0, zero biases) so every term counts
        for p in m.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return m


def _run(m: torch.nn.Module, x: torch.Tensor):
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = m(x)
    (out.sin() * torch.linspace(-1, 1, out.shape[1], dtype=out.dtype)).sum().backward()
    grads = {n: p.grad for n, p in m.named_parameters()}
    return out.detach(), x.grad, grads, fused.count_fused_nodes(out)


def _assert_fused_equals_modules(m: torch.nn.Module, x: torch.Tensor, module_by_module) -> None:
    """The fused run of ``m`` on ``x`` gives the module-by-module outputs and gradients
    (float64, to 1e-12)."""
    out, gx, grads, nodes = _run(m, x)
    ref_out, ref_gx, ref_grads, ref_nodes = module_by_module(lambda: _run(m, x))
    assert nodes >= 1 and ref_nodes == 0
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        if ref_grads[name] is None:
            assert g is None, name
        else:
            torch.testing.assert_close(g, ref_grads[name], rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("segments", [0, 4])
@pytest.mark.parametrize("scheme,act,opts", CASES)
def test_fused_stack_equals_module_by_module(scheme, act, opts, segments, module_by_module):
    m = _model(scheme, act, opts)
    m.blocks.checkpoint_segments = segments
    _assert_fused_equals_modules(m, torch.randn(6, 5, dtype=torch.float64), module_by_module)
    if "learnable" in opts:  # fixed gates are buffers: nothing to train
        assert all(b.gate.alpha.grad is None for b in m.blocks)


def test_nodes_per_chunk_and_per_segment(monkeypatch):
    m = _model("rezero", "relu", {}, depth=10)
    x = torch.randn(3, 5, dtype=torch.float64)
    monkeypatch.setattr(fused, "CHUNK", 4)
    assert fused.count_fused_nodes(m(x)) == 3  # 4 + 4 + 2 blocks
    m.blocks.checkpoint_segments = 5
    assert fused.count_fused_nodes(m(x)) == 5  # one node per segment of ⌈10/5⌉ blocks


def _saved_activation_floats(m: torch.nn.Module, x: torch.Tensor) -> int:
    """Floats saved for backward by the blocks, parameters not counted."""
    params = {p.data_ptr() for p in m.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        if t.data_ptr() not in params:
            total += t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        m.blocks(x)
    return total


def test_saved_memory_one_activation_per_block_or_one_per_segment():
    depth, width, batch = 12, 12, 6
    m = _model("rezero", "relu", {}, depth=depth)
    x = torch.randn(batch, width, dtype=torch.float64, requires_grad=True)
    # r_i = relu(h_i) per block (autograd also keeps y_i for the gate's gradient)
    assert _saved_activation_floats(m, x) == depth * batch * width
    m.blocks.checkpoint_segments = 3
    assert _saved_activation_floats(m, x) == 3 * batch * width  # the inputs of the 3 segments
    m.blocks.fuse = False
    m.blocks.checkpoint_segments = 0
    assert _saved_activation_floats(m, x) >= 2 * depth * batch * width


def test_hooks_and_switch_fall_back_to_modules():
    m = _model("rezero", "relu", {})
    x = torch.randn(4, 5, dtype=torch.float64)
    assert fused.count_fused_nodes(m(x)) == 1
    seen = []
    h = m.blocks[3].branch[1].register_forward_hook(lambda mod, i, o: seen.append(o.shape))
    assert fused.count_fused_nodes(m(x)) == 0 and seen == [torch.Size([4, 12])]
    h.remove()
    m.blocks.fuse = False
    assert fused.count_fused_nodes(m(x)) == 0
    with torch.no_grad():  # nothing to save: the plain loop
        assert m(x).grad_fn is None


def test_frozen_layers_get_no_gradient():
    m = _model("skipinit", "relu", {"alpha_init": 0.5})
    m.blocks[2].branch[1].weight.requires_grad_(False)
    m.blocks[5].gate.alpha.requires_grad_(False)
    x = torch.randn(4, 5, dtype=torch.float64)
    _, _, grads, nodes = _run(m, x)
    assert nodes == 1
    assert grads["blocks.2.branch.1.weight"] is None and grads["blocks.5.gate.alpha"] is None
    assert grads["blocks.2.branch.1.bias"] is not None and grads["blocks.4.gate.alpha"] is not None


def test_retain_graph_and_double_backward():
    m = _model("rezero", "relu", {})
    x = torch.randn(4, 5, dtype=torch.float64, requires_grad=True)
    out = m(x).square().sum()
    (g1,) = torch.autograd.grad(out, x, retain_graph=True)
    (g2,) = torch.autograd.grad(out, x)
    torch.testing.assert_close(g1, g2, rtol=0, atol=0)
    with pytest.raises(dl.DepthlabError, match="fuse = False"):
        torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    m.blocks.fuse = False  # the documented way out: double backward module by module
    (g,) = torch.autograd.grad(m(x).square().sum(), x, create_graph=True)
    assert g.requires_grad


def test_fused_rezero_mlp_trains_on_random_labels():
    """The fused path trains: a depth-100 ReZero MLP memorises 64 random labels."""
    torch.manual_seed(0)
    m = dl.create_model("mlp", depth=100, width=64, in_dim=16, scheme="rezero")
    x, y = torch.randn(64, 16), torch.randint(0, 10, (64,))
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for _ in range(150):
        opt.zero_grad()
        out = m(x)
        torch.nn.functional.cross_entropy(out, y).backward()
        opt.step()
    assert fused.count_fused_nodes(out) == 2  # 64 + 36 blocks
    assert (m(x).argmax(1) == y).float().mean().item() == 1.0


def test_autocast_and_mixed_dtypes_run_module_by_module():
    m = _model("rezero", "relu", {}).float()
    x = torch.randn(4, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x)
    assert out.dtype == torch.bfloat16 and fused.count_fused_nodes(out) == 0
    out.float().sum().backward()
    assert m.blocks[0].branch[1].weight.grad.dtype == torch.float32
    m.blocks[2].branch[1].double()  # one layer in another dtype: nothing to fuse safely
    h = torch.randn(4, 12, dtype=torch.float64, requires_grad=True)
    assert fused.plan_stack(list(m.blocks), h) is None
    assert fused.plan_stack(list(m.blocks), h.float()) is None  # block 2 is float64
    m.float()
    assert fused.plan_stack(list(m.blocks), h.float()) is not None


def test_stack_on_3d_input_runs_module_by_module(module_by_module):
    """A BlockStack of gated linear blocks applied to (batch, tokens, features) is not fused
    (the fused GEMMs take 2-d inputs) and still gives the module result."""
    m = _model("rezero", "relu", {})
    h = torch.randn(3, 4, 12, dtype=torch.float64)
    out = m.blocks(h)
    assert fused.count_fused_nodes(out) == 0
    torch.testing.assert_close(out, module_by_module(lambda: m.blocks(h)))


@pytest.mark.parametrize("act,scheme", [("linear", "plain"), ("relu", "rezero")])
def test_strided_input_and_expanded_gradient(act, scheme, module_by_module):
    """A transposed (non-contiguous) input and the stride-0 gradient of ``.sum()``."""
    m = _model(scheme, act, {})
    h = torch.randn(12, 4, dtype=torch.float64).t()

    def run():
        m.zero_grad(set_to_none=True)
        x = h.clone().t().contiguous().t().requires_grad_(True)  # same strides as h
        out = m.blocks(x)
        out.sum().backward()
        return (
            out.detach(),
            x.grad,
            [p.grad for p in m.blocks.parameters()],
            fused.count_fused_nodes(out),
        )

    out, gx, grads, nodes = run()
    ref_out, ref_gx, ref_grads, _ = module_by_module(run)
    assert nodes == 1 and not h.is_contiguous()
    torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_forward_mode_ad_runs_module_by_module():
    """Inside ``forward_ad.dual_level`` the stack runs module by module: the JVP is right."""
    import torch.autograd.forward_ad as fwad

    m = _model("rezero", "relu", {})
    h, t = torch.randn(3, 12, dtype=torch.float64), torch.randn(3, 12, dtype=torch.float64)
    with fwad.dual_level():
        out = fwad.unpack_dual(m.blocks(fwad.make_dual(h, t))).tangent
    _, ref = torch.func.jvp(m.blocks, (h,), (t,))
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)


@pytest.fixture
def two_threads():
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(n)


@pytest.mark.parametrize("segments", [0, 4])
@pytest.mark.parametrize("scheme,act,opts", CASES[:3])
def test_gradient_thread_gives_the_inline_gradients(
    scheme, act, opts, segments, two_threads, monkeypatch
):
    """With two torch threads the parameter gradients are computed on the gradient thread (each
    block's jobs really run there) and equal the ones computed in line."""
    m = _model(scheme, act, opts)
    m.blocks.checkpoint_segments = segments
    x = torch.randn(7, 5, dtype=torch.float64)
    monkeypatch.setattr(fused, "GRAD_THREAD", False)
    _, gx_ref, ref, _ = _run(m, x)
    where, real = [], fused._param_grads

    def spy(*job):
        where.append(threading.current_thread().name)
        real(*job)

    monkeypatch.setattr(fused, "GRAD_THREAD", True)
    monkeypatch.setattr(fused, "_param_grads", spy)
    _, gx, grads, _ = _run(m, x)
    assert where == ["depthlab-fused-grads"] * 9
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    for name, g in ref.items():
        if g is None:
            assert grads[name] is None, name
        else:
            torch.testing.assert_close(grads[name], g, rtol=1e-12, atol=1e-12, msg=name)
    assert torch.get_num_threads() == 2  # given back after the backward pass


def test_gradient_thread_error_reaches_the_caller(two_threads, monkeypatch):
    m, x = _model("rezero", "relu", {}), torch.randn(7, 5, dtype=torch.float64)
    _, _, ref, _ = _run(m, x)
    real = fused._param_grads

    def broken(*job):
        raise RuntimeError("boom in the gradient thread")

    monkeypatch.setattr(fused, "_param_grads", broken)
    with pytest.raises(RuntimeError, match="boom in the gradient thread"):
        _run(m, x)
    assert torch.get_num_threads() == 2
    monkeypatch.setattr(fused, "_param_grads", real)  # the thread is free and healthy again
    _, _, grads, _ = _run(m, x)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-12, atol=1e-12, msg=name)


SGD_SETTINGS = [  # momentum, nesterov, dampening, weight decay
    (0.0, False, 0.0, 0.0),
    (0.0, False, 0.0, 0.05),
    (0.9, False, 0.0, 0.05),
    (0.9, True, 0.0, 0.0),
    (0.8, False, 0.3, 0.0),
]


@pytest.mark.parametrize("grad_thread,segments", [(False, 0), (True, 0), (True, 4)])
@pytest.mark.parametrize("mom,nesterov,damp,wd", SGD_SETTINGS)
def test_sgd_in_backward_is_the_optimizer_step(
    mom, nesterov, damp, wd, grad_thread, segments, monkeypatch, two_threads
):
    """Weights stepped inside the backward pass end where ``optimizer.step()`` takes them: three
    steps with a changing learning rate, momentum buffers in ``optimizer.state``, no ``.grad``."""
    from depthlab.train.optim import make_optimizer

    monkeypatch.setattr(fused, "GRAD_THREAD", grad_thread)
    ref, m = (
        _model("skipinit", "tanh", {"alpha_init": 0.3}),
        _model("skipinit", "tanh", {"alpha_init": 0.3}),
    )
    cfg = dl.TrainConfig(lr=0.05, momentum=mom, nesterov=nesterov, weight_decay=wd)
    opt_ref, opt = make_optimizer(ref, cfg), make_optimizer(m, cfg)
    for o in (opt_ref, opt):
        for group in o.param_groups:
            group["dampening"] = damp
    m.blocks.sgd_in_backward = fused.SGDInBackward(opt)
    m.blocks.checkpoint_segments = segments
    x = torch.randn(7, 5, dtype=torch.float64)
    weights = [blk.branch[1].weight for blk in m.blocks]
    for step in range(3):
        for model, o in ((ref, opt_ref), (m, opt)):
            for group in o.param_groups:
                group["lr"] = group["base_lr"] * (1 + step)
            o.zero_grad(set_to_none=True)
            (model(x).sin() * torch.linspace(-1, 1, 10, dtype=x.dtype)).sum().backward()
            if model is m:
                assert all(w.grad is None for w in weights)
                assert m.stem.weight.grad is not None and m.blocks[0].gate.alpha.grad is not None
            o.step()
    for (name, p), q in zip(ref.named_parameters(), m.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-11, atol=1e-12, msg=name)
    if mom:
        ref_w = [blk.branch[1].weight for blk in ref.blocks]
        for w, rw in zip(weights, ref_w):
            torch.testing.assert_close(
                opt.state[w]["momentum_buffer"], opt_ref.state[rw]["momentum_buffer"]
            )


def test_sgd_in_backward_refuses_what_it_cannot_do():
    m = _model("rezero", "relu", {})
    with pytest.raises(dl.DepthlabError, match="torch.optim.SGD"):
        fused.SGDInBackward(torch.optim.Adam(m.parameters()))
    with pytest.raises(dl.DepthlabError, match="maximize"):
        fused.SGDInBackward(torch.optim.SGD(m.parameters(), lr=0.1, maximize=True))
    with pytest.raises(dl.DepthlabError, match="sgd_in_backward"):
        dl.TrainConfig(sgd_in_backward=True, optimizer="adam")
    with pytest.raises(dl.DepthlabError, match="grad_clip"):
        dl.TrainConfig(sgd_in_backward=True, grad_clip=1.0)
    # a weight that already holds a gradient takes the ordinary step (nothing is lost)
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    m.blocks.sgd_in_backward = fused.SGDInBackward(opt)
    w = m.blocks[3].branch[1].weight
    w.grad = torch.ones_like(w)
    before = w.detach().clone()
    x = torch.randn(7, 5, dtype=torch.float64)
    m(x).sum().backward()
    assert w.grad is not None and not torch.equal(w.grad, torch.ones_like(w))
    assert torch.equal(w, before)  # not stepped in the backward pass
    assert m.blocks[2].branch[1].weight.grad is None


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_gradient_thread_is_started_afresh_in_a_forked_child(two_threads):
    """A child forked after the gradient thread started has no such thread: its first fused
    backward starts its own instead of waiting forever on the parent's."""
    m, x = _model("rezero", "relu", {}), torch.randn(7, 5, dtype=torch.float64)
    _, _, ref, _ = _run(m, x)
    assert fused._WORKER
    pid = os.fork()
    if pid == 0:  # the child: exit 0 only if the gradients come out right
        code = 1
        try:
            _, _, grads, _ = _run(m, x)
            ok = all(torch.allclose(grads[k], g, rtol=1e-12, atol=1e-12) for k, g in ref.items())
            code = 0 if ok and fused._WORKER else 3
        finally:
            os._exit(code)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's fused backward hung")


def test_sgd_in_backward_steps_aside_for_a_weight_two_blocks_share():
    """A stack whose blocks share one module (hence one W) gets ordinary gradients, so that W's
    step sees both blocks' contributions."""
    torch.manual_seed(0)
    blk = dl.create_model("mlp", depth=1, width=12, in_dim=5, scheme="skipinit").blocks[0]
    stack = dl.models.common.BlockStack(blk, blk, blk).double()
    with torch.no_grad():
        for p in stack.parameters():
            p.add_(0.2 * torch.randn_like(p))
    opt = torch.optim.SGD(stack.parameters(), lr=0.1)
    stack.sgd_in_backward = fused.SGDInBackward(opt)
    x = torch.randn(6, 12, dtype=torch.float64)
    out = stack(x)
    assert fused.count_fused_nodes(out) == 1
    out.sin().sum().backward()
    w = blk.branch[1].weight
    assert w.grad is not None  # the ordinary gradient, the sum over the three uses
    stack.fuse, ref = False, w.grad.clone()
    w.grad = None
    stack(x).sin().sum().backward()
    torch.testing.assert_close(ref, w.grad, rtol=1e-12, atol=1e-12)


def test_recompute_skips_each_segments_last_gemm(monkeypatch):
    """A checkpointed segment of L blocks recomputes L − 1 blocks (the last block's GEMM only
    made the next segment's input, which is kept); the gradients still equal module by module."""
    m, x = _model("rezero", "tanh", {}, depth=12), torch.randn(7, 5, dtype=torch.float64)
    _, gx_ref, ref, _ = _run(m, x)
    m.blocks.checkpoint_segments = 4
    lengths, real = [], fused._forward

    def spy(blocks, alphas, h, keep):
        lengths.append((len(blocks), keep is not None))
        return real(blocks, alphas, h, keep)

    monkeypatch.setattr(fused, "_forward", spy)
    _, gx, grads, _ = _run(m, x)
    assert lengths == [(3, False)] * 4 + [(2, True)] * 4  # 4 forwards, 4 shorter recomputes
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    for name, g in ref.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-12, atol=1e-12, msg=name)


ACT_MODULES = {"relu": torch.nn.ReLU, "tanh": torch.nn.Tanh, "linear": torch.nn.Identity}


@pytest.mark.parametrize("segments", [0, 2])
@pytest.mark.parametrize("scheme", ["rezero", "scaled", "noskip"])  # skip 1, 1/√2, 0
@pytest.mark.parametrize(
    "pair", [(a, b) for a in ACT_MODULES for b in ACT_MODULES if a != b], ids="-".join
)
def test_mixed_activation_stacks_give_module_by_module_gradients(
    pair, scheme, segments, module_by_module
):
    """Blocks alternating two activations (a linear block's r is the stream itself, so the
    stream must not be updated in place after it): fused outputs and gradients equal the
    module-by-module ones in float64."""
    m = _model(scheme, "relu", {}, depth=7)
    for i, blk in enumerate(m.blocks):
        blk.branch[0] = ACT_MODULES[pair[i % 2]]()
    m.blocks.checkpoint_segments = segments
    _assert_fused_equals_modules(m, torch.randn(6, 5, dtype=torch.float64), module_by_module)


def _layernorm(width: int, affine: str) -> torch.nn.LayerNorm:
    """A float64 LayerNorm with γ and β (``both``), γ only (``weight``) or neither (``none``),
    moved off its init so that every term counts."""
    ln = torch.nn.LayerNorm(
        width, eps=1e-3, elementwise_affine=affine != "none", bias=affine == "both"
    ).double()
    with torch.no_grad():
        for p in ln.parameters():
            p.add_(0.3 * torch.randn_like(p))
    return ln


@pytest.mark.parametrize("segments", [0, 3])
@pytest.mark.parametrize("affine", ["both", "weight", "none"])
@pytest.mark.parametrize("scheme", ["rezero", "scaled", "noskip"])  # gate α; skip 1, 1/√2, 0
def test_pre_layernorm_blocks_give_module_by_module_gradients(
    scheme, affine, segments, module_by_module
):
    """Blocks ``s·x + α·W σ(LayerNorm(x))`` — every other one with the norm, activations
    alternating ReLU/tanh/identity — run fused (γ, β and α all learnable) and give the
    module-by-module outputs and gradients in float64."""
    m = _model(scheme, "relu", {}, depth=8)
    acts = list(ACT_MODULES.values())
    for i, blk in enumerate(m.blocks):
        blk.branch[0] = acts[i % 3]()
        if i % 2 == 0:
            blk.branch.insert(0, _layernorm(12, affine))
    m.blocks.checkpoint_segments = segments
    _assert_fused_equals_modules(m, torch.randn(6, 5, dtype=torch.float64), module_by_module)


def test_layernorm_over_other_features_runs_module_by_module():
    """A LayerNorm that does not normalize the block's input features alone (here over a
    wider shape: it would fail) keeps the stack module by module; one of the right shape is
    fused."""
    m = _model("rezero", "relu", {}, depth=3)
    x = torch.randn(4, 5, dtype=torch.float64)
    m.blocks[1].branch.insert(0, torch.nn.LayerNorm(12, elementwise_affine=False).double())
    assert fused.count_fused_nodes(m(x)) == 1
    m.blocks[1].branch[0].normalized_shape = (1, 12)
    with pytest.raises(RuntimeError):  # module by module: torch's own shape error
        m(x)


@pytest.mark.parametrize("segments", [0, 2])
def test_layernorm_mlp_gradient_thread_and_sgd_in_backward(segments, two_threads):
    """The ``layernorm`` MLP on two threads (gradient thread) with SGD in the backward pass:
    the same parameters after two steps as module by module with the plain optimizer."""
    x, y = torch.randn(8, 5, dtype=torch.float64), torch.randint(0, 10, (8,))

    def train(fuse: bool) -> dict:
        m = _model("layernorm", "relu", {}, depth=6)
        m.blocks.checkpoint_segments = segments
        m.blocks.fuse = fuse
        opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-3)
        if fuse:
            m.blocks.sgd_in_backward = fused.SGDInBackward(opt)
        for _ in range(2):
            opt.zero_grad(set_to_none=True)
            out = m(x)
            assert fused.count_fused_nodes(out) == ((segments or 1) if fuse else 0)
            torch.nn.functional.cross_entropy(out, y).backward()
            opt.step()
        return {n: p.detach().clone() for n, p in m.named_parameters()}

    got, ref = train(True), train(False)
    for name, p in ref.items():
        torch.testing.assert_close(got[name], p, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("segments", [0, 3])
def test_blocks_without_bias_or_gate_in_one_node(segments, module_by_module):
    """A node mixing blocks with and without a bias and with and without a gate: the fused
    outputs and gradients equal module by module in float64."""
    m = _model("rezero", "relu", {}, depth=8)
    for i, blk in enumerate(m.blocks):
        if i % 2:
            blk.branch[-1].register_parameter("bias", None)
        if i % 3 == 2:
            blk.gate = None
    m.blocks.checkpoint_segments = segments
    _assert_fused_equals_modules(m, torch.randn(6, 5, dtype=torch.float64), module_by_module)
    assert sum(b.gate is None for b in m.blocks) == 2
