"""Residual networks: CIFAR-style 6n+2 (Wide-)ResNets with basic blocks, and bottleneck ResNets.

Both are pre-activation (He et al. 2016, "Identity Mappings in Deep Residual Networks",
arXiv 1603.05027); the scheme decides what sits in the norm, gate, bias and scale slots.
"""

from __future__ import annotations

import torch
from torch import nn

from depthlab.models.common import (
    GAINS,
    BlockStack,
    check_positive,
    default_init,
    materialize,
    seq,
)
from depthlab.models.common import activation as make_act
from depthlab.nn.residual import Residual
from depthlab.registry import DepthlabError
from depthlab.schemes import Scheme, get_scheme


def conv3x3(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=bias)


def conv1x1(c_in: int, c_out: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(c_in, c_out, 1, stride=stride, bias=bias)


def _shortcut(c_in: int, c_out: int, stride: int) -> nn.Module | None:
    return None if (c_in == c_out and stride == 1) else conv1x1(c_in, c_out, stride)


def basic_block(
    s: Scheme, c_in: int, c_out: int, stride: int, num_blocks: int, act: str
) -> Residual:
    """``f(x) = conv(σ(norm(conv(σ(norm(x))))))`` with Fixup's scalar slots: m = 2."""
    branch = seq(
        s.norm(c_in, "channels"),
        make_act(act),
        s.bias(),
        conv3x3(c_in, c_out, stride, bias=s.layer_bias),
        s.norm(c_out, "channels"),
        s.bias(),
        make_act(act),
        s.bias(),
        conv3x3(c_out, c_out, bias=s.layer_bias),
        s.scale(),
        s.bias(),
    )
    return s.residual(branch, c_out, "channels", num_blocks, _shortcut(c_in, c_out, stride))


def bottleneck_block(
    s: Scheme, c_in: int, width: int, stride: int, num_blocks: int, act: str, expansion: int = 4
) -> Residual:
    """1×1 reduce → 3×3 → 1×1 expand, pre-activation: m = 3."""
    c_out = width * expansion
    branch = seq(
        s.norm(c_in, "channels"),
        make_act(act),
        s.bias(),
        conv1x1(c_in, width, bias=s.layer_bias),
        s.norm(width, "channels"),
        s.bias(),
        make_act(act),
        s.bias(),
        conv3x3(width, width, stride, bias=s.layer_bias),
        s.norm(width, "channels"),
        s.bias(),
        make_act(act),
        s.bias(),
        conv1x1(width, c_out, bias=s.layer_bias),
        s.scale(),
        s.bias(),
    )
    return s.residual(branch, c_out, "channels", num_blocks, _shortcut(c_in, c_out, stride))


def check_resnet_depth(depth: int, key: str = "resnet depth") -> None:
    """Refuse a CIFAR ResNet depth that is not 6n+2 (or Wide-ResNet 6n+4), n ≥ 1."""
    if not isinstance(depth, int) or depth < 8 or depth % 6 not in (2, 4):
        valid = ", ".join(str(6 * n + 2) for n in (1, 2, 3, 5, 9, 18))
        wide = ", ".join(str(6 * n + 4) for n in (2, 4, 6))
        raise DepthlabError(
            f"{key} must be 6n+2 with n ≥ 1 (e.g. {valid}, ...) or, in Wide-ResNet "
            f"counting, 6n+4 (e.g. {wide}), got {depth}; use 'resnet-bottleneck' for 50/101/152"
        )


class _ResNetBase(nn.Module):
    scheme: Scheme
    init_gain: float

    def reset_parameters(self) -> None:
        default_init(self, self.init_gain)
        self.scheme.initialize(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, C, H, W)
        x = self.blocks(x)
        x = self.head(x)  # final norm, σ (Fixup: + scalar bias before the classifier)
        return self.classifier(torch.flatten(self.pool(x), 1))


class ResNet(_ResNetBase):
    """CIFAR ResNet of depth 6n+2: a 3×3 stem, three stages of n basic blocks with 16k, 32k, 64k
    channels (strides 1, 2, 2), global average pooling and a linear classifier.

    ``ResNet(depth=110)`` is He et al.'s ResNet-110 (arXiv 1512.03385). Wide-ResNets count depth
    as 6n+4 (the two projection convs included), so ``ResNet(depth=28, width=10)`` is
    Zagoruyko & Komodakis' Wide-ResNet 28-10 with n = 4 (arXiv 1605.07146); both countings are
    accepted. Works on any input size ≥ 4×4 (e.g. 8×8 digits with ``in_channels=1``).
    """

    def __init__(
        self,
        depth: int = 20,
        scheme: str | Scheme = "batchnorm",
        width: int = 1,
        in_channels: int = 3,
        num_classes: int = 10,
        activation: str = "relu",
        scheme_options: dict | None = None,
    ) -> None:
        super().__init__()
        check_positive(depth=depth, width=width, in_channels=in_channels, num_classes=num_classes)
        check_resnet_depth(depth)
        make_act(activation)
        n = (depth - 2) // 6 if depth % 6 == 2 else (depth - 4) // 6  # blocks per stage
        self.config = dict(
            depth=depth,
            width=width,
            in_channels=in_channels,
            num_classes=num_classes,
            activation=activation,
        )
        self.scheme = s = get_scheme(scheme, **(scheme_options or {}))
        self.depth, self.width, self.activation = depth, width, activation
        self.init_gain = GAINS[activation]
        widths = [16 * width, 32 * width, 64 * width]
        num_blocks = 3 * n
        with torch.device("meta"):
            self.stem = conv3x3(in_channels, 16, bias=s.layer_bias)
            blocks, c_in = [], 16
            for stage, c_out in enumerate(widths):
                for i in range(n):
                    stride = 2 if (stage > 0 and i == 0) else 1
                    blocks.append(basic_block(s, c_in, c_out, stride, num_blocks, activation))
                    c_in = c_out
            self.blocks = BlockStack(*blocks)
            self.head = seq(s.final_norm(c_in, "channels"), make_act(activation), s.bias())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(c_in, num_classes)
        materialize(self)
        self.reset_parameters()


BOTTLENECK_LAYERS = {
    26: (2, 2, 2, 2),
    38: (3, 3, 3, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


class BottleneckResNet(_ResNetBase):
    """ImageNet-style bottleneck ResNet (He et al. 2015, arXiv 1512.03385), pre-activation:
    depth 50/101/152 (also 26/38), stage widths 64·k, 128·k, 256·k, 512·k with expansion 4.

    ``stem="imagenet"`` is the 7×7/2 conv + 3×3/2 max-pool; ``stem="cifar"`` a 3×3 conv for small
    inputs. ``base_width`` (64) sets the stem and first-stage width; smaller values give cheap
    models for tests and CPU runs.
    """

    def __init__(
        self,
        depth: int = 50,
        scheme: str | Scheme = "batchnorm",
        width: int = 1,
        in_channels: int = 3,
        num_classes: int = 1000,
        activation: str = "relu",
        stem: str = "imagenet",
        base_width: int = 64,
        scheme_options: dict | None = None,
    ) -> None:
        super().__init__()
        check_positive(
            depth=depth,
            width=width,
            in_channels=in_channels,
            num_classes=num_classes,
            base_width=base_width,
        )
        if depth not in BOTTLENECK_LAYERS:
            valid = ", ".join(map(str, BOTTLENECK_LAYERS))
            raise DepthlabError(f"resnet-bottleneck depth must be one of {valid}, got {depth}")
        if stem not in ("imagenet", "cifar"):
            raise DepthlabError(f"stem must be 'imagenet' or 'cifar', got {stem!r}")
        make_act(activation)
        self.scheme = s = get_scheme(scheme, **(scheme_options or {}))
        self.depth, self.width, self.activation = depth, width, activation
        self.init_gain = GAINS[activation]
        layers = BOTTLENECK_LAYERS[depth]
        self.config = dict(
            depth=depth,
            width=width,
            in_channels=in_channels,
            num_classes=num_classes,
            activation=activation,
            stem=stem,
            base_width=base_width,
        )
        num_blocks = sum(layers)
        with torch.device("meta"):
            if stem == "imagenet":
                self.stem = nn.Sequential(
                    nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=s.layer_bias),
                    nn.MaxPool2d(3, stride=2, padding=1),
                )
            else:
                self.stem = conv3x3(in_channels, base_width, bias=s.layer_bias)
            blocks, c_in = [], base_width
            for stage, n in enumerate(layers):
                w = base_width * width * 2**stage
                for i in range(n):
                    stride = 2 if (stage > 0 and i == 0) else 1
                    blocks.append(bottleneck_block(s, c_in, w, stride, num_blocks, activation))
                    c_in = w * 4
            self.blocks = BlockStack(*blocks)
            self.head = seq(s.final_norm(c_in, "channels"), make_act(activation), s.bias())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(c_in, num_classes)
        materialize(self)
        self.reset_parameters()
