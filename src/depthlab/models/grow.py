"""Growing a trained network: insert new residual blocks that leave its function unchanged.

Bachlechner et al. 2020, "ReZero is All You Need: Fast Convergence at Large Depth"
(arXiv 2003.04887): because a ReZero block with α = 0 is the identity, the technique "also makes
it possible to add new layers to an existing trained network". :func:`grow` does that for
depthlab's MLP, CIFAR and bottleneck ResNets and Transformer language models:

* each new block is built by the model's own block factory (``model.grow_block``), so the
  scheme's other parts (norms, scalar biases and multipliers, gates) are there, and initialised by
  the model's own rules for the new depth (``model.reset_parameters`` on the grown model, then
  every old parameter and buffer put back exactly);
* it is then made the identity: a learnable gate (ReZero, SkipInit) is set to α = 0; a block
  without one (plain, BN, LayerNorm, Fixup) gets its branch's last weight layer (and bias) zeroed,
  as Fixup's rule 1 and BN's ``zero_init_residual`` do. A block whose skip is not the identity
  (a skip multiplier ≠ 1: ``scaled``, ``deepnorm``, ``noskip``; a norm after the sum: Post-LN)
  cannot be, and is refused before anything changes;
* ``where`` places the new blocks: ``"end"`` after the last block, ``"even"`` spread evenly
  after the existing ones (8 → 32 puts three after each), or an index (0 = before the first).
  ResNet blocks take the channels of the place they go to (their stage);
* the model's ``config["grow"]`` records each growth as ``[n, where]``, so
  ``create_model(name, **config)`` rebuilds the grown structure (then load its state dict);
* ``optimizer`` (optional) gets the new parameters as extra groups with the hyperparameters of
  the existing group of the same kind (``decay``/``vectors``/``scalars`` as in
  :func:`depthlab.train.param_groups`); the old parameters keep their state.
  :func:`carry_state` instead gives a fresh optimizer over the whole grown model the old
  parameters' state (what ``depthlab train --resume --grow`` does, so that
  later checkpoints have the usual groups).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from depthlab.nn.residual import Residual, weight_layers
from depthlab.registry import DepthlabError

WHERE = ("end", "even")


def insertion_points(n: int, units: int, where: str | int) -> list[int]:
    """Where each of ``n`` new units goes: indices into the ``units`` existing ones (0 = before
    the first, ``units`` = after the last), ascending; several may share an index."""
    if isinstance(where, bool) or not isinstance(where, (str, int)):
        raise DepthlabError(f"where must be 'end', 'even' or a block index, got {where!r}")
    if isinstance(where, int):
        if not 0 <= where <= units:
            raise DepthlabError(
                f"where={where} is outside the model's {units} blocks; use 0 … {units}, "
                "'end' or 'even'"
            )
        return [where] * n
    if where == "end":
        return [units] * n
    if where == "even":
        return [math.ceil((k + 1) * units / n) for k in range(n)]
    raise DepthlabError(f"where must be 'end', 'even' or a block index, got {where!r}")


def _identity_plan(unit: list[nn.Module], model: nn.Module) -> list[Callable[[], None]]:
    """The edits that make each residual block of a new unit the identity, or a clear error."""
    plan = []
    for blk in unit:
        if not isinstance(blk, Residual):
            raise DepthlabError(f"grow: {type(blk).__name__} is not a residual block")
        name = getattr(getattr(model, "scheme", None), "name", "?")
        if blk.skip_mult != 1.0:
            mult = "a learnable ω" if blk.skip_mult is None else f"{blk.skip_mult:g}"
            raise DepthlabError(
                f"grow: a new block of scheme '{name}' cannot be the identity (its skip is "
                f"multiplied by {mult}); grow a model of a scheme whose blocks are "
                "x + f(x): rezero, skipinit, plain, batchnorm, layernorm/prenorm, fixup"
            )
        if blk.post is not None and not (
            isinstance(blk.post, nn.ReLU) and getattr(model, "activation", None) == "relu"
        ):
            raise DepthlabError(
                f"grow: a new block of scheme '{name}' applies {type(blk.post).__name__} after "
                "the sum, so it cannot be the identity; grow a pre-norm or gated model"
            )
        gate = blk.gate
        if gate is not None and isinstance(getattr(gate, "alpha", None), nn.Parameter):
            plan.append(lambda g=gate: g.alpha.data.zero_())
            continue
        layers = weight_layers(blk.branch)
        if not layers:
            raise DepthlabError("grow: a new block has neither a learnable gate nor a weight layer")
        last = layers[-1]

        def zero(layer: nn.Module = last) -> None:
            layer.weight.data.zero_()
            if layer.bias is not None:
                layer.bias.data.zero_()

        plan.append(zero)
    return plan


def _plan(model: nn.Module, n: int, where: str | int):
    """The existing units, the new ones (built on the meta device, by insertion index) and the
    edits that make them the identity; a :class:`DepthlabError` for anything that cannot grow."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise DepthlabError(f"grow: n must be a positive integer, got {n!r}")
    if not all(hasattr(model, a) for a in ("grow_block", "grow_units", "grow_features")):
        raise DepthlabError(
            f"grow works on depthlab's mlp, resnet, resnet-bottleneck and transformer-lm models, "
            f"not {type(model).__name__}"
        )
    units: list[list[nn.Module]] = model.grow_units()
    points = insertion_points(n, len(units), where)
    num_blocks = (len(units) + n) * (len(units[0]) if units else 1)
    new: list[tuple[int, list[nn.Module]]] = []
    plans: list[Callable[[], None]] = []
    for p in points:
        with torch.device("meta"):
            mods = list(model.grow_block(model.grow_features(p, units), num_blocks))
        plans += _identity_plan(mods, model)
        new.append((p, mods))
    return units, new, plans


def check(model: nn.Module, n: int, where: str | int = "end") -> None:
    """Raise :class:`DepthlabError` if ``grow(model, n, where)`` would; change nothing."""
    _plan(model, n, where)


def grow(
    model: nn.Module,
    n: int,
    where: str | int = "end",
    optimizer: torch.optim.Optimizer | None = None,
) -> list[nn.Module]:
    """Insert ``n`` new residual blocks (Transformer: layers) into ``model`` so that its function
    is exactly unchanged; return the new modules. See the module docstring."""
    units, new, plans = _plan(model, n, where)  # refuses before the model is touched
    ref = next(model.parameters())
    from depthlab.models.common import BlockStack, materialize

    old = [(t, t.detach().clone()) for t in (*model.parameters(), *model.buffers())]
    for _, mods in new:
        holder = nn.ModuleList(mods)  # one call: parameters shared within a unit stay shared
        materialize(holder, ref.device)
        holder.to(dtype=ref.dtype)
    flat: list[nn.Module] = []
    k = 0
    for i in range(len(units) + 1):
        while k < len(new) and new[k][0] == i:
            flat += new[k][1]
            k += 1
        if i < len(units):
            flat += units[i]
    stack = BlockStack(*flat)
    for attr in ("checkpoint_segments", "fuse", "sgd_in_backward"):
        if attr in model.blocks.__dict__:
            setattr(stack, attr, model.blocks.__dict__[attr])
    stack.train(model.blocks.training)
    model.blocks = stack
    with torch.no_grad():
        model.reset_parameters()  # the new blocks get the scheme's init at the new depth …
        for t, saved in old:  # … and every old tensor is put back as it was
            t.copy_(saved)
        for edit in plans:
            edit()
    model.grow_commit(n)
    model.config = {**model.config, "grow": [*model.config.get("grow", []), [n, where]]}
    added = [m for _, mods in new for m in mods]
    if optimizer is not None:
        add_to_optimizer(optimizer, [p for m in added for p in m.parameters() if p.requires_grad])
    return added


def _kind(p: torch.Tensor) -> str:
    return "scalars" if p.dim() == 0 else "vectors" if p.dim() == 1 else "decay"


def add_to_optimizer(optimizer: torch.optim.Optimizer, params: list[nn.Parameter]) -> None:
    """Add ``params`` to ``optimizer`` as new groups, one per kind, each with the hyperparameters
    of the existing group of that kind (by its ``name``; else of the first group)."""
    by_kind: dict[str, list[nn.Parameter]] = {}
    for p in params:
        by_kind.setdefault(_kind(p), []).append(p)
    for kind, ps in by_kind.items():
        like = next((g for g in optimizer.param_groups if g.get("name") == kind), None)
        like = like or optimizer.param_groups[0]
        optimizer.add_param_group(
            {**{k: v for k, v in like.items() if k != "params"}, "params": ps}
        )


def carry_state(old: torch.optim.Optimizer, new: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """Give ``new`` (an optimizer over the grown model) ``old``'s per-parameter state (momentum
    buffers, Adam moments, step counts) for every parameter both cover; return ``new``."""
    covered = {id(p) for g in new.param_groups for p in g["params"]}
    for p, state in old.state.items():
        if id(p) in covered:
            new.state[p] = state
    return new


def replay(model: nn.Module, growths: list) -> nn.Module:
    """Apply recorded growths (``config["grow"]``: ``[[n, where], …]``) to a freshly built model,
    to rebuild a grown model's structure before loading its state dict."""
    if not isinstance(growths, (list, tuple)):
        raise DepthlabError(f"grow must be a list of [n, where] pairs, got {growths!r}")
    for item in growths:
        if not isinstance(item, (list, tuple)) or len(item) != 2:
            raise DepthlabError(f"grow must be a list of [n, where] pairs, got item {item!r}")
        grow(model, item[0], item[1])
    return model
