"""The Transformer paths compile as one graph: ``torch.compile(..., fullgraph=True)`` of a ReZero
encoder stack in torch's own container and of ``transformer-lm`` matches eager (outputs and
gradients). ``aot_eager`` checks the capture without a C++ compiler; the inductor run (slow)
needs one."""

from __future__ import annotations

import shutil

import pytest
import torch

import depthlab as dl


def _models():
    torch.manual_seed(0)
    layer = dl.nn.ReZeroEncoderLayer(32, 4, dropout=0.0, batch_first=True)
    with torch.no_grad():
        for m in layer.modules():
            if hasattr(m, "alpha"):
                m.alpha.fill_(0.3)  # not the identity: the attention and FF paths count
    enc = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    lm = dl.create_model("transformer-lm", depth=2, d_model=32, nhead=4, context=16,
                         scheme="prenorm")  # fmt: skip
    return [(enc, torch.randn(2, 16, 32)), (lm, torch.randint(0, 256, (2, 16)))]


def _check(backend: str) -> None:
    for model, x in _models():
        torch._dynamo.reset()
        compiled = torch.compile(model, fullgraph=True, backend=backend)
        ref = model(x)
        out = compiled(x)
        torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
        g_ref = torch.autograd.grad(ref.square().mean(), list(model.parameters()))
        g_out = torch.autograd.grad(compiled(x).square().mean(), list(model.parameters()))
        for a, b in zip(g_out, g_ref, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_transformer_paths_compile_as_one_graph():
    _check("aot_eager")


@pytest.mark.slow
def test_transformer_paths_compile_with_inductor():
    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        pytest.skip("inductor needs a C++ compiler; none on PATH")
    _check("inductor")


@pytest.mark.parametrize("scheme", ["batchnorm", "fixup", "skipinit"])
def test_compiling_each_block_compiles_one_graph_per_block_shape(scheme):
    """Regional compilation (``block.compile()`` for every block of a ResNet) traces one graph
    per block shape, shared by the blocks of a stage — the eager path's per-branch caches, keyed
    on module identity, step aside while Dynamo traces (else every block is a recompilation, and
    past Dynamo's limit of 8 the rest run uncompiled) — and matches eager (outputs, gradients)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    torch.manual_seed(0)
    variant = "postact" if scheme == "fixup" else "preact"
    net = dl.create_model("resnet", depth=44, scheme=scheme, in_channels=1, variant=variant)
    with torch.no_grad():
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))  # the zero-initialised branches count
    x = torch.randn(4, 1, 8, 8)
    ref = net(x)
    g_ref = torch.autograd.grad(ref.square().mean(), list(net.parameters()))
    counter = CompileCounterWithBackend("aot_eager")
    blocks = list(net.blocks)
    assert len(blocks) == 21
    for block in blocks:
        block.compile(backend=counter)
    out = net(x)
    g_out = torch.autograd.grad(out.square().mean(), list(net.parameters()))
    # 16 channels; the first block of each later stage (downsampling); the others of each stage
    assert 1 <= counter.frame_count <= 5
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
