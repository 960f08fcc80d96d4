"""Apply a residual scheme to an existing model: depthlab's own, or torchvision/timm ResNets."""

from __future__ import annotations

import copy

from torch import nn

from depthlab.nn.residual import Residual, residual_blocks
from depthlab.registry import DepthlabError
from depthlab.schemes import Scheme, get_scheme

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


def _convert_block(block: nn.Module, s: Scheme, num_blocks: int) -> Residual:
    """A torchvision/timm ``BasicBlock`` or ``Bottleneck`` (post-activation, ResNet v1/v1.5)
    as ``relu(shortcut(x) + gate · f(x))`` with the scheme's norms, biases and multipliers."""
    for extra in ("se", "aa", "drop_block", "drop_path"):
        sub = getattr(block, extra, None)
        if sub is not None and not isinstance(sub, nn.Identity):
            raise DepthlabError(
                f"cannot convert a block with a '{extra}' module ({type(sub).__name__}); "
                "only plain BasicBlock/Bottleneck ResNets are supported"
            )
    convs = [block.conv1, block.conv2] + ([block.conv3] if hasattr(block, "conv3") else [])
    layers: list[nn.Module | None] = []
    for i, conv in enumerate(convs):
        last = i == len(convs) - 1
        layers += [s.bias(), _with_bias(conv, s.layer_bias), s.norm(conv.out_channels, "channels")]
        if last:
            layers += [s.scale(), s.bias()]
        else:
            layers += [s.bias(), nn.ReLU(inplace=False)]
    branch = nn.Sequential(*[m for m in layers if m is not None])
    shortcut = None
    if getattr(block, "downsample", None) is not None:
        ds = [m for m in block.downsample if not isinstance(m, _NORMS)]
        if s.norm(1, "channels") is not None:  # keep the projection's norm for BN schemes
            ds = list(block.downsample)
        shortcut = nn.Sequential(*ds)
    c_out = convs[-1].out_channels
    res = s.residual(branch, c_out, "channels", num_blocks, shortcut)
    res.post = nn.Sequential(res.post, nn.ReLU()) if res.post is not None else nn.ReLU()
    return res


def convert(model: nn.Module, scheme: str | Scheme, inplace: bool = False, **options) -> nn.Module:
    """Rewrite the residual blocks of ``model`` for ``scheme`` and re-initialise per the scheme.

    * depthlab models are rebuilt with the same constructor arguments and the new scheme.
    * torchvision (and plain timm) ``BasicBlock``/``Bottleneck`` ResNets: every block becomes a
      :class:`~depthlab.nn.Residual` ``relu(shortcut(x) + gate·f(x))``; BatchNorm is removed
      (kept for ``batchnorm``) from branches, projections and the stem; convs get biases where
      the scheme wants them; Fixup's scalar biases and multiplier are inserted; then
      ``scheme.initialize`` applies (e.g. Fixup's rescaling and zero classifier ``fc``).

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
    for parent, name, child in parents:
        setattr(parent, name, _convert_block(child, s, len(parents)))
    keep_bn = s.norm(1, "channels") is not None
    if not keep_bn and isinstance(getattr(target, "bn1", None), _NORMS):
        target.bn1 = s.bias() or nn.Identity()
        if s.layer_bias and isinstance(getattr(target, "conv1", None), nn.Conv2d):
            target.conv1 = _with_bias(target.conv1, True)
    s.initialize(target)
    return target
