"""Deep linear networks with the initialisations of the degeneracy literature."""

from __future__ import annotations

import re

import torch
from torch import nn

from depthlab.models.common import BlockStack, check_positive, seq
from depthlab.nn.residual import weight_layers
from depthlab.registry import DepthlabError
from depthlab.schemes import BlockInfo, Scheme, get_scheme

INITS = ("standard", "orthogonal", "identity", "fold:k")


def fold_(weight: torch.Tensor, k: int) -> torch.Tensor:
    """Orhan & Pitkow's "Fold k" degeneracy (arXiv 1701.09175): copy the upper half of the matrix
    onto its lower half, k times over (each fold halves the block that is copied).

    The paper's code multiplies ``x @ W`` with ``W`` stored (in, out), so its rows are the
    *inputs*; in torch's (out, in) layout those are the columns. After folding, ``W[:, :n/2^k]``
    is repeated 2^k times along the input axis: each layer only sees sums of its input blocks,
    and the rank drops to ``n/2^k``.
    """
    n = weight.shape[1]
    cols = n // 2**k
    if cols < 1:
        raise DepthlabError(f"fold:{k} needs at least 2^{k} inputs, the matrix has {n}")
    with torch.no_grad():
        left = weight[:, :cols].clone()
        reps = -(-n // cols)  # ceil
        weight.copy_(left.repeat(1, reps)[:, :n])
    return weight


def parse_init(init: str) -> tuple[str, int]:
    m = re.fullmatch(r"fold:(\d+)", init)
    if m:
        return "fold", int(m.group(1))
    if init in ("standard", "orthogonal", "identity"):
        return init, 0
    raise DepthlabError(f"unknown init '{init}' for 'linear'; choose one of: {', '.join(INITS)}")


class LinearNet(nn.Module):
    """A deep linear network ``y = W_L … W_1 x`` of square ``width × width`` matrices.

    With ``scheme="noskip"`` (default) each layer is ``x ↦ W x``; with ``plain`` each is
    ``x ↦ x + W x`` (skip connections, which break the degeneracy of the product; Orhan & Pitkow
    2018, "Skip Connections Eliminate Singularities", arXiv 1701.09175). Inits:

    * ``standard``: ``W ~ N(0, 1/width)`` (variance preserving);
    * ``orthogonal``: random orthogonal ``W`` (``W Wᵀ = I``; Saxe et al. 2013, arXiv 1312.6120);
    * ``identity``: ``W = I``;
    * ``fold:k``: standard, then folded k times (:func:`fold_`), rank ``width/2^k``.

    Other schemes put their slots around W (e.g. ``batchnorm``: ``x + W BN(x)``; ``rezero``:
    ``x + α W x``); the matrices have no bias vectors.
    """

    def __init__(
        self,
        depth: int = 30,
        scheme: str | Scheme = "noskip",
        width: int = 64,
        init: str = "standard",
        scheme_options: dict | None = None,
    ) -> None:
        super().__init__()
        check_positive(depth=depth, width=width)
        self.init_kind, self.fold_k = parse_init(init)
        self.init = init
        self.depth, self.width = depth, width
        self.init_gain = 1.0
        self.config = dict(
            depth=depth, width=width, init=init
        )  # constructor arguments but the scheme
        self.scheme = s = get_scheme(scheme, **(scheme_options or {}))
        blocks = []
        for i in range(depth):
            # the scheme's slots around W (none for noskip/plain: the branch is W itself)
            mods = [s.norm(width, "features"), s.bias(), s.linear(width, width, bias=False)]
            mods = [m for m in [*mods, s.scale(), s.bias()] if m is not None]
            branch = mods[0] if len(mods) == 1 else seq(*mods)
            info = BlockInfo(index=i, num_blocks=depth, m=1, gain=1.0)
            blocks.append(s.residual(branch, width, "features", depth, info=info))
        self.blocks = BlockStack(*blocks)
        self.reset_parameters()

    def layers(self) -> list[nn.Linear]:
        """The weight matrices W_1 … W_L in forward order."""
        return [weight_layers(blk.branch)[0] for blk in self.blocks]

    def weights(self) -> list[torch.Tensor]:
        return [layer.weight for layer in self.layers()]

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for layer in self.layers():
                w = layer.weight
                if self.init_kind == "orthogonal":
                    nn.init.orthogonal_(w)
                elif self.init_kind == "identity":
                    w.copy_(torch.eye(self.width))
                else:
                    w.normal_(0.0, self.width**-0.5)
                    if self.init_kind == "fold":
                        fold_(w, self.fold_k)
            for module in self.modules():
                if module is not self and not isinstance(module, nn.Linear):
                    if hasattr(module, "reset_parameters"):
                        module.reset_parameters()
        self.scheme.initialize(self)

    def example_input(self, batch_size: int = 64) -> torch.Tensor:
        """A fixed batch of standard-normal inputs ``(batch_size, width)`` (its own generator,
        seed 0): what a scheme profiles the model on at init (Admin)."""
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch_size, self.width, generator=g).to(self.layers()[0].weight.device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x.flatten(1))
