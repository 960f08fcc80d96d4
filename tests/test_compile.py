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
