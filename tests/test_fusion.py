"""The one fusion boundary: ``depthlab.nn.fusion(enabled)`` turns every fused path off and back
on, branch plans are made once per structure and cached, SGD in the backward pass is a context
manager, and the fused paths equal the module-by-module reference in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depthlab as dl
from depthlab.nn import Branch, Residual, fusion
from depthlab.nn.fusion import branch as fusion_branch
from depthlab.nn.fusion.stack import count_fused_nodes


def test_the_switch_turns_every_fused_path_off_and_restores_it():
    m = dl.create_model("mlp", scheme="rezero", depth=6, width=16)
    x = torch.randn(4, 64)
    assert fusion.enabled() and count_fused_nodes(m(x)) > 0
    with dl.nn.fusion(False):
        assert not fusion.enabled()
        assert count_fused_nodes(m(x)) == 0
        with dl.nn.fusion(True):
            assert count_fused_nodes(m(x)) > 0
        assert not fusion.enabled()
    assert fusion.enabled()
    with pytest.raises(RuntimeError), dl.nn.fusion(False):  # restored on errors too
        raise RuntimeError
    assert fusion.enabled()


def test_attention_projections_run_as_modules_when_fusion_is_off():
    attn = dl.nn.MultiHeadAttention(16, 2)
    calls = []
    real = F.linear

    def spy(x, w, b=None):
        calls.append(w.shape[0])
        return real(x, w, b)

    x = torch.randn(2, 5, 16)
    F.linear = spy
    try:
        attn(x)
        fused = list(calls)
        calls.clear()
        with dl.nn.fusion(False):
            attn(x)
    finally:
        F.linear = real
    assert 48 in fused  # q, k, v as one product
    assert 48 not in calls and calls.count(16) == 4


def test_branch_plan_is_made_once_and_replanned_when_the_modules_change():
    s = dl.get_scheme("fixup")
    conv = [nn.Conv2d(4, 4, 3, padding=1, bias=False) for _ in range(2)]
    br = Branch(s.bias(), conv[0], s.bias(), nn.ReLU(), s.bias(), conv[1], s.scale(), s.bias())
    x = torch.randn(2, 4, 6, 6)
    br(x)
    key, plan = br.__dict__["_fusion_plan"]
    br(x)
    assert br.__dict__["_fusion_plan"][1] is plan  # cached
    kinds = [type(step).__name__ for step in plan]
    assert kinds == ["Call", "Layer", "Layer"]  # bias; conv+bias+relu+bias (shift); conv+scalars
    assert plan[1].shift_stop == 5 and plan[2].last
    br.append(nn.ReLU())
    br(x)
    assert br.__dict__["_fusion_plan"][1] is not plan
    assert type(br.__dict__["_fusion_plan"][1][-1]).__name__ == "Call"


@pytest.mark.parametrize(
    ("model", "kw", "shape"),
    [
        ("resnet", dict(depth=14, scheme="fixup", in_channels=1), (4, 1, 8, 8)),
        ("resnet-bottleneck", dict(depth=26, scheme="fixup", base_width=8, stem="cifar"),
         (2, 3, 8, 8)),
        ("mlp", dict(depth=5, scheme="fixup", width=12), (4, 64)),
        ("mlp", dict(depth=5, scheme="skipinit", width=12, activation="tanh"), (4, 64)),
        ("transformer-lm", dict(depth=2, scheme="rezero", d_model=16, nhead=2), "tokens"),
    ],
)  # fmt: skip
def test_fused_paths_equal_the_module_by_module_reference(model, kw, shape):
    torch.manual_seed(0)
    m = dl.create_model(model, **kw).double()
    with torch.no_grad():  # move every scalar off its init so each rewrite matters
        for name, p in m.named_parameters():
            if p.dim() == 0:
                p.uniform_(0.3, 1.2) if "alpha" in name else p.uniform_(-0.3, 0.3)
        if m.classifier is not None:
            m.classifier.weight.normal_(0, 0.1)
        for b in dl.residual_blocks(m):  # zero-init last layers: give them weights
            layers = dl.nn.weight_layers(b.branch)
            layers[-1].weight.normal_(0, 0.1)
    x = torch.randint(0, 256, (2, 6)) if shape == "tokens" else torch.randn(*shape).double()

    def run():
        m.zero_grad(set_to_none=True)
        out = m(x)
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    fused_out, fused_grads = run()
    with dl.nn.fusion(False):
        ref_out, ref_grads = run()
    torch.testing.assert_close(fused_out, ref_out, rtol=1e-12, atol=1e-12)
    for name, g in ref_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=1e-10, atol=1e-12, msg=name)


def test_sgd_in_backward_context_manager_is_the_optimizer_step():
    torch.manual_seed(0)
    m = dl.create_model("mlp", scheme="rezero", depth=6, width=16).double()
    with torch.no_grad():
        for b in dl.residual_blocks(m):
            b.gate.alpha.fill_(0.5)
    ref = dl.create_model("mlp", scheme="rezero", depth=6, width=16).double()
    ref.load_state_dict(m.state_dict())
    x, y = torch.randn(8, 64, dtype=torch.float64), torch.randint(0, 10, (8,))
    opt = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    for _ in range(3):
        with dl.nn.fusion.sgd_in_backward(m.blocks, opt) as step:
            assert m.blocks.sgd_in_backward is step
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
        assert m.blocks.sgd_in_backward is None
        opt.step()
        ref_opt.zero_grad(set_to_none=True)
        F.cross_entropy(ref(x), y).backward()
        ref_opt.step()
    for (name, p), q in zip(m.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12, msg=name)
    with dl.nn.fusion.sgd_in_backward(m.blocks, None) as nothing:
        assert nothing is None and m.blocks.sgd_in_backward is None


def test_a_hooked_residual_is_never_folded():
    blk = Residual(Branch(nn.ReLU(), nn.Linear(4, 4)), gate=dl.nn.Gate(0.5))
    seen = []
    blk.branch[1].register_forward_hook(lambda mod, i, o: seen.append(o.detach().clone()))
    x = torch.randn(3, 4)
    out = blk(x)
    assert len(seen) == 1  # the layer was called (and its hook saw the ungated output)
    torch.testing.assert_close(out, x + 0.5 * seen[0])
    assert fusion_branch.FUSABLE[0] is nn.Linear
