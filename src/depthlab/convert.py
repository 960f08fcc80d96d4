"""Apply a residual scheme to an existing model: depthlab's own, or torchvision/timm ResNets."""

from __future__ import annotations

import copy
import math

from torch import nn

from depthlab.nn.residual import Branch, Residual, residual_blocks
from depthlab.registry import DepthlabError
from depthlab.schemes import BlockInfo, Scheme, get_scheme

_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)


def _swap_contents(target: nn.Module, source: nn.Module) -> None:
    """Make ``target`` structurally identical to ``source`` (in-place conversion)."""
    target.__dict__.update(source.__dict__)


def _with_bias(conv: nn.Conv2d, want_bias: bool) -> nn.Conv2d:
    """``conv`` itself, or a copy with (zero) bias vector added when the scheme wants one."""
    if not want_bias or conv.bias is not None:
        return conv
    new = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        groups=conv.groups,
        bias=True,
        padding_mode=conv.padding_mode,
    ).to(conv.weight.device, conv.weight.dtype)
    new.weight.data.copy_(conv.weight.data)
    new.bias.data.zero_()
    return new


def _is_torch_resnet_block(module: nn.Module) -> bool:
    return all(hasattr(module, a) for a in ("conv1", "bn1", "conv2", "bn2")) and isinstance(
        module.conv1, nn.Conv2d
    )


def _num_features(norm: nn.Module) -> int:
    if isinstance(norm, nn.GroupNorm):
        return norm.num_channels
    if isinstance(norm, nn.LayerNorm):
        return norm.normalized_shape[0]
    return norm.num_features


def _norm_like(s: Scheme, old: nn.Module | None, num_features: int) -> nn.Module | None:
    """The scheme's norm in place of the model's norm ``old``: ``old`` itself when it is already
    of that kind (keeps its trained statistics), a fresh one, or None (removed)."""
    new = s.norm(num_features, "channels")
    same = new is not None and old is not None and type(old) is type(new)
    if same and isinstance(old, nn.GroupNorm):  # GroupNorm(32, C) is not LayerNorm's (1, C)
        same = old.num_groups == new.num_groups
    return old if same else new


def _activations(block: nn.Module, n: int) -> tuple[list[nn.Module], nn.Module]:
    """The block's own activations, copied: the ones after each conv but the last, and the one
    after the sum — timm's ``act1 … act{n}`` (SiLU, GELU, … kept as they are), torchvision's one
    ``relu``. The one after the sum is not in place (it reads the sum autograd keeps)."""
    if all(hasattr(block, f"act{k}") for k in range(1, n + 1)):
        inner = [copy.deepcopy(getattr(block, f"act{k}")) for k in range(1, n)]
        post = copy.deepcopy(getattr(block, f"act{n}"))
    else:
        relu = getattr(block, "relu", None)
        if relu is None:
            raise DepthlabError(
                f"cannot convert {type(block).__name__}: no activation modules found (expected "
                "torchvision's 'relu' or timm's 'act1'…'act{n}')"
            )
        inner = [copy.deepcopy(relu) for _ in range(1, n)]
        post = copy.deepcopy(relu)
    if hasattr(post, "inplace"):
        post.inplace = False
    return inner, post


def _convert_block(block: nn.Module, s: Scheme, num_blocks: int, index: int) -> Residual:
    """A torchvision/timm ``BasicBlock`` or ``Bottleneck`` (post-activation, ResNet v1/v1.5)
    as ``act(shortcut(x) + gate · f(x))`` with the scheme's norms, biases and multipliers and the
    block's own activations and stochastic depth:

    ``f = [b] conv1 [norm] [b] act [b] conv2 [norm] ... [·s] [b] [drop_path]``.
    """
    for extra in ("se", "aa", "drop_block"):
        sub = getattr(block, extra, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            raise DepthlabError(
                f"cannot convert a block with a '{extra}' module ({type(sub).__name__}); "
                "only plain BasicBlock/Bottleneck ResNets (with optional drop_path) are supported"
            )
    names = ["1", "2"] + (["3"] if hasattr(block, "conv3") else [])
    inner, post_act = _activations(block, len(names))
    layers: list[nn.Module | None] = []
    for i, k in enumerate(names):
        conv = getattr(block, f"conv{k}")
        norm = _norm_like(s, getattr(block, f"bn{k}", None), conv.out_channels)
        layers += [s.bias(), _with_bias(conv, s.layer_bias and norm is None), norm]
        if i == len(names) - 1:
            layers += [s.scale(), s.bias()]
        else:
            layers += [s.bias(), inner[i]]
    drop_path = getattr(block, "drop_path", None)
    if drop_path is not None and not isinstance(drop_path, nn.Identity):
        layers.append(drop_path)  # stochastic depth on the branch, as in the block's forward
    branch = Branch(*[m for m in layers if m is not None])
    shortcut = None
    if getattr(block, "downsample", None) is not None:
        ds = [
            _norm_like(s, m, _num_features(m)) if isinstance(m, _NORMS) else m
            for m in block.downsample
        ]
        shortcut = nn.Sequential(*[m for m in ds if m is not None])
    c_out = getattr(block, f"conv{names[-1]}").out_channels
    info = BlockInfo(index=index, num_blocks=num_blocks, m=len(names), gain=math.sqrt(2.0))
    res = s.residual(branch, c_out, "channels", num_blocks, shortcut, info=info)
    res.post = nn.Sequential(res.post, post_act) if res.post is not None else post_act
    return res


def _convert_stem(target: nn.Module, s: Scheme) -> None:
    """The stem's norms — ``bn1`` after ``conv1``, and inside a deep stem (timm's ``resnet*d``:
    ``conv1`` a Sequential of conv-norm-act ×2 and a conv) — become the scheme's norm, or its
    scalar bias (none: removed) with a zero bias vector on the conv before where the scheme wants
    one."""
    stem = getattr(target, "conv1", None)
    if isinstance(stem, nn.Sequential):
        mods = list(stem)
        for i, m in enumerate(mods):
            if isinstance(m, _NORMS):
                norm = _norm_like(s, m, _num_features(m))
                mods[i] = norm or s.bias() or nn.Identity()
                if norm is None and s.layer_bias and i and isinstance(mods[i - 1], nn.Conv2d):
                    mods[i - 1] = _with_bias(mods[i - 1], True)
        target.conv1 = nn.Sequential(*mods)
    stem_bn = getattr(target, "bn1", None)
    if isinstance(stem_bn, _NORMS):  # the stem: conv1 -> bn1 -> act
        norm = _norm_like(s, stem_bn, _num_features(stem_bn))
        target.bn1 = norm or s.bias() or nn.Identity()
        last = target.conv1[-1] if isinstance(target.conv1, nn.Sequential) else target.conv1
        if norm is None and s.layer_bias and isinstance(last, nn.Conv2d):
            if isinstance(target.conv1, nn.Sequential):
                target.conv1[-1] = _with_bias(last, True)
            else:
                target.conv1 = _with_bias(last, True)


def _leftover_norms(model: nn.Module, s: Scheme) -> list[str]:
    """Norm layers the conversion left that the scheme does not use (a part of the model
    convert does not know): their names."""
    kinds = {
        type(m)
        for m in (s.norm(8, "channels"), s.post_norm(8, "channels"), s.final_norm(8, "channels"))
        if m is not None
    }
    inside = {id(x) for m in model.modules() if type(m) in kinds for x in m.modules()}
    return [
        f"{name} ({type(m).__name__})"
        for name, m in model.named_modules()
        if isinstance(m, _NORMS) and id(m) not in inside
    ]


def convert(model: nn.Module, scheme: str | Scheme, inplace: bool = False, **options) -> nn.Module:
    """Rewrite the residual blocks of ``model`` for ``scheme`` and re-initialise per the scheme.

    * depthlab models are rebuilt with the same constructor arguments and the new scheme.
    * torchvision and timm ``BasicBlock``/``Bottleneck`` ResNets: every block becomes a
      :class:`~depthlab.nn.Residual` ``act(shortcut(x) + gate·f(x))`` with the block's own
      activations (timm's ``act_layer``, e.g. SiLU, is kept) and its stochastic depth
      (``drop_path``, applied to the branch); each norm of the branches, projections and stem —
      timm's deep stems included — becomes the scheme's norm (kept as it is, with its trained
      statistics, for ``batchnorm``; removed for normalization-free schemes); convs left without
      a norm get zero biases where the scheme wants them (SkipInit); Fixup's scalar biases and
      multiplier are inserted; then ``scheme.initialize`` applies (e.g. Fixup's rescaling and
      zero classifier ``fc``). Other weights are kept, so a SkipInit conversion of a trained
      model computes ``act(shortcut(x))`` in every block until α moves. A model with parts
      convert does not know (squeeze-excitation, anti-aliasing, DropBlock, a norm anywhere else)
      is refused with their names and left unchanged.

    Returns the converted model (``model`` itself when ``inplace=True``).
    """
    s = get_scheme(scheme, **options)
    config = getattr(model, "config", None)
    if isinstance(config, dict) and residual_blocks(model):
        new = type(model)(**config, scheme=s)
        if inplace:
            _swap_contents(model, new)
            return model
        return new

    if type(s).conv is not Scheme.conv or type(s).linear is not Scheme.linear:
        raise DepthlabError(
            f"scheme '{s.name}' builds its own weight layers, and convert keeps a model's "
            "layers and weights, so it cannot apply it to this model; build a depthlab model "
            f"with scheme '{s.name}' instead (e.g. depthlab.create_model('resnet', "
            f"scheme='{s.name}'))"
        )
    target = copy.deepcopy(model)  # converted whole, or not at all
    parents = [
        (parent, name, child)
        for parent in target.modules()
        for name, child in parent.named_children()
        if _is_torch_resnet_block(child)
    ]
    if not parents:
        raise DepthlabError(
            f"{type(model).__name__} has no residual blocks depthlab can convert; supported are "
            "depthlab models and ResNets built from torchvision/timm BasicBlock or Bottleneck"
        )
    for i, (parent, name, child) in enumerate(parents):
        setattr(parent, name, _convert_block(child, s, len(parents), i))
    _convert_stem(target, s)
    left = _leftover_norms(target, s)
    if left:
        raise DepthlabError(
            f"convert to '{s.name}' would leave norm layers it does not know how to replace: "
            f"{', '.join(left[:5])}{' …' if len(left) > 5 else ''}; the model is unchanged. "
            "Supported: torchvision/timm BasicBlock/Bottleneck ResNets with a plain or deep stem"
        )
    s.initialize(target)
    if inplace:
        _swap_contents(model, target)
        return model
    return target
