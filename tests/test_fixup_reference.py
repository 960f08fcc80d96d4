"""Fixup's networks equal the reference code's (github.com/hongyi-zhang/Fixup): the
post-activation CIFAR ResNet with option-A shortcuts and the bottleneck ResNet, scalar for
scalar, and the reference's fan-out init. The reference forward pass is re-derived here as plain
tensor code from the paper's Fig. and the reference's layer order, independent of depthlab's
module structure, and fed depthlab's own parameters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depthlab as dl
from depthlab.models.resnet import Shortcut
from depthlab.nn.residual import residual_blocks


def _params(block) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """(convs, scalar biases in order, scale) of one depthlab Fixup block's branch."""
    convs = [m for m in block.branch if isinstance(m, nn.Conv2d)]
    biases = [m.bias for m in block.branch if isinstance(m, dl.Bias)]
    (scale,) = [m.alpha for m in block.branch if isinstance(m, dl.Gate)]
    return convs, biases, scale


def _reference_cifar(model, x: torch.Tensor) -> torch.Tensor:
    """Fixup's CIFAR ResNet as written in its reference code: ``relu(conv1(x) + bias1)``; per
    block ``out = relu(conv1(x + b1a) + b1b); out = conv2(out + b2a)·scale + b2b``; identity
    ``x``, or for a downsampling block ``x + b1a`` subsampled by AvgPool2d(1, 2) and
    zero-padded to twice the channels; ``relu(out + identity)``; then ``fc(pool(x) + bias2)``."""
    stem_conv, stem_bias = model.stem[0], model.stem[1].bias
    x = F.relu(F.conv2d(x, stem_conv.weight, padding=1) + stem_bias)
    for blk in residual_blocks(model):
        (c1, c2), (b1a, b1b, b2a, b2b), scale = _params(blk)
        out = F.relu(F.conv2d(x + b1a, c1.weight, stride=c1.stride, padding=1) + b1b)
        out = F.conv2d(out + b2a, c2.weight, padding=1) * scale + b2b
        identity = x
        if c1.stride != (1, 1):
            identity = F.avg_pool2d(x + b1a, 1, stride=2)
            identity = torch.cat((identity, torch.zeros_like(identity)), 1)
        x = F.relu(out + identity)
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)
    (head_bias,) = [m.bias for m in model.head if isinstance(m, dl.Bias)]
    return F.linear(x + head_bias, model.classifier.weight, model.classifier.bias)


def _reference_bottleneck(model, x: torch.Tensor) -> torch.Tensor:
    """Fixup's ImageNet bottleneck block (its reference code; here with a 3×3 stem):
    ``relu(conv1(x+b1a)+b1b)``, ``relu(conv2(·+b2a)+b2b)`` (strided), ``conv3(·+b3a)·scale+b3b``,
    identity ``x`` or ``downsample(x + b1a)`` (a strided 1×1 conv), ``relu(out + identity)``."""
    stem_conv, stem_bias = model.stem[0], model.stem[1].bias
    x = F.relu(F.conv2d(x, stem_conv.weight, padding=1) + stem_bias)
    for blk in residual_blocks(model):
        (c1, c2, c3), (b1a, b1b, b2a, b2b, b3a, b3b), scale = _params(blk)
        out = F.relu(F.conv2d(x + b1a, c1.weight) + b1b)
        out = F.relu(F.conv2d(out + b2a, c2.weight, stride=c2.stride, padding=1) + b2b)
        out = F.conv2d(out + b3a, c3.weight) * scale + b3b
        identity = x
        if blk.shortcut is not None:
            ds = blk.shortcut.conv
            identity = F.conv2d(x + b1a, ds.weight, stride=ds.stride)
        x = F.relu(out + identity)
    x = F.adaptive_avg_pool2d(x, 1).flatten(1)
    (head_bias,) = [m.bias for m in model.head if isinstance(m, dl.Bias)]
    return F.linear(x + head_bias, model.classifier.weight, model.classifier.bias)


def _perturb(model: nn.Module) -> None:
    """Every parameter (zero-initialised ones included) to a random non-zero value."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g, dtype=p.dtype))


def test_fixup_resnet110_has_the_reference_parameter_count():
    """1,720,138 parameters: convs 1,718,784 + stem 432 + fc 650 + 54 blocks × 5 scalars +
    the stem's and the head's scalar biases (the reference's fixup_resnet110)."""
    net = dl.create_model("resnet", depth=110, scheme="fixup")
    assert net.variant == "postact"
    assert sum(p.numel() for p in net.parameters()) == 1_720_138
    # the pre-activation variant has projection shortcuts and no stem bias: a different net
    pre = dl.create_model("resnet", depth=110, scheme="fixup", variant="preact")
    assert sum(p.numel() for p in pre.parameters()) != 1_720_138


def test_fixup_resnet50_has_the_reference_parameter_count():
    """torchvision's ResNet-50 without BN (25,503,912) + 16 blocks × 7 scalars + 2."""
    net = dl.create_model("resnet-bottleneck", depth=50, scheme="fixup")
    assert sum(p.numel() for p in net.parameters()) == 25_503_912 + 16 * 7 + 2


@pytest.mark.parametrize("depth", [8, 20])
def test_fixup_cifar_resnet_computes_the_reference_forward(depth):
    torch.manual_seed(0)
    net = dl.create_model("resnet", depth=depth, scheme="fixup").double()
    _perturb(net)
    x = torch.randn(3, 3, 16, 16, dtype=torch.float64)
    torch.testing.assert_close(net(x), _reference_cifar(net, x), rtol=1e-12, atol=1e-12)


def test_fixup_bottleneck_resnet_computes_the_reference_forward():
    torch.manual_seed(0)
    net = dl.create_model(
        "resnet-bottleneck", depth=26, scheme="fixup", stem="cifar", base_width=4, num_classes=5
    ).double()
    _perturb(net)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    torch.testing.assert_close(net(x), _reference_bottleneck(net, x), rtol=1e-12, atol=1e-12)


def test_postact_blocks_apply_relu_after_the_sum_and_option_a_shortcuts():
    net = dl.create_model("resnet", depth=20, scheme="fixup")
    blocks = residual_blocks(net)
    assert all(isinstance(b.post, nn.ReLU) for b in blocks)
    shortcuts = [b.shortcut for b in blocks if b.shortcut is not None]
    assert len(shortcuts) == 2 and all(isinstance(s, Shortcut) for s in shortcuts)
    assert all(s.kind == "pad" and not list(s.parameters()) for s in shortcuts)
    # the shortcut reads the branch's first scalar bias, which is registered once only
    blk = next(b for b in blocks if b.shortcut is not None)
    names = [n for n, p in net.named_parameters() if p is blk.branch[0].bias]
    assert len(names) == 1
    x = torch.rand(2, 16, 8, 8)
    with torch.no_grad():
        blk.branch[0].bias.fill_(0.5)
        y = blk.shortcut(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2] + 0.5) and not y[:, 16:].any()


def test_fixup_reference_init_std_per_layer():
    """Branch conv1: He from the fan-out × L^(-1/2) (so 1/√2 of the fan-in value at a stage
    transition c→2c); conv2 and the classifier zero; the stem He from the fan-out."""
    torch.manual_seed(0)
    net = dl.create_model("resnet", depth=56, scheme="fixup", width=2)  # 16 → 32 → 64 → 128
    blocks = residual_blocks(net)
    L = len(blocks)
    transitions = []
    for blk in blocks:
        (c1, c2), _, _ = _params(blk)
        target = math.sqrt(2.0 / (c1.out_channels * 9)) * L**-0.5
        assert abs(c1.weight.std().item() / target - 1) < 0.03
        assert not c2.weight.any()
        if c1.in_channels != c1.out_channels:
            fan_in_std = math.sqrt(2.0 / (c1.in_channels * 9)) * L**-0.5
            transitions.append(c1.weight.std().item() / fan_in_std)
    assert len(transitions) == 3 and all(abs(r - 2**-0.5) < 0.03 for r in transitions)
    stem = net.stem[0].weight
    assert abs(stem.std().item() / math.sqrt(2.0 / (16 * 9)) - 1) < 0.12  # 432 weights
    assert not net.classifier.weight.any()


def test_fixup_bottleneck_reference_init_std_per_layer():
    """Bottleneck: conv1 and conv2 He from the fan-out × L^(-1/4) (conv1: 4× the fan-in's
    variance ratio where it reduces 4w → w), conv3 zero, projection shortcuts He from the fan-out
    without the rescale."""
    torch.manual_seed(0)
    net = dl.create_model(
        "resnet-bottleneck", depth=26, scheme="fixup", stem="cifar", base_width=32
    )
    blocks = residual_blocks(net)
    L = len(blocks)
    for blk in blocks:
        (c1, c2, c3), _, _ = _params(blk)
        for conv in (c1, c2):
            k = conv.weight[0, 0].numel()
            target = math.sqrt(2.0 / (conv.out_channels * k)) * L**-0.25
            assert abs(conv.weight.std().item() / target - 1) < 0.05
        assert not c3.weight.any()
        if blk.shortcut is not None:
            w = blk.shortcut.conv.weight
            assert abs(w.std().item() / math.sqrt(2.0 / w.shape[0]) - 1) < 0.05


def test_fixup_fan_mode_is_validated():
    with pytest.raises(dl.DepthlabError, match="fan_mode"):
        dl.get_scheme("fixup", fan_mode="fan_avg")
    with pytest.raises(dl.DepthlabError, match="variant"):
        dl.create_model("resnet", depth=8, scheme="fixup", variant="v3")


@pytest.mark.parametrize("scheme", ["batchnorm", "skipinit", "rezero", "plain"])
def test_other_schemes_build_preact_by_default_and_postact_on_request(scheme):
    net = dl.create_model("resnet", depth=8, scheme=scheme)
    assert net.variant == "preact" and all(b.post is None for b in residual_blocks(net))
    post = dl.create_model("resnet", depth=8, scheme=scheme, variant="postact")
    assert all(isinstance(b.post, nn.ReLU) for b in residual_blocks(post))
    out = post(torch.randn(2, 3, 8, 8))
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_postact_batchnorm_block_order():
    """The original ResNet block: conv → BN → ReLU → conv → BN, then ReLU after the sum."""
    net = dl.create_model("resnet", depth=8, scheme="batchnorm", variant="postact")
    kinds = [type(m).__name__ for m in residual_blocks(net)[0].branch]
    assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d", "BatchNorm2d"]
    stem = [type(m).__name__ for m in net.stem]
    assert stem == ["Conv2d", "BatchNorm2d", "ReLU"]


@pytest.mark.parametrize("variant", ["postact", "preact"])
def test_batchnorm_zero_init_residual_makes_every_block_its_skip_path(variant):
    """γ = 0 in each branch's last BN (the reference code's BN ResNet, Goyal et al. 2017)."""
    net = dl.create_model(
        "resnet", depth=14, scheme="batchnorm", variant=variant,
        scheme_options={"zero_init_residual": True},
    ).train()  # fmt: skip
    assert net.scheme.identity_at_init()
    seen = {}
    for blk in residual_blocks(net):
        blk.register_forward_hook(lambda m, i, o: seen.__setitem__(m, (i[0], o)))
    net(torch.randn(4, 3, 8, 8))
    for blk, (x, y) in seen.items():
        with torch.no_grad():
            skip = blk.skip(x)
            expected = skip if blk.post is None else blk.post(skip)
        assert torch.equal(y, expected)
        bns = [m for m in blk.branch if isinstance(m, nn.BatchNorm2d)]
        assert not bns[-1].weight.any() and all(b.weight.eq(1).all() for b in bns[:-1])
    plain = dl.create_model("resnet", depth=8, scheme="batchnorm", variant=variant)
    assert all(
        m.weight.eq(1).all() for m in plain.modules() if isinstance(m, nn.BatchNorm2d)
    )  # off by default
