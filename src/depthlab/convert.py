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
    if new is not None and old is not None and type(old) is type(new):
        return old
    return new


def _convert_block(block: nn.Module, s: Scheme, num_blocks: int, index: int) -> Residual:
    """A torchvision/timm ``BasicBlock`` or ``Bottleneck`` (post-activation, ResNet v1/v1.5)
    as ``relu(shortcut(x) + gate · f(x))`` with the scheme's norms, biases and multipliers:

    ``f = [b] conv1 [norm] [b] relu [b] conv2 [norm] ... [·s] [b]``.
    """
    for extra in ("se", "aa", "drop_block", "drop_path"):
        sub = getattr(block, extra, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            raise DepthlabError(
                f"cannot convert a block with a '{extra}' module ({type(sub).__name__}); "
                "only plain BasicBlock/Bottleneck ResNets are supported"
            )
    names = ["1", "2"] + (["3"] if hasattr(block, "conv3") else [])
    layers: list[nn.Module | None] = []
    for i, k in enumerate(names):
        conv = getattr(block, f"conv{k}")
        norm = _norm_like(s, getattr(block, f"bn{k}", None), conv.out_channels)
        layers += [s.bias(), _with_bias(conv, s.layer_bias and norm is None), norm]
        if i == len(names) - 1:
            layers += [s.scale(), s.bias()]
        else:
            layers += [s.bias(), nn.ReLU(inplace=True)]
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
    res.post = nn.Sequential(res.post, nn.ReLU()) if res.post is not None else nn.ReLU()
    return res


def convert(model: nn.Module, scheme: str | Scheme, inplace: bool = False, **options) -> nn.Module:
    """Rewrite the residual blocks of ``model`` for ``scheme`` and re-initialise per the scheme.

    * depthlab models are rebuilt with the same constructor arguments and the new scheme.
    * torchvision (and plain timm) ``BasicBlock``/``Bottleneck`` ResNets: every block becomes a
      :class:`~depthlab.nn.Residual` ``relu(shortcut(x) + gate·f(x))``; each BatchNorm of the
      branches, projections and stem becomes the scheme's norm (kept as it is, with its trained
      statistics, for ``batchnorm``; removed for normalization-free schemes); convs left without
      a norm get zero biases where the scheme wants them (SkipInit); Fixup's scalar biases and
      multiplier are inserted; then ``scheme.initialize`` applies (e.g. Fixup's rescaling and
      zero classifier ``fc``). Other weights are kept, so a SkipInit conversion of a trained
      model computes ``relu(shortcut(x))`` in every block until α moves.

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
    target = model if inplace else copy.deepcopy(model)
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
    stem_bn = getattr(target, "bn1", None)
    if isinstance(stem_bn, _NORMS):  # the stem: conv1 -> bn1 -> relu
        norm = _norm_like(s, stem_bn, _num_features(stem_bn))
        target.bn1 = norm or s.bias() or nn.Identity()
        if norm is None and s.layer_bias and isinstance(getattr(target, "conv1", None), nn.Conv2d):
            target.conv1 = _with_bias(target.conv1, True)
    s.initialize(target)
    return target
