"""The scheme protocol: NF-ResNet and Admin as registered classes, a toy scheme defined here that
builds every model, the weight-layer factory, the skip module and BlockInfo."""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depthlab as dl
from depthlab.models import TransformerBlock
from depthlab.nn import residual_blocks, weight_layers
from depthlab.nn.scalars import FeatureScale, Scale
from depthlab.nn.ws import WSConv2d, WSLinear, activation_gain
from depthlab.schemes import Admin, BlockInfo, Scheme

ROOT = Path(dl.__file__).parent


def _block_inputs(model: nn.Module, *x) -> list[float]:
    """The variance of every residual block's input in one forward pass."""
    seen: list[float] = []
    hooks = [
        b.register_forward_pre_hook(lambda m, i: seen.append(float(i[0].double().var())))
        for b in residual_blocks(model)
    ]
    try:
        with torch.no_grad():
            model(*x)
    finally:
        for h in hooks:
            h.remove()
    return seen


# -- scaled weight standardization --------------------------------------------------------


def test_relu_gain_is_the_closed_form():
    assert activation_gain("relu") == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-10)
    assert activation_gain(None) == activation_gain("linear") == 1.0
    # tanh against a Monte-Carlo estimate of 1/std(tanh(z))
    z = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert activation_gain("tanh") == pytest.approx(float(1 / torch.tanh(z).std()), rel=2e-3)


@pytest.mark.parametrize("layer", ["linear", "conv"])
def test_standardized_weight_is_the_formula(layer):
    torch.manual_seed(0)
    gamma = activation_gain("relu")
    m = WSLinear(12, 5, gamma=gamma) if layer == "linear" else WSConv2d(4, 5, 3, gamma=gamma)
    with torch.no_grad():
        m.weight.normal_(0.3, 2.0)
        m.gain.copy_(torch.linspace(0.5, 2.0, 5))
    w = m.weight.detach().double().flatten(1)
    n = w.shape[1]
    ref = (w - w.mean(1, keepdim=True)) / (w.std(1, unbiased=False, keepdim=True) * math.sqrt(n))
    ref = ref * gamma * m.gain.detach().double()[:, None]
    got = m.standardized_weight().detach().double().flatten(1)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.sum(1), torch.zeros(5, dtype=torch.float64), atol=1e-5)
    x = torch.randn(3, 12) if layer == "linear" else torch.randn(2, 4, 6, 6)
    want = (
        F.linear(x, m.standardized_weight(), m.bias)
        if layer == "linear"
        else F.conv2d(x, m.standardized_weight(), m.bias)
    )
    torch.testing.assert_close(m(x), want)
    m(x).sum().backward()
    assert m.gain.grad is not None and m.weight.grad is not None


# -- NF-ResNet ---------------------------------------------------------------------------------


NF_MODELS = [
    ("mlp", dict(depth=24, width=256, in_dim=64), lambda: (torch.randn(512, 64),), 0.05),
    ("resnet", dict(depth=20, in_channels=3), lambda: (torch.randn(32, 3, 32, 32),), 0.10),
    # one-token sequences: attention is then v_proj → out_proj, which keeps unit variance
    (
        "transformer-lm",
        dict(depth=6, d_model=64, nhead=4, context=16),
        lambda: (torch.randint(0, 256, (512, 1)),),
        0.10,
    ),
]


@pytest.mark.parametrize(("name", "kw", "inputs", "rtol"), NF_MODELS, ids=lambda v: str(v)[:14])
def test_nf_expected_variance_matches_the_measured_one(name, kw, inputs, rtol):
    torch.manual_seed(0)
    m = dl.create_model(name, scheme="nf", **kw)
    expected = m.scheme.expected_variances(m)
    measured = _block_inputs(m, *inputs())
    assert len(expected) == len(measured) == len(residual_blocks(m))
    assert max(expected) > 1.1  # the track grows: a constant 1 would not test it
    for e, g in zip(expected, measured, strict=True):
        assert g == pytest.approx(e, rel=rtol)


def test_nf_track_and_beta_scaled_shortcut():
    m = dl.create_model("resnet", scheme="nf", scheme_options={"alpha": 0.5}, depth=14)
    blocks = residual_blocks(m)
    var = m.scheme.expected_variances(m)
    assert var[0] == 1.0
    for i, blk in enumerate(blocks):
        inv_beta = float(blk.branch[0].alpha)
        assert inv_beta == pytest.approx(1 / math.sqrt(var[i]))
        assert float(blk.gate.alpha) == 0.5 and not blk.gate.learnable
        if blk.shortcut is not None:  # a transition: the shortcut reads h/β too; reset to 1+α²
            assert float(blk.shortcut[0].alpha) == pytest.approx(inv_beta)
            assert isinstance(blk.shortcut[1], WSConv2d)
        if i + 1 < len(blocks):
            base = 1.0 if blk.shortcut is not None else var[i]
            assert var[i + 1] == pytest.approx(base + 0.25)
    assert any(b.shortcut is not None for b in blocks)
    norms = (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm)
    assert not any(isinstance(x, norms) for x in m.modules())
    convs = [x for x in m.modules() if isinstance(x, nn.Conv2d)]
    assert convs and all(isinstance(x, WSConv2d) for x in convs)


def test_nf_trains():
    torch.manual_seed(0)
    m = dl.create_model("mlp", scheme="nf", depth=16, width=64)
    x, y = torch.randn(128, 64), torch.randint(0, 10, (128,))
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    first = None
    for _ in range(40):
        loss = F.cross_entropy(m(x), y)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


def test_nf_is_refused_by_convert_of_a_foreign_model():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
            self.conv2, self.bn2 = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)

    net = nn.Sequential(Block())
    with pytest.raises(dl.DepthlabError, match="builds its own weight layers"):
        dl.convert(net, "nf")
    # a depthlab model is rebuilt under the scheme, layers and all
    new = dl.convert(dl.create_model("mlp", depth=3, width=16), "nf")
    assert all(isinstance(x, WSLinear) for x in weight_layers(new.blocks))


# -- Admin -------------------------------------------------------------------------------------


def _seq2seq():
    return dl.TransformerSeq2Seq(
        encoder_layers=2, decoder_layers=2, d_model=32, nhead=2, context=16, scheme="admin"
    )


ADMIN_MODELS = [
    ("mlp", lambda: dl.create_model("mlp", scheme="admin", depth=6, width=32)),
    ("resnet", lambda: dl.create_model("resnet", scheme="admin", depth=14, in_channels=1)),
    (
        "transformer-lm",
        lambda: dl.create_model(
            "transformer-lm", scheme="admin", depth=3, d_model=32, nhead=2, context=16
        ),
    ),
    ("seq2seq", _seq2seq),
]


@pytest.mark.parametrize(("name", "build"), ADMIN_MODELS, ids=[m[0] for m in ADMIN_MODELS])
def test_admin_omega_is_the_profiling_rule(name, build):
    """ω_1 = 1 and ω_{i+1} = √(Var[ω_i ⊙ x_{i-1}] + Var[f_i(x_{i-1})]) in forward order (each
    stack of an encoder–decoder from 1), recomputed here from the block inputs and branch
    outputs of a forward pass on the same example batch."""
    torch.manual_seed(0)
    m = build()
    blocks = residual_blocks(m)
    assert all(isinstance(b.skip_scale, FeatureScale) for b in blocks)
    assert all(isinstance(b.skip_scale.omega, nn.Parameter) for b in blocks)
    ins, outs = {}, {}
    hooks = [b.register_forward_pre_hook(lambda mod, i: ins.__setitem__(mod, i[0])) for b in blocks]
    hooks += [
        b.branch.register_forward_hook(lambda mod, i, o, b=b: outs.__setitem__(b, o))
        for b in blocks
    ]
    x = m.example_input()
    with torch.no_grad():
        m(*x) if isinstance(x, tuple) else m(x)
    for h in hooks:
        h.remove()
    prev_role, expect = object(), None
    for b in blocks:
        omega = b.skip_scale.omega.detach()
        assert torch.all(omega == omega[0])  # one value per block, on every feature
        role = None if b.stack is None else b.stack.role
        if role != prev_role:
            expect, prev_role = 1.0, role
        assert float(omega[0]) == pytest.approx(expect, rel=1e-5)
        with torch.no_grad():
            u = b.skip(ins[b]).double()  # the skip path (a projection where shapes change)
        w = omega.double()
        w = w.view(-1, 1, 1) if u.dim() == 4 else w  # channels, or the last dim
        skip_var = (u * w).var(unbiased=False)
        expect = float(torch.sqrt(skip_var + outs[b].double().var(unbiased=False)))
    assert len({round(float(b.skip_scale.omega.detach()[0]), 4) for b in blocks}) > 2


def test_admin_options_and_errors():
    m = dl.create_model("mlp", scheme="admin", depth=3, width=8, scheme_options={"omega": 2.0})
    assert all(float(b.skip_scale.omega[0]) == 2.0 for b in residual_blocks(m))
    fixed = dl.create_model("mlp", scheme="admin", depth=3, scheme_options={"learnable": False})
    assert not any("omega" in k for k, _ in fixed.named_parameters())
    assert any("omega" in k for k, _ in fixed.named_buffers())
    with pytest.raises(dl.DepthlabError, match="placement"):
        dl.get_scheme("admin", placement="pre")
    with pytest.raises(dl.DepthlabError, match="omega"):
        dl.get_scheme("admin", omega=-1.0)

    class NoExample(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.Sequential(
                dl.get_scheme("admin").residual(nn.Linear(4, 4), 4, "features", 1)
            )

        def forward(self, x):
            return self.blocks(x)

    net = NoExample()
    with pytest.raises(dl.DepthlabError, match="Admin.profile"):
        dl.get_scheme("admin").initialize(net)
    omegas = Admin.profile(net, torch.randn(16, 4))  # the documented way: your own batch
    assert omegas == [1.0]


def test_admin_omega_learns():
    torch.manual_seed(0)
    m = dl.create_model("mlp", scheme="admin", depth=4, width=16)
    F.cross_entropy(m(torch.randn(8, 64)), torch.randint(0, 10, (8,))).backward()
    grads = [b.skip_scale.omega.grad for b in residual_blocks(m)]
    assert all(g is not None and g.shape == (16,) and torch.any(g != 0) for g in grads)


# -- the skip module and BlockInfo -------------------------------------------------------------


def test_constant_skips_are_scale_modules():
    for name, mult in [("plain", 1.0), ("noskip", 0.0), ("scaled", 1 / math.sqrt(2))]:
        m = dl.create_model("mlp", scheme=name, depth=3, width=8)
        for b in residual_blocks(m):
            assert type(b.skip_scale) is Scale and b.skip_mult == pytest.approx(mult)
    dn = dl.create_model("mlp", scheme="deepnorm", depth=4, width=8)
    assert residual_blocks(dn)[0].skip_mult == pytest.approx(4**0.25)
    ad = dl.create_model("mlp", scheme="admin", depth=2, width=8)
    assert residual_blocks(ad)[0].skip_mult is None  # not a constant


def test_block_info_places_every_block():
    m = dl.create_model("resnet", depth=20, scheme="fixup")
    infos = [b.info for b in residual_blocks(m)]
    assert [i.index for i in infos] == list(range(9))
    assert [i.stage for i in infos] == [0] * 3 + [1] * 3 + [2] * 3
    assert {(i.num_blocks, i.m, i.gain) for i in infos} == {(9, 2, math.sqrt(2.0))}
    lm = dl.create_model("transformer-lm", depth=3, d_model=32, nhead=2, context=8)
    infos = [b.info for b in residual_blocks(lm)]
    assert [i.index for i in infos] == list(range(6))
    assert [i.m for i in infos] == [4, 2] * 3 and [i.gain for i in infos] == [1.0, 2**0.5] * 3
    s2s = dl.TransformerSeq2Seq(encoder_layers=1, decoder_layers=2, d_model=16, nhead=2, context=8)
    assert [b.info.index for b in residual_blocks(s2s)] == list(range(2 + 6))


# -- a toy scheme, defined outside the package -------------------------------------------------


class ToyLinear(nn.Linear):
    pass


class ToyConv(nn.Conv2d):
    pass


class ToySkip(nn.Module):
    """A learnable scalar on the skip path."""

    def __init__(self):
        super().__init__()
        self.c = nn.Parameter(torch.empty(()))
        self.reset_parameters()

    def reset_parameters(self):  # models are built on the meta device, then reset
        with torch.no_grad():
            self.c.fill_(0.9)

    def forward(self, x):
        return self.c * x


@dataclass
class Toy(Scheme):
    """Half-gated blocks with a learnable skip scalar and its own weight layers."""

    name: ClassVar[str] = "toy"
    half: float = 0.5

    def gate(self, num_blocks):
        return dl.nn.Gate(self.half, learnable=False)

    def skip(self, num_features, layout, info):
        return ToySkip()

    def linear(self, in_features, out_features, *, bias=None, act=None):
        return ToyLinear(in_features, out_features, bias=self.layer_bias if bias is None else bias)

    def conv(self, c_in, c_out, kernel_size, *, stride=1, padding=0, bias=None, act=None):
        b = self.layer_bias if bias is None else bias
        return ToyConv(c_in, c_out, kernel_size, stride=stride, padding=padding, bias=b)

    def initialize(self, model):
        self.seen = [b.info.index for b in residual_blocks(model)]


TOY_MODELS = [
    ("mlp", lambda s: dl.create_model("mlp", scheme=s, depth=3, width=16), (4, 64)),
    ("linear", lambda s: dl.create_model("linear", scheme=s, depth=3, width=8), (4, 8)),
    ("resnet", lambda s: dl.create_model("resnet", scheme=s, depth=14), (2, 3, 16, 16)),
    (
        "resnet-bottleneck",
        lambda s: dl.create_model(
            "resnet-bottleneck", scheme=s, depth=26, base_width=8, stem="cifar", num_classes=10
        ),
        (2, 3, 16, 16),
    ),
    (
        "transformer-lm",
        lambda s: dl.create_model("transformer-lm", scheme=s, depth=2, d_model=16, nhead=2),
        "tokens",
    ),
    (
        "seq2seq",
        lambda s: dl.TransformerSeq2Seq(
            encoder_layers=1, decoder_layers=1, d_model=16, nhead=2, context=8, scheme=s
        ),
        "pair",
    ),
    ("block", lambda s: TransformerBlock(16, 2, scheme=s), (2, 5, 16)),
]


@pytest.mark.parametrize(("name", "build", "shape"), TOY_MODELS, ids=[m[0] for m in TOY_MODELS])
def test_a_toy_scheme_builds_every_model(name, build, shape):
    torch.manual_seed(0)
    scheme = Toy()
    m = build(scheme)
    blocks = residual_blocks(m)
    assert blocks and all(type(b.skip_scale) is ToySkip for b in blocks)
    assert all(float(b.gate.alpha) == 0.5 for b in blocks)
    for b in blocks:  # every weight layer of every block is the scheme's
        assert all(type(x) in (ToyLinear, ToyConv) for x in weight_layers(b))
    if name != "block":
        assert m.scheme.seen == list(range(len(blocks)))
    if shape == "tokens":
        x = (torch.randint(0, 256, (2, 6)),)
    elif shape == "pair":
        x = (torch.randint(0, 256, (2, 6)), torch.randint(0, 256, (2, 5)))
    else:
        x = (torch.randn(*shape),)
    out = m(*x)
    out.float().pow(2).mean().backward()
    assert torch.isfinite(out).all()
    assert all(b.skip_scale.c.grad is not None for b in blocks)


# -- no scheme-name tests outside the schemes ------------------------------------------------


def test_no_code_outside_schemes_tests_a_scheme_name_or_reads_scheme_attributes():
    bad = []
    names = "|".join(dl.list_schemes())
    pattern = re.compile(
        r"scheme\.name\s*(==|!=|\bin\b)|\.name\s*==\s*[\"'](?:" + names + r")[\"']"
    )
    convention = re.compile(r"getattr\([^)]*[\"'](init_gain|deepnorm_layers|fixup_layers)[\"']")
    for path in sorted(ROOT.rglob("*.py")):
        if path.name == "schemes.py":
            continue
        text = path.read_text(encoding="utf-8")
        ast.parse(text)
        for n, line in enumerate(text.splitlines(), 1):
            if pattern.search(line) or convention.search(line):
                bad.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    schemes_src = (ROOT / "schemes.py").read_text(encoding="utf-8")
    assert not convention.search(schemes_src)
    assert not bad, "\n".join(bad)


def test_block_info_is_frozen_and_complete():
    info = BlockInfo(index=3, num_blocks=10, stage=1, m=2, gain=1.0)
    with pytest.raises(AttributeError):
        info.index = 4
    assert info.stack is None
