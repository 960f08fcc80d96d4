"""Residual networks: CIFAR-style 6n+2 (Wide-)ResNets with basic blocks, and bottleneck ResNets.

Each comes in two variants (``variant=``):

* ``"preact"``: the pre-activation ResNet (He et al. 2016, "Identity Mappings in Deep Residual
  Networks", arXiv 1603.05027): ``x + f(x)`` with ``f = conv ∘ σ ∘ norm ∘ conv ∘ σ ∘ norm``, a
  final norm-σ before the head, 1×1-conv projection shortcuts, He init from the fan-in. What
  SkipInit (De & Smith 2020) and Wide-ResNets (Zagoruyko & Komodakis 2016) use.
* ``"postact"``: the original ResNet (He et al. 2015, "Deep Residual Learning for Image
  Recognition", arXiv 1512.03385): ``σ(x + f(x))`` with ``f = norm ∘ conv ∘ σ ∘ norm ∘ conv``,
  norm-σ after the stem, He init from the fan-out; CIFAR nets use parameter-free shortcuts
  (option A: subsample, then zero-pad the new channels), bottleneck nets 1×1-conv projections
  (option B). What Fixup's reference code builds (``github.com/hongyi-zhang/Fixup``), scalar for
  scalar: the bias before a block's first conv also feeds its shortcut (``shortcut(x + b₁ₐ)``).
  One difference remains: the stem is He-initialised from its fan-out, as the reference's BN
  ResNet does, while the reference's Fixup ResNet leaves its stem at PyTorch's default
  (uniform, std 1/√(3·fan_in): 0.111 for a 3→16 3×3 stem, against 0.118 here).

``variant=None`` takes the scheme's choice (:attr:`~depthlab.schemes.Scheme.resnet_variant`:
``postact`` for Fixup, ``preact`` for the others). The scheme decides what sits in the norm,
gate, bias and scale slots.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
from depthlab.schemes import BlockInfo, Scheme, get_scheme


def conv3x3(
    s: Scheme, c_in: int, c_out: int, stride: int = 1, bias: bool = False, act: str | None = None
) -> nn.Module:
    """A 3×3 convolution (padding 1) from the scheme's weight-layer factory."""
    return s.conv(c_in, c_out, 3, stride=stride, padding=1, bias=bias, act=act)


def conv1x1(
    s: Scheme, c_in: int, c_out: int, stride: int = 1, bias: bool = False, act: str | None = None
) -> nn.Module:
    """A 1×1 convolution from the scheme's weight-layer factory."""
    return s.conv(c_in, c_out, 1, stride=stride, bias=bias, act=act)


VARIANTS = ("preact", "postact")


def _shortcut(s: Scheme, c_in: int, c_out: int, stride: int) -> nn.Module | None:
    return None if (c_in == c_out and stride == 1) else conv1x1(s, c_in, c_out, stride)


class Shortcut(nn.Module):
    """The skip path of a post-activation block whose shape changes, fed ``x + b`` with ``b`` the
    scalar bias before the branch's first conv (Fixup's reference code; none: ``x``):

    * ``kind="pad"`` (option A of He et al. 2015): subsample by ``stride`` (the reference's
      ``AvgPool2d(1, stride)``), then zero-pad the channels from ``c_in`` to ``c_out``;
    * ``kind="conv"`` (option B): a 1×1 convolution with that stride (``self.conv``).

    ``b`` is the branch's own :class:`~depthlab.nn.Bias` module, referenced, not registered a
    second time (its parameter keeps one name, ``branch.0.bias``)."""

    def __init__(
        self,
        c_in: int,
        c_out: int,
        stride: int,
        kind: str,
        pre: nn.Module | None = None,
        scheme: Scheme | None = None,
    ) -> None:
        super().__init__()
        if kind not in ("pad", "conv") or (kind == "pad" and c_out < c_in):
            raise DepthlabError(
                f"shortcut kind must be 'pad' (with c_out ≥ c_in) or 'conv', got {kind!r}"
            )
        self.c_in, self.c_out, self.stride, self.kind = c_in, c_out, stride, kind
        self._pre = (pre,)  # in a tuple: not a submodule
        if kind == "conv":
            self.conv = (
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
                if scheme is None
                else conv1x1(scheme, c_in, c_out, stride)
            )
        else:
            self.conv = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = self._pre[0]
        if pre is not None:
            x = pre(x)
        if self.conv is not None:
            return self.conv(x)
        if self.stride > 1:
            x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.c_out - self.c_in))

    def extra_repr(self) -> str:
        return f"{self.c_in}, {self.c_out}, stride={self.stride}, kind={self.kind!r}"


def _branch(
    s: Scheme, convs: list[nn.Conv2d], act: str, variant: str
) -> tuple[nn.Module, nn.Module | None]:
    """The residual branch around ``convs`` with the scheme's slots, and its first scalar bias
    (post-activation: the one a changed shortcut reads too; None pre-activation):

    * pre-activation: ``norm σ (+b) conv`` then ``norm (+b) σ (+b) conv`` per further conv;
    * post-activation: ``(+b) conv norm`` then ``(+b) σ (+b) conv norm`` per further conv;

    both end in the scalar multiplier and bias, ``·s (+b)`` (Fixup's slots)."""
    mods: list[nn.Module | None] = []
    first = None
    if variant == "postact":
        first = s.bias()
        mods.append(first)
        for i, conv in enumerate(convs):
            if i:
                mods += [s.bias(), make_act(act), s.bias()]
            mods += [conv, s.norm(conv.out_channels, "channels")]
    else:
        for i, conv in enumerate(convs):
            mods.append(s.norm(conv.in_channels, "channels"))
            mods += [s.bias(), make_act(act), s.bias()] if i else [make_act(act), s.bias()]
            mods.append(conv)
    mods += [s.scale(), s.bias()]
    return seq(*mods), first


def _block(
    s: Scheme,
    convs: list[nn.Conv2d],
    c_in: int,
    stride: int,
    info: BlockInfo,
    act: str,
    variant: str,
    shortcut_kind: str,
) -> Residual:
    """One residual block around ``convs``: pre-activation with a projection shortcut where the
    shape changes, or post-activation (σ after the sum) with a ``shortcut_kind`` shortcut fed
    ``x + b₁ₐ``."""
    c_out = convs[-1].out_channels
    branch, first = _branch(s, convs, act, variant)
    n = info.num_blocks
    if variant == "postact":
        same = c_in == c_out and stride == 1
        shortcut = None if same else Shortcut(c_in, c_out, stride, shortcut_kind, first, s)
        return s.residual(branch, c_out, "channels", n, shortcut, make_act(act), info=info)
    shortcut = _shortcut(s, c_in, c_out, stride)
    return s.residual(branch, c_out, "channels", n, shortcut, info=info)


def _info(num_blocks: int, act: str, m: int, index: int | None, stage: int) -> BlockInfo:
    return BlockInfo(index=index, num_blocks=num_blocks, stage=stage, m=m, gain=GAINS[act])


def _conv_act(variant: str, i: int, act: str) -> str | None:
    """The activation feeding a block's i-th conv: pre-activation, every conv reads σ(·);
    post-activation, all but the first (which reads the block input)."""
    return act if (variant != "postact" or i > 0) else None


def basic_block(
    s: Scheme,
    c_in: int,
    c_out: int,
    stride: int,
    num_blocks: int,
    act: str,
    variant: str = "preact",
    index: int | None = None,
    stage: int = 0,
) -> Residual:
    """Two 3×3 convs with Fixup's scalar slots (m = 2): pre-activation
    ``x + conv(σ(norm(conv(σ(norm(x))))))`` with a projection shortcut, or post-activation
    ``σ(x + norm(conv(σ(norm(conv(x))))))`` with an option-A shortcut."""
    b = s.layer_bias
    convs = [
        conv3x3(s, c_in, c_out, stride, bias=b, act=_conv_act(variant, 0, act)),
        conv3x3(s, c_out, c_out, bias=b, act=_conv_act(variant, 1, act)),
    ]
    info = _info(num_blocks, act, 2, index, stage)
    return _block(s, convs, c_in, stride, info, act, variant, "pad")


def bottleneck_block(
    s: Scheme,
    c_in: int,
    width: int,
    stride: int,
    num_blocks: int,
    act: str,
    expansion: int = 4,
    variant: str = "preact",
    index: int | None = None,
    stage: int = 0,
) -> Residual:
    """1×1 reduce → 3×3 (strided) → 1×1 expand, m = 3; pre-activation, or post-activation with
    Fixup's reference scalars and a projection shortcut fed ``x + b₁ₐ``."""
    b = s.layer_bias
    convs = [
        conv1x1(s, c_in, width, bias=b, act=_conv_act(variant, 0, act)),
        conv3x3(s, width, width, stride, bias=b, act=_conv_act(variant, 1, act)),
        conv1x1(s, width, width * expansion, bias=b, act=_conv_act(variant, 2, act)),
    ]
    info = _info(num_blocks, act, 3, index, stage)
    return _block(s, convs, c_in, stride, info, act, variant, "conv")


def resolve_variant(variant: str | None, s: Scheme) -> str:
    """``variant``, or the scheme's choice when None; refuses anything else."""
    v = s.resnet_variant if variant is None else variant
    if v not in VARIANTS:
        raise DepthlabError(f"variant must be one of {', '.join(VARIANTS)} (or None), got {v!r}")
    return v


def _stem(s: Scheme, conv: nn.Module, c: int, act: str, variant: str) -> nn.Module:
    """The stem conv; post-activation nets follow it with norm, scalar bias and σ (Fixup's
    ``relu(conv1(x) + bias1)``)."""
    if variant == "postact":
        return seq(conv, s.norm(c, "channels"), s.bias(), make_act(act))
    return conv


def _head(s: Scheme, c: int, act: str, variant: str) -> nn.Module:
    """Before pooling: pre-activation nets end with the final norm and σ; both add the scalar
    bias before the classifier (Fixup's ``fc(x + bias2)``)."""
    if variant == "postact":
        return seq(s.bias())
    return seq(s.final_norm(c, "channels"), make_act(act), s.bias())


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

    variant: str

    activation: str
    depth: int
    #: layers one block adds to ``depth`` (2 basic, 3 bottleneck)
    layers_per_block: int = 2

    # -- growing (depthlab.models.grow) ---------------------------------------------------
    def grow_units(self) -> list[list[nn.Module]]:
        return [[b] for b in self.blocks]

    def grow_features(self, index: int, units: list[list[nn.Module]]) -> int:
        """Channels entering position ``index``: the stem's output, or the block before's."""
        from depthlab.nn.residual import weight_layers

        if index == 0:
            return int(weight_layers(self.stem)[0].weight.shape[0])
        return int(weight_layers(units[index - 1][0].branch)[-1].weight.shape[0])

    def grow_commit(self, n: int) -> None:
        self.depth += self.layers_per_block * n

    def reset_parameters(self) -> None:
        mode = "fan_out" if self.variant == "postact" else "fan_in"
        default_init(self, self.init_gain, mode)
        self.scheme.initialize(self)

    def example_input(self, batch_size: int = 8) -> torch.Tensor:
        """A fixed batch of standard-normal images ``(batch_size, in_channels, 32, 32)`` (its own
        generator, seed 0): what a scheme profiles the model on at init (Admin)."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, self.config["in_channels"], 32, 32, generator=g)
        return x.to(self.classifier.weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)  # (N, C, H, W)
        x = self.blocks(x)
        x = self.head(x)  # final norm, σ (Fixup: + scalar bias before the classifier)
        return self.classifier(torch.flatten(self.pool(x), 1))


class ResNet(_ResNetBase):
    """CIFAR ResNet of depth 6n+2: a 3×3 stem, three stages of n basic blocks with 16k, 32k, 64k
    channels (strides 1, 2, 2), global average pooling and a linear classifier.

    ``ResNet(depth=110, variant="postact")`` is He et al.'s ResNet-110 (arXiv 1512.03385), and
    with ``scheme="fixup"`` (whose default variant it is) the reference Fixup ResNet-110, with
    its 1,720,138 parameters; ``variant="preact"`` is the pre-activation ResNet-110 of He et al.
    2016 (arXiv 1603.05027). Wide-ResNets count depth
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
        variant: str | None = None,
        scheme_options: dict | None = None,
    ) -> None:
        super().__init__()
        check_positive(depth=depth, width=width, in_channels=in_channels, num_classes=num_classes)
        check_resnet_depth(depth)
        make_act(activation)
        n = (depth - 2) // 6 if depth % 6 == 2 else (depth - 4) // 6  # blocks per stage
        self.scheme = s = get_scheme(scheme, **(scheme_options or {}))
        self.variant = v = resolve_variant(variant, s)
        self.config = dict(
            depth=depth,
            width=width,
            in_channels=in_channels,
            num_classes=num_classes,
            activation=activation,
            variant=v,
        )
        self.depth, self.width, self.activation = depth, width, activation
        self.init_gain = GAINS[activation]
        widths = [16 * width, 32 * width, 64 * width]
        num_blocks = 3 * n
        with torch.device("meta"):
            stem = conv3x3(s, in_channels, 16, bias=s.layer_bias)
            self.stem = _stem(s, stem, 16, activation, v)
            blocks, c_in = [], 16
            for stage, c_out in enumerate(widths):
                for i in range(n):
                    stride = 2 if (stage > 0 and i == 0) else 1
                    blocks.append(
                        basic_block(
                            s, c_in, c_out, stride, num_blocks, activation, v, len(blocks), stage
                        )
                    )
                    c_in = c_out
            self.blocks = BlockStack(*blocks)
            self.head = _head(s, c_in, activation, v)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(c_in, num_classes)
        materialize(self)
        self.reset_parameters()

    def grow_block(self, features: int, num_blocks: int) -> list[nn.Module]:
        """A basic block ``features → features`` (stride 1, identity shortcut)."""
        s, act, v = self.scheme, self.activation, self.variant
        return [basic_block(s, features, features, 1, num_blocks, act, v)]


BOTTLENECK_LAYERS = {
    26: (2, 2, 2, 2),
    38: (3, 3, 3, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}


class BottleneckResNet(_ResNetBase):
    """ImageNet-style bottleneck ResNet: depth 50/101/152 (also 26/38), stage widths 64·k,
    128·k, 256·k, 512·k with expansion 4, the stride on the 3×3 conv; ``variant="postact"`` is
    He et al. 2015 (arXiv 1512.03385; Fixup's ImageNet reference, its default under ``fixup``),
    ``"preact"`` the pre-activation variant (arXiv 1603.05027).

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
        variant: str | None = None,
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
        self.variant = v = resolve_variant(variant, s)
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
            variant=v,
        )
        num_blocks = sum(layers)
        with torch.device("meta"):
            if stem == "imagenet":
                conv = s.conv(in_channels, base_width, 7, stride=2, padding=3, bias=s.layer_bias)
                self.stem = nn.Sequential(
                    _stem(s, conv, base_width, activation, v),
                    nn.MaxPool2d(3, stride=2, padding=1),
                )
            else:
                self.stem = _stem(
                    s,
                    conv3x3(s, in_channels, base_width, bias=s.layer_bias),
                    base_width,
                    activation,
                    v,
                )
            blocks, c_in = [], base_width
            for stage, n in enumerate(layers):
                w = base_width * width * 2**stage
                for i in range(n):
                    stride = 2 if (stage > 0 and i == 0) else 1
                    blocks.append(
                        bottleneck_block(
                            s, c_in, w, stride, num_blocks, activation, 4, v, len(blocks), stage
                        )
                    )
                    c_in = w * 4
            self.blocks = BlockStack(*blocks)
            self.head = _head(s, c_in, activation, v)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Linear(c_in, num_classes)
        materialize(self)
        self.reset_parameters()

    layers_per_block = 3

    def grow_block(self, features: int, num_blocks: int) -> list[nn.Module]:
        """A bottleneck block ``features → features`` (width features/4, stride 1)."""
        if features % 4:
            raise DepthlabError(
                f"grow: a bottleneck block needs channels divisible by 4, got {features}"
            )
        s, act, v = self.scheme, self.activation, self.variant
        return [bottleneck_block(s, features, features // 4, 1, num_blocks, act, variant=v)]
