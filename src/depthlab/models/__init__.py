"""Model registry: ``create_model(name, depth=..., scheme=..., **kw)``."""

from __future__ import annotations

import inspect

from torch import nn

from depthlab.gctools import paused
from depthlab.models.linear import LinearNet
from depthlab.models.mlp import MLP
from depthlab.models.resnet import BottleneckResNet, ResNet
from depthlab.models.transformer import TransformerBlock, TransformerLM, TransformerSeq2Seq
from depthlab.registry import DepthlabError, Registry
from depthlab.resources import allocation_error, check_fits
from depthlab.validate import check_kwargs

MODELS: Registry[type[nn.Module]] = Registry("model")
MODELS.register("mlp")(MLP)
MODELS.register("resnet")(ResNet)
MODELS.register("resnet-bottleneck")(BottleneckResNet)
MODELS.register("linear")(LinearNet)
MODELS.register("transformer-lm")(TransformerLM)


def list_models() -> list[str]:
    """Names of every registered model."""
    return MODELS.names()


def model_options(name: str) -> list[str]:
    """The keyword arguments model ``name`` accepts."""
    sig = inspect.signature(MODELS.get(name).__init__)
    return [p for p in sig.parameters if p != "self"]


def create_model(name: str, **kwargs: object) -> nn.Module:
    """Build a registered model: ``create_model("resnet", depth=110, scheme="fixup")``.

    Every model takes ``depth`` and ``scheme`` (a name or a :class:`~depthlab.Scheme`), plus
    ``scheme_options`` (a dict, e.g. ``{"alpha_init": "1/sqrt(d)"}``) and its own options.
    ``grow=[[n, where], …]`` (a grown model's ``config["grow"]``) rebuilds a model grown by
    :func:`depthlab.grow`, ready for its state dict.
    """
    cls = MODELS.get(name)
    growths = kwargs.pop("grow", None)
    valid = model_options(name)
    bad = [k for k in kwargs if k not in valid]
    if bad:
        choices = ", ".join(valid)
        raise DepthlabError(f"unknown option(s) {bad} for model '{name}'; valid: {choices}")
    kwargs = check_kwargs(cls.__init__, kwargs, f"model '{name}'")
    need = check_fits(name, kwargs, copies=1)  # before building: huge sizes are refused
    try:
        with paused():  # ~10⁵ new objects: no full collections while they are made
            model = cls(**kwargs)
    except (RuntimeError, MemoryError) as e:
        err = allocation_error(e, f"building model '{name}'", need)
        if err is None:
            raise
        raise err from None
    if growths:
        from depthlab.models.grow import replay

        replay(model, growths)
    return model


__all__ = [
    "MODELS",
    "MLP",
    "BottleneckResNet",
    "LinearNet",
    "ResNet",
    "TransformerBlock",
    "TransformerLM",
    "TransformerSeq2Seq",
    "create_model",
    "list_models",
    "model_options",
]
