"""Residual schemes: the one place where BatchNorm, LayerNorm, SkipInit, ReZero, Fixup, … differ.

The scheme protocol — everything a scheme may provide; a model, ``convert`` and the diagnostics
use only these (no code outside this module tests a scheme's name):

(a) ``norm``        the normalization layer inside the branch (pre-activation position), or none;
(b) ``gate``        the scalar that multiplies the branch output (fixed, learnable, or none);
(c) ``skip``        the module on the skip path (a constant :class:`~depthlab.nn.Scale` — 1,
    DeepNorm's α, 1/√2, 0 — or any module, e.g. Admin's learnable ω); ``post_norm`` after the sum;
(d) ``bias``/``scale``  scalar biases and a scalar multiplier inside the branch (Fixup);
    ``layer_bias``  whether convs/linears carry their own bias vectors;
(e) ``linear``/``conv``  the weight-layer factory: every weight layer of a block, stem and
    projection shortcut is built by the scheme (NF's scaled weight standardization), told which
    activation feeds it;
(f) ``final_norm``  the norm before the classifier head (pre-activation nets);
(g) ``residual``    the block itself, given its place (:class:`BlockInfo`: index, number of
    blocks, stage, weight layers m, encoder–decoder role, the He gain of its activation);
(h) ``path_law``    what the analytic path-variance model needs; ``identity_at_init``;
and, once the model is built, ``initialize(model)`` applies the model-level rules (Fixup's
rescaling and zero classifier, DeepNorm's β, NF's β track, Admin's ω profile).

Add a scheme by subclassing :class:`Scheme` (a dataclass; its fields are its options) and
registering it with ``@SCHEMES.register()``; a scheme defined outside the package works the same
(``get_scheme`` accepts an instance). Models are built on the ``meta`` device and then
initialised, so a module a scheme returns sets its parameters in ``reset_parameters()``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from depthlab.nn.conv import Conv2d
from depthlab.nn.init import fan
from depthlab.nn.norm import NoisyBatchNorm, create_norm
from depthlab.nn.residual import Branch, Residual, residual_blocks, weight_layers
from depthlab.nn.scalars import Bias, FeatureScale, Gate, Scale
from depthlab.nn.transformer import MultiHeadAttention
from depthlab.nn.ws import WeightStandardized, WSConv2d, WSLinear, activation_gain
from depthlab.registry import DepthlabError, Registry

SCHEMES: Registry[type[Scheme]] = Registry("scheme")


@dataclass(frozen=True)
class Stack:
    """Where a residual block of an encoder–decoder sits, for scheme rules that depend on more
    than the number of blocks (DeepNorm's encoder–decoder α and β): ``role`` is ``"encoder"``
    or ``"decoder"``, and N, M the two stacks' numbers of Transformer layers."""

    role: str
    encoder_layers: int
    decoder_layers: int

    def __post_init__(self) -> None:
        if self.role not in ("encoder", "decoder"):
            raise DepthlabError(f"stack role must be 'encoder' or 'decoder', got {self.role!r}")


@dataclass(frozen=True)
class BlockInfo:
    """Where a residual block sits, for scheme rules that depend on it (kept as ``block.info``).

    ``index``: the block's position among the model's residual blocks (None: not known, e.g. a
    block built on its own); ``num_blocks``: L, the number of residual blocks; ``stage``: the
    ResNet stage (0 elsewhere); ``m``: the weight layers in its branch (None: counted from the
    branch); ``stack``: its place in an encoder–decoder; ``gain``: the He gain of the
    activation inside its branch (√2 for ReLU, 1 for attention; None: √2)."""

    index: int | None = None
    num_blocks: int = 1
    stage: int = 0
    m: int | None = None
    stack: Stack | None = None
    gain: float | None = None


@dataclass
class Scheme:
    """Base class: the plain residual block ``y = x + f(x)`` with no norm and no gate."""

    name: ClassVar[str] = "base"
    #: whether conv/linear layers inside branches carry bias vectors
    layer_bias: ClassVar[bool] = True
    #: the ResNet a model builds for this scheme when it is not told (``variant=None``):
    #: ``"preact"`` (He et al. 2016, arXiv 1603.05027: what SkipInit and Wide-ResNets use) or
    #: ``"postact"`` (He et al. 2015, arXiv 1512.03385: what Fixup's reference code uses)
    resnet_variant: ClassVar[str] = "preact"

    # -- what diagnostics read -------------------------------------------------------------
    def path_law(self) -> tuple[str, float | str | None] | None:
        """How the analytic path model (:mod:`depthlab.diagnostics.paths`) treats this scheme's
        blocks at init: ``("normalized", α)`` — a norm before the branch, so the branch has unit
        variance against a skip of variance i (``w_i = α²/i``); ``("gated", α)`` — branch
        scaled by α against a unit skip (``w_i = α²``); ``("equal", None)`` — skip and branch
        weighted equally (``w_i = 1``); ``("noskip", None)``; None: no analytic model. Read from
        the scheme's own options, never from its name."""
        return ("gated", 1.0)

    # -- construction hooks --------------------------------------------------------------
    def norm(self, num_features: int, layout: str) -> nn.Module | None:
        """Normalization inside the branch, before each activation (pre-activation order)."""
        return None

    def final_norm(self, num_features: int, layout: str) -> nn.Module | None:
        """Normalization applied to the residual stream before the head."""
        return None

    def post_norm(self, num_features: int, layout: str) -> nn.Module | None:
        """Normalization applied after the residual sum."""
        return None

    def gate(self, num_blocks: int) -> nn.Module | None:
        """The scalar multiplying the branch output of one block."""
        return None

    def skip_mult(self, num_blocks: int, stack: Stack | None = None) -> float:
        """The constant multiplying the skip path (0 = no skip connection); ``stack`` says
        where the block sits in an encoder–decoder (None elsewhere)."""
        return 1.0

    def skip(self, num_features: int, layout: str, info: BlockInfo) -> nn.Module:
        """The module on the skip path: by default the constant :meth:`skip_mult` as a
        :class:`~depthlab.nn.Scale`; a scheme may return any module (Admin's ω)."""
        if info.stack is None:
            return Scale(self.skip_mult(info.num_blocks))
        return Scale(self.skip_mult(info.num_blocks, info.stack))

    # -- the weight-layer factory ------------------------------------------------------------
    def linear(
        self,
        in_features: int,
        out_features: int,
        *,
        bias: bool | None = None,
        act: str | None = None,
    ) -> nn.Module:
        """A linear layer of a block, stem or shortcut; ``act`` names the activation whose output
        it reads (None: a linear input); ``bias`` None means :attr:`layer_bias`."""
        return nn.Linear(in_features, out_features, bias=self.layer_bias if bias is None else bias)

    def conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        *,
        stride: int = 1,
        padding: int = 0,
        bias: bool | None = None,
        act: str | None = None,
    ) -> nn.Module:
        """A 2-D convolution of a block, stem or shortcut (see :meth:`linear`): a
        :class:`depthlab.nn.Conv2d` (``nn.Conv2d`` with a faster CPU path on 2×2 maps)."""
        return Conv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            bias=self.layer_bias if bias is None else bias,
        )

    def bias(self) -> nn.Module | None:
        """A scalar bias placed before each weight layer and activation (Fixup), or none."""
        return None

    def scale(self) -> nn.Module | None:
        """A scalar multiplier at the end of each branch (Fixup), or none."""
        return None

    def residual(
        self,
        branch: nn.Module,
        num_features: int,
        layout: str,
        num_blocks: int,
        shortcut: nn.Module | None = None,
        post_act: nn.Module | None = None,
        stack: Stack | None = None,
        info: BlockInfo | None = None,
    ) -> Residual:
        """Wrap ``branch`` into a residual block of this scheme; ``post_act`` is an activation
        after the sum (and after the scheme's post-sum norm), as in post-activation ResNets;
        ``info`` (kept as ``block.info``; ``stack`` also as ``block.stack``) places the block."""
        if info is None:
            info = BlockInfo(num_blocks=num_blocks, stack=stack)
        elif stack is not None and info.stack is None:
            info = dataclasses.replace(info, stack=stack)
        if info.m is None:
            info = dataclasses.replace(info, m=len(weight_layers(branch)))
        post = self.post_norm(num_features, layout)
        if post_act is not None:
            post = post_act if post is None else nn.Sequential(post, post_act)
        block = Residual(
            branch,
            gate=self.gate(info.num_blocks),
            skip=self.skip(num_features, layout, info),
            shortcut=shortcut,
            post=post,
        )
        block.stack = info.stack
        block.info = info
        return block

    def identity_at_init(self) -> bool:
        """True when every residual block with an identity shortcut is the identity at init."""
        return False

    def shares_layer_gate(self) -> bool:
        """True when the sublayers of one Transformer layer (attention, feed-forward) share one
        gate module instead of getting one each (ReZero's official code)."""
        return False

    # -- model-level initialisation -------------------------------------------------------
    def initialize(self, model: nn.Module) -> None:
        """Apply the scheme's initialisation rules to a freshly initialised model."""

    @property
    def options(self) -> dict[str, object]:
        return dataclasses.asdict(self)

    def __str__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{self.name}({opts})" if opts else self.name


@SCHEMES.register()
@dataclass
class Plain(Scheme):
    """``y = x + f(x)``: the unnormalized residual block with α = 1.

    Its output variance doubles per block at initialisation, which is why it fails at depth
    (De & Smith 2020, "Batch Normalization Biases Residual Blocks Towards the Identity Function
    in Deep Networks", arXiv 2002.10444, Table 2).
    """

    name: ClassVar[str] = "plain"


@SCHEMES.register()
@dataclass
class NoSkip(Scheme):
    """``y = f(x)``: no skip connection at all, a plain feed-forward stack."""

    name: ClassVar[str] = "noskip"

    def path_law(self) -> tuple[str, None]:
        return ("noskip", None)

    def skip_mult(self, num_blocks: int, stack: Stack | None = None) -> float:
        return 0.0


@SCHEMES.register()
@dataclass
class Scaled(Scheme):
    """``y = (x + f(x)) / √2``: variance-preserving merge without normalization.

    De & Smith 2020 (arXiv 2002.10444, Table 2) show this is not enough to train very deep
    networks: every path is still weighted equally, so the effective depth stays ~depth/2.
    """

    name: ClassVar[str] = "scaled"

    def path_law(self) -> tuple[str, None]:
        return ("equal", None)

    def gate(self, num_blocks: int) -> nn.Module | None:
        return Gate(1 / math.sqrt(2), learnable=False)

    def skip_mult(self, num_blocks: int, stack: Stack | None = None) -> float:
        return 1 / math.sqrt(2)


@SCHEMES.register()
@dataclass
class BatchNorm(Scheme):
    """BatchNorm inside each branch in pre-activation order (ResNet-V2 / Wide-ResNet).

    ``f(x) = W₂ σ(BN(W₁ σ(BN(x))))`` with a final BN-σ before the head. Ioffe & Szegedy 2015
    (arXiv 1502.03167); He et al. 2016 "Identity Mappings in Deep Residual Networks"
    (arXiv 1603.05027). At initialisation the skip variance before block i is ≈ i and each branch
    outputs ≈ unit variance, so branch i is downscaled by ~1/√i (De & Smith 2020, arXiv 2002.10444).
    """

    name: ClassVar[str] = "batchnorm"

    def path_law(self) -> tuple[str, float]:
        return ("normalized", 1.0)

    layer_bias: ClassVar[bool] = False
    #: γ = 0 in the last BatchNorm of every residual branch, so every block starts as its skip
    #: path (Goyal et al. 2017, arXiv 1706.02677; torchvision's ``zero_init_residual``; the BN
    #: ResNet of Fixup's reference code)
    zero_init_residual: bool = False
    #: "noisy BatchNorm" (Santurkar et al. 2018, arXiv 1805.11604): after every BN, per unit and
    #: step, a random shift ``U(−noise_mean, noise_mean)`` and scale ``U(1, noise_std)``
    #: (:class:`~depthlab.nn.norm.NoisyBatchNorm`); 0 and 1: plain BN
    noise_mean: float = 0.0
    noise_std: float = 1.0

    def __post_init__(self) -> None:
        for key, low in (("noise_mean", 0.0), ("noise_std", 1.0)):
            value = getattr(self, key)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (math.isfinite(value) and value >= low)
            ):
                raise DepthlabError(
                    f"{key} in scheme 'batchnorm' must be a finite number ≥ {low:g}, got {value!r}"
                )

    def norm(self, num_features: int, layout: str) -> nn.Module | None:
        if self.noise_mean > 0 or self.noise_std > 1:
            return NoisyBatchNorm(num_features, layout, self.noise_mean, self.noise_std)
        return create_norm("batchnorm", num_features, layout)

    def final_norm(self, num_features: int, layout: str) -> nn.Module | None:
        return self.norm(num_features, layout)

    def identity_at_init(self) -> bool:
        return self.zero_init_residual

    def initialize(self, model: nn.Module) -> None:
        if not self.zero_init_residual:
            return
        with torch.no_grad():
            for blk in residual_blocks(model):
                norms = [
                    m for m in blk.branch.modules() if isinstance(m, nn.modules.batchnorm._NormBase)
                ]
                if norms and norms[-1].weight is not None:
                    norms[-1].weight.zero_()


@SCHEMES.register()
@dataclass
class LayerNorm(Scheme):
    """LayerNorm, placed inside the branch (``pre``: ``x + f(LN(x))``, final LN before the head)
    or after the sum (``post``: ``LN(x + f(x))``, the original Transformer).

    Ba et al. 2016 (arXiv 1607.06450); Xiong et al. 2020 "On Layer Normalization in the
    Transformer Architecture" (arXiv 2002.04745) for the placements. For conv activations the
    LayerNorm normalizes each sample over (C, H, W) (``GroupNorm(1, C)``).
    """

    name: ClassVar[str] = "layernorm"

    def path_law(self) -> tuple[str, float | None]:
        return ("normalized", 1.0) if self.placement == "pre" else ("equal", None)

    placement: str = "pre"

    #: the one placement a named variant (prenorm, postnorm) has; None: either
    fixed_placement: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        if self.placement not in ("pre", "post"):
            raise DepthlabError(
                f"layernorm placement must be 'pre' or 'post', got {self.placement!r}"
            )
        if self.fixed_placement is not None and self.placement != self.fixed_placement:
            other = "prenorm" if self.placement == "pre" else "postnorm"
            raise DepthlabError(
                f"scheme '{self.name}' is placement '{self.fixed_placement}'; for "
                f"placement '{self.placement}' use scheme '{other}' (or 'layernorm')"
            )

    def norm(self, num_features: int, layout: str) -> nn.Module | None:
        return create_norm("layernorm", num_features, layout) if self.placement == "pre" else None

    def final_norm(self, num_features: int, layout: str) -> nn.Module | None:
        return self.norm(num_features, layout)

    def post_norm(self, num_features: int, layout: str) -> nn.Module | None:
        if self.placement == "post":
            return create_norm("layernorm", num_features, layout)
        return None


@SCHEMES.register()
@dataclass
class PreNorm(LayerNorm):
    """Pre-LN: ``x + f(LN(x))`` with a final LayerNorm (Xiong et al. 2020, arXiv 2002.04745)."""

    name: ClassVar[str] = "prenorm"
    fixed_placement: ClassVar[str | None] = "pre"
    placement: str = "pre"


@SCHEMES.register()
@dataclass
class PostNorm(LayerNorm):
    """Post-LN: ``LN(x + f(x))``, the original Transformer.

    Vaswani et al. 2017, "Attention Is All You Need" (arXiv 1706.03762).
    """

    name: ClassVar[str] = "postnorm"
    fixed_placement: ClassVar[str | None] = "post"
    placement: str = "post"


def _alpha_value(alpha_init: float | str, num_blocks: int) -> float:
    """The initial gate value: a finite number, or ``"1/sqrt(d)"`` with d the number of blocks."""
    hint = "alpha_init must be a finite number or '1/sqrt(d)' (d = number of residual blocks)"
    if isinstance(alpha_init, str):
        if alpha_init.replace(" ", "") in ("1/sqrt(d)", "1/sqrt(depth)"):
            return 1 / math.sqrt(num_blocks)
        try:
            value = float(alpha_init)
        except ValueError:
            raise DepthlabError(f"{hint}, got {alpha_init!r}") from None
    elif isinstance(alpha_init, (int, float)) and not isinstance(alpha_init, bool):
        value = float(alpha_init)
    else:
        raise DepthlabError(f"{hint}, got {alpha_init!r}")
    if not math.isfinite(value):
        raise DepthlabError(f"{hint}, got {alpha_init!r}")
    return value


@dataclass
class _GatedScheme(Scheme):
    alpha_init: float | str = 0.0
    learnable: bool = True

    def __post_init__(self) -> None:
        _alpha_value(self.alpha_init, 1)  # validate early

    def identity_at_init(self) -> bool:
        return _alpha_value(self.alpha_init, 2) == 0.0  # "1/sqrt(d)" is never 0

    def path_law(self) -> tuple[str, float | str]:
        return ("gated", self.alpha_init)

    def gate(self, num_blocks: int) -> nn.Module | None:
        return Gate(_alpha_value(self.alpha_init, num_blocks), learnable=self.learnable)


@SCHEMES.register()
@dataclass
class SkipInit(_GatedScheme):
    """SkipInit: ``y = x + α·f(x)`` with one learnable scalar α per block, no normalization.

    De & Smith 2020, "Batch Normalization Biases Residual Blocks Towards the Identity Function in
    Deep Networks" (arXiv 2002.10444). α is initialised to 0 (or to ``"1/sqrt(d)"`` with d the
    number of residual blocks), and convolutions/linears get biases in place of BN's β.
    """

    name: ClassVar[str] = "skipinit"


@SCHEMES.register()
@dataclass
class ReZero(_GatedScheme):
    """ReZero: ``x_{i+1} = x_i + α_i·F(x_i)`` with α_i = 0 at initialisation, learnable.

    Bachlechner et al. 2020, "ReZero is All You Need: Fast Convergence at Large Depth"
    (arXiv 2003.04887). Every block is the identity at initialisation, so the input-output
    Jacobian is the identity (dynamical isometry). In Transformers the official code shares one α
    per layer across its sublayers (``per_sublayer=False``).
    """

    name: ClassVar[str] = "rezero"
    per_sublayer: bool = False
    #: ``"batchnorm"``: keep BatchNorm inside each branch (and before the head), gated by α —
    #: ReZero's own ResNet variant (its CIFAR ResNet-56 keeps BN in the branches), unlike SkipInit
    #: and Fixup, which remove it; ``"none"`` (default): no normalization (its FC and
    #: Transformer variants)
    branch_norm: str = "none"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.branch_norm not in ("none", "batchnorm"):
            raise DepthlabError(
                f"branch_norm must be 'none' or 'batchnorm', got {self.branch_norm!r}"
            )

    def shares_layer_gate(self) -> bool:
        return not self.per_sublayer

    def norm(self, num_features: int, layout: str) -> nn.Module | None:
        if self.branch_norm == "none":
            return None
        return create_norm(self.branch_norm, num_features, layout)

    def final_norm(self, num_features: int, layout: str) -> nn.Module | None:
        return self.norm(num_features, layout)


@SCHEMES.register()
@dataclass
class Fixup(Scheme):
    """Fixup: residual learning without normalization (Zhang, Dauphin & Ma 2019, arXiv 1901.09321).

    1. Zero-initialise the classifier and the last weight layer of every residual branch.
    2. He-initialise the other branch layers (``std = √2/√fan_in`` for ReLU) and multiply them by
       ``L^(-1/(2m-2))``, with L the number of residual branches and m the weight layers per
       branch (basic block m=2 → L^-1/2; bottleneck m=3 → L^-1/4).
    3. Add a scalar multiplier (init 1) at the end of each branch and scalar biases (init 0)
       before each convolution, linear layer and activation, and one before the classifier
       (the reference's ``fc(x + bias2)``). The reference code trains these scalars at lr/10
       (``TrainConfig.scalar_lr_mult``).

    Branches with a single weight layer (m=1) only get rule 1.

    He's std in rule 2 is taken, for convolutions, from the **fan-out** (``√2/√(c_out·k²)``), as
    in the reference code (``github.com/hongyi-zhang/Fixup``, CIFAR and ImageNet), which also
    He-initialises projection shortcuts from the fan-out, without the rescale; for linear
    layers (MLP, Transformer) from the fan-in (``fan_mode="auto"``, the default). ``"fan_in"``
    or ``"fan_out"`` use that fan for every layer. The two differ wherever a layer's input and
    output widths differ (stage transitions: 1/√2; the bottleneck's 1×1 convs: 2 or 1/2).
    (The reference's Transformer code initialises Xavier-uniform instead; not built here.)
    On ResNets Fixup builds the reference's post-activation networks unless told otherwise
    (:attr:`resnet_variant`; ``variant="preact"`` for the pre-activation ones).

    Each rule is an option, for ablations (all True by default, the paper's Fixup):
    ``zero_init`` (rule 1; False leaves those layers He-initialised), ``rescale`` (rule 2's
    ``L^(-1/(2m-2))``; False leaves the plain He init), ``multiplier`` and ``biases`` (rule 3's
    scalar multipliers and scalar biases; False drops them).
    """

    name: ClassVar[str] = "fixup"

    def path_law(self) -> tuple[str, float] | None:
        # rule 1 zeroes each branch's last layer: α = 0 at init; without it, no analytic model
        return ("gated", 0.0) if self.zero_init else None

    layer_bias: ClassVar[bool] = False
    resnet_variant: ClassVar[str] = "postact"
    zero_init: bool = True
    rescale: bool = True
    multiplier: bool = True
    biases: bool = True
    #: the fan of He's std in rules 1–2: ``"auto"`` (fan-out for convolutions, as the reference
    #: code; fan-in for linear layers), ``"fan_in"`` or ``"fan_out"``
    fan_mode: str = "auto"

    def __post_init__(self) -> None:
        for key in ("zero_init", "rescale", "multiplier", "biases"):
            if not isinstance(getattr(self, key), bool):
                raise DepthlabError(
                    f"{key} in scheme 'fixup' must be true or false, got {getattr(self, key)!r}"
                )
        if self.fan_mode not in ("auto", "fan_in", "fan_out"):
            raise DepthlabError(
                "fan_mode in scheme 'fixup' must be 'auto', 'fan_in' or 'fan_out', "
                f"got {self.fan_mode!r}"
            )

    def _fan(self, layer: nn.Module) -> int:
        mode = self.fan_mode
        if mode == "auto":
            mode = "fan_in" if isinstance(layer, nn.Linear) else "fan_out"
        return fan(layer.weight, mode)

    def bias(self) -> nn.Module | None:
        return Bias() if self.biases else None

    def identity_at_init(self) -> bool:
        return self.zero_init

    def scale(self) -> nn.Module | None:
        return Gate(1.0, learnable=True) if self.multiplier else None

    def initialize(self, model: nn.Module) -> None:
        blocks = residual_blocks(model)
        num_branches = len(blocks)
        # three passes (inner layers, last layers, shortcuts), so that switching one rule off
        # draws the same random numbers for the layers the other rules initialise
        plan = []
        for blk in blocks:
            gain = None if blk.info is None else blk.info.gain  # the activation's He gain
            gain = math.sqrt(2.0) if gain is None else gain
            layers = weight_layers(blk.branch)
            plan.append((blk, gain, layers))
        with torch.no_grad():
            for _, gain, layers in plan:
                m = len(layers)
                factor = num_branches ** (-1.0 / (2 * m - 2)) if self.rescale and m > 1 else 1.0
                for layer in layers[:-1]:
                    he_std = gain / math.sqrt(self._fan(layer))
                    layer.weight.normal_(0.0, he_std * factor)
                    if layer.bias is not None:
                        layer.bias.zero_()
            for _, gain, layers in plan:
                if not layers:
                    continue
                if self.zero_init:
                    layers[-1].weight.zero_()
                else:  # rule 1 off: the last layer is He-initialised like the others
                    he_std = gain / math.sqrt(self._fan(layers[-1]))
                    layers[-1].weight.normal_(0.0, he_std)
                if layers[-1].bias is not None:
                    layers[-1].bias.zero_()
            for blk, _, _ in plan:
                if self.fan_mode != "fan_in" and blk.shortcut is not None:
                    for layer in weight_layers(blk.shortcut):  # the reference's downsample init
                        layer.weight.normal_(0.0, math.sqrt(2.0) / math.sqrt(self._fan(layer)))
            head = classifier_of(model)
            if head is not None and self.zero_init:
                head.weight.zero_()
                if head.bias is not None:
                    head.bias.zero_()


@SCHEMES.register()
@dataclass
class DeepNorm(Scheme):
    """DeepNorm: ``x_{l+1} = LN(α·x_l + f(x_l))`` with branch weights initialised × β.

    Wang et al. 2022, "DeepNet: Scaling Transformers to 1,000 Layers" (arXiv 2203.00555).

    * Encoder-only (or decoder-only) stack of N layers (2N residual sublayers):
      ``α = (2N)^(1/4)``, ``β = (8N)^(-1/4)``; in terms of L residual blocks (L = 2N) that is
      ``α = L^(1/4)``, ``β = (4L)^(-1/4)``, which is what non-Transformer models use.
    * Encoder–decoder with N encoder and M decoder layers (blocks built with a :class:`Stack`):
      encoder ``α = 0.81·(N⁴M)^(1/16)``, ``β = 0.87·(N⁴M)^(-1/16)``; decoder
      ``α = (3M)^(1/4)``, ``β = (12M)^(-1/4)`` (the paper's Table/Fig. 2). torchscale's code
      divides the encoder's weights by ``(N⁴M)^(1/16)/1.15``, i.e. multiplies them by
      ``1.15·(N⁴M)^(-1/16)``, not the paper's 0.87; depthlab follows the paper.

    β applies to the value and output projections (self- and cross-attention) and the
    feed-forward layers, not to queries and keys. ``init`` chooses how:

    * ``"xavier_normal"`` (default): the paper's pseudo-code, ``xavier_normal_(w, gain=β)``,
      zero biases;
    * ``"scale_default"``: torchscale's code, which divides the layers' existing init by 1/β —
      here each layer's PyTorch default init (``nn.Linear.reset_parameters``: weights and biases
      uniform in ±1/√fan_in) multiplied by β, weights and biases alike. (torchscale's own
      attention projections start Xavier-uniform, its feed-forward layers PyTorch's default.)
    """

    name: ClassVar[str] = "deepnorm"

    def path_law(self) -> None:
        return None  # LN(α·x + f(x)): not in the analytic model

    init: str = "xavier_normal"

    def __post_init__(self) -> None:
        if self.init not in ("xavier_normal", "scale_default"):
            raise DepthlabError(
                f"init in scheme 'deepnorm' must be 'xavier_normal' or 'scale_default', "
                f"got {self.init!r}"
            )

    @staticmethod
    def alpha(num_blocks: int) -> float:
        return float(num_blocks) ** 0.25

    @staticmethod
    def beta(num_blocks: int) -> float:
        return float(4 * num_blocks) ** -0.25

    @staticmethod
    def encoder_decoder(encoder_layers: int, decoder_layers: int) -> dict[str, float]:
        """The encoder–decoder constants: ``{"encoder_alpha", "encoder_beta", "decoder_alpha",
        "decoder_beta"}`` for N encoder and M decoder layers (DeepNet, arXiv 2203.00555)."""
        n, m = float(encoder_layers), float(decoder_layers)
        return {
            "encoder_alpha": 0.81 * (n**4 * m) ** (1 / 16),
            "encoder_beta": 0.87 * (n**4 * m) ** (-1 / 16),
            "decoder_alpha": (3 * m) ** 0.25,
            "decoder_beta": (12 * m) ** -0.25,
        }

    def skip_mult(self, num_blocks: int, stack: Stack | None = None) -> float:
        if stack is not None:
            c = self.encoder_decoder(stack.encoder_layers, stack.decoder_layers)
            return c[f"{stack.role}_alpha"]
        return self.alpha(num_blocks)

    def post_norm(self, num_features: int, layout: str) -> nn.Module | None:
        return create_norm("layernorm", num_features, layout)

    def initialize(self, model: nn.Module) -> None:
        blocks = residual_blocks(model)
        with torch.no_grad():
            for blk in blocks:
                if blk.stack is not None:
                    c = self.encoder_decoder(blk.stack.encoder_layers, blk.stack.decoder_layers)
                    beta = c[f"{blk.stack.role}_beta"]
                else:
                    beta = self.beta(len(blocks))
                layers = _beta_layers(blk.branch)
                for layer in layers:
                    if self.init == "xavier_normal":
                        nn.init.xavier_normal_(layer.weight, gain=beta)
                        if layer.bias is not None:
                            layer.bias.zero_()
                    else:
                        layer.reset_parameters()
                        layer.weight.mul_(beta)
                        if layer.bias is not None:
                            layer.bias.mul_(beta)


@SCHEMES.register()
@dataclass
class NF(Scheme):
    """NF-ResNet: normalization-free residual blocks with signal bookkeeping.

    Brock, De & Smith 2021, "Characterizing signal propagation to close the performance gap in
    unnormalized ResNets" (arXiv 2101.08692), Sec. 4:

    * ``h_{i+1} = h_i + α·f_i(h_i/β_i)``, with ``β_i = √Var(h_i)`` the *expected* standard
      deviation of the block's input, tracked analytically: ``Var(h_0) = 1`` after the stem,
      ``Var(h_{i+1}) = Var(h_i) + α²``; at a transition block (a projection shortcut) the
      shortcut is fed the β-scaled input too, ``h_{i+1} = shortcut(h_i/β_i) + α·f_i(h_i/β_i)``,
      and the variance resets to ``1 + α²``. ``α`` (default 0.2) and every ``1/β_i`` are fixed.
    * every weight layer (stem, branches, projection shortcuts) uses scaled weight
      standardization (:class:`~depthlab.nn.ws.WSConv2d`, :class:`~depthlab.nn.ws.WSLinear`)
      with the gain γ of the activation it reads (ReLU: √(2/(1−1/π)) ≈ 1.7129), so a branch maps a
      unit-variance input to a unit-variance output; no normalization layer anywhere.

    So the expected variance at each block's input is :meth:`expected_variances`, and at init
    the measured one matches it (tested on MLP, ResNet and a Transformer). Token models start
    the stream at unit variance: ``initialize`` draws their embeddings (token and position,
    summed) from N(0, 1/k), k the number of embedding tables. Transformers: attention averages
    values over tokens, so their attention branches keep unit variance only for one-token
    sequences (or uncorrelated outputs); the track then bounds the variance from above. The
    classifier stays a plain linear layer. On ResNets the pre-activation network is built.
    """

    name: ClassVar[str] = "nf"
    resnet_variant: ClassVar[str] = "preact"
    alpha: float = 0.2

    def __post_init__(self) -> None:
        a = self.alpha
        if (
            isinstance(a, bool)
            or not isinstance(a, (int, float))
            or not (math.isfinite(a) and a >= 0)
        ):
            raise DepthlabError(f"alpha in scheme 'nf' must be a finite number ≥ 0, got {a!r}")

    def path_law(self) -> None:
        return None  # the β-scaled input is not in the analytic path model

    def gate(self, num_blocks: int) -> nn.Module | None:
        return Gate(self.alpha, learnable=False)

    def linear(self, in_features, out_features, *, bias=None, act=None) -> nn.Module:
        bias = self.layer_bias if bias is None else bias
        return WSLinear(in_features, out_features, bias=bias, gamma=activation_gain(act))

    def conv(
        self, in_channels, out_channels, kernel_size, *, stride=1, padding=0, bias=None, act=None
    ) -> nn.Module:
        bias = self.layer_bias if bias is None else bias
        return WSConv2d(
            in_channels,
            out_channels,
            kernel_size,
            stride=stride,
            padding=padding,
            bias=bias,
            gamma=activation_gain(act),
        )

    def residual(
        self,
        branch: nn.Module,
        num_features: int,
        layout: str,
        num_blocks: int,
        shortcut: nn.Module | None = None,
        post_act: nn.Module | None = None,
        stack: Stack | None = None,
        info: BlockInfo | None = None,
    ) -> Residual:
        # 1/β_i before the branch and (transition blocks) the shortcut; set by initialize
        rest = list(branch.children()) if isinstance(branch, nn.Sequential) else [branch]
        branch = Branch(Gate(1.0, learnable=False), *rest)
        if shortcut is not None:
            shortcut = nn.Sequential(Gate(1.0, learnable=False), shortcut)
        return super().residual(
            branch, num_features, layout, num_blocks, shortcut, post_act, stack, info
        )

    def expected_variances(self, model: nn.Module) -> list[float]:
        """``Var(h_i)`` expected at the input of each residual block, in forward order (a new
        encoder–decoder stack starts again at 1)."""
        out, var, role = [], 1.0, None
        for blk in residual_blocks(model):
            stack_role = None if blk.stack is None else blk.stack.role
            if stack_role != role:
                var, role = 1.0, stack_role
            out.append(var)
            var = (1.0 if blk.shortcut is not None else var) + self.alpha**2
        return out

    def initialize(self, model: nn.Module) -> None:
        blocks = residual_blocks(model)
        embeddings = [m for m in model.modules() if isinstance(m, nn.Embedding)]
        with torch.no_grad():
            for blk, var in zip(blocks, self.expected_variances(model), strict=True):
                inv_beta = 1.0 / math.sqrt(var)
                blk.branch[0].alpha.fill_(inv_beta)
                if blk.shortcut is not None:
                    blk.shortcut[0].alpha.fill_(inv_beta)
            for emb in embeddings:  # the stream starts at unit variance
                emb.weight.normal_(0.0, 1.0 / math.sqrt(len(embeddings)))
            for m in model.modules():
                if isinstance(m, WeightStandardized):
                    m.reset_gain()


@SCHEMES.register()
@dataclass
class Admin(LayerNorm):
    """Admin: Post-LN with a profiled skip multiplier, ``x_i = LN(ω_i ⊙ x_{i-1} + f_i(x_{i-1}))``.

    Liu, Liu, Gao, Chen & Han 2020, "Understanding the Difficulty of Training Transformers"
    (arXiv 2004.08249), Sec. 4.2. ω_i is a per-feature vector (learnable by default, as in the
    reference code), initialised from one forward pass at init (``omega="profile"``): in
    forward order, ``ω_1 = 1`` and ``ω_{i+1} = √(Var[ω_i ⊙ x_{i-1}] + Var[f_i(x_{i-1})])`` —
    each block's skip then carries the variance of everything summed into the stream before it,
    so no single branch dominates the update (the reference ``adaptive-profiling`` code; an
    encoder–decoder profiles each stack from 1). The profiling input is the model's
    ``example_input()`` (a fixed random batch; the global random stream is not used); call
    :meth:`profile` to profile on your own batch. A number for ``omega`` sets every ω to it
    instead (1: Post-LN with a learnable skip).
    """

    name: ClassVar[str] = "admin"
    fixed_placement: ClassVar[str | None] = "post"
    placement: str = "post"
    omega: float | str = "profile"
    learnable: bool = True

    def __post_init__(self) -> None:
        super().__post_init__()
        w = self.omega
        if w != "profile" and (
            isinstance(w, bool)
            or not isinstance(w, (int, float))
            or not (math.isfinite(w) and w > 0)
        ):
            raise DepthlabError(
                f"omega in scheme 'admin' must be 'profile' or a finite number > 0, got {w!r}"
            )

    def path_law(self) -> None:
        return None  # LN(ω·x + f(x)) with a profiled ω: not in the analytic model

    def skip(self, num_features: int, layout: str, info: BlockInfo) -> nn.Module:
        init = 1.0 if self.omega == "profile" else float(self.omega)
        return FeatureScale(num_features, layout, init=init, learnable=self.learnable)

    @staticmethod
    def profile(model: nn.Module, x: object) -> list[float]:
        """Set every block's ω from one forward pass of ``model`` on ``x`` (a tensor, or a tuple
        of positional inputs), in forward order; returns the ω values."""
        blocks = [b for b in residual_blocks(model) if isinstance(b.skip_scale, FeatureScale)]
        state = {"ratio": 1.0, "role": None}
        omegas: list[float] = []
        branch_out: dict[int, torch.Tensor] = {}  # each block's gated branch output, by id
        handles = []

        def before(blk, inputs):
            role = None if blk.stack is None else blk.stack.role
            if role != state["role"]:
                state["ratio"], state["role"] = 1.0, role
            blk.skip_scale.omega.fill_(state["ratio"])
            omegas.append(state["ratio"])

        def after(blk, inputs, output):
            u = inputs[0]
            skip_var = blk.skip_scale(blk.skip(u)).double().var(unbiased=False)
            branch_var = branch_out.pop(id(blk)).double().var(unbiased=False)
            state["ratio"] = float(torch.sqrt(skip_var + branch_var))

        def on_branch(branch, inputs, output, blk):
            branch_out[id(blk)] = output if blk.gate is None else blk.gate(output)

        try:
            for blk in blocks:
                handles.append(blk.register_forward_pre_hook(before))
                handles.append(blk.register_forward_hook(after))
                handles.append(
                    blk.branch.register_forward_hook(
                        lambda m, i, o, blk=blk: on_branch(m, i, o, blk)
                    )
                )
            with torch.no_grad():
                model(*x) if isinstance(x, tuple) else model(x)
        finally:
            for h in handles:
                h.remove()
        return omegas

    def initialize(self, model: nn.Module) -> None:
        if self.omega != "profile" or any(p.is_meta for p in model.parameters()):
            return  # (a block built inside a model on the meta device: the model profiles)
        example = getattr(type(model), "example_input", None)
        if example is None:
            raise DepthlabError(
                f"scheme 'admin' profiles ω with one forward pass, but {type(model).__name__} "
                "has no example_input(); build with scheme_options omega=1 and call "
                "depthlab.schemes.Admin.profile(model, x) on a batch of your data"
            )
        Admin.profile(model, model.example_input())


def classifier_of(model: nn.Module) -> nn.Module | None:
    """The model's classifier head, part of the model protocol: ``model.classifier`` (depthlab's
    models; None for a tied language model) or ``model.fc`` (torchvision's and timm's ResNets);
    None when it has neither. Scheme rules on the head (Fixup's zero classifier) read it here."""
    head = getattr(model, "classifier", None)
    return head if head is not None else getattr(model, "fc", None)


def _beta_layers(branch: nn.Module) -> list[nn.Module]:
    """The layers DeepNorm scales by β: every weight layer of ``branch`` but an attention's
    queries and keys (its :meth:`~depthlab.nn.MultiHeadAttention.value_layers` only)."""
    attn = [m for m in branch.modules() if isinstance(m, MultiHeadAttention)]
    inside = {id(layer) for a in attn for layer in weight_layers(a)}
    values = [layer for a in attn for layer in a.value_layers()]
    return values + [layer for layer in weight_layers(branch) if id(layer) not in inside]


def list_schemes() -> list[str]:
    """Names of every registered scheme."""
    return SCHEMES.names()


def get_scheme(scheme: str | Scheme, **options: object) -> Scheme:
    """Resolve a scheme name (plus options) or pass a :class:`Scheme` through.

    >>> get_scheme("skipinit", alpha_init="1/sqrt(d)")
    """
    cls = type(scheme) if isinstance(scheme, Scheme) else SCHEMES.get(scheme)
    valid = [f.name for f in dataclasses.fields(cls)]
    bad = [k for k in options if k not in valid]
    if bad:
        choices = ", ".join(valid) if valid else "(this scheme takes no options)"
        raise DepthlabError(f"unknown option(s) {bad} for scheme '{cls.name}'; valid: {choices}")
    from depthlab.validate import _kinds, check_value

    fields = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in options.items():
        kinds = _kinds(fields[k].type, fields[k].default)
        if kinds == {"bool"}:  # other kinds are checked by the scheme, with its own message
            options[k] = check_value(k, v, kinds, f"scheme '{cls.name}'")
    if isinstance(scheme, Scheme):
        return dataclasses.replace(scheme, **options) if options else scheme
    return cls(**options)
