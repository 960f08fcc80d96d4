"""Residual multilayer perceptron (ReZero's deep fully connected networks; SkipInit's deep linear
ResNet when ``activation="linear"``)."""

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
from depthlab.schemes import BlockInfo, Scheme, get_scheme


class MLP(nn.Module):
    """``stem → depth × block → final norm → σ → classifier`` on flattened inputs.

    Each block is pre-activation: ``f(x) = W σ(norm(x))`` wrapped by the scheme,
    e.g. ReZero ``x + α·W σ(x)``; ``noskip`` gives a plain fully connected net ``W σ(x)``.
    Layers are He-initialised (``std = gain/√fan_in``; gain √2 for ReLU, 1 for linear).
    """

    def __init__(
        self,
        depth: int = 8,
        scheme: str | Scheme = "plain",
        width: int = 256,
        in_dim: int = 64,
        num_classes: int = 10,
        activation: str = "relu",
        scheme_options: dict | None = None,
    ) -> None:
        super().__init__()
        check_positive(depth=depth, width=width, in_dim=in_dim, num_classes=num_classes)
        act = activation
        make_act(act)  # validate before building
        self.config = dict(
            depth=depth, width=width, in_dim=in_dim, num_classes=num_classes, activation=activation
        )  # constructor arguments but the scheme
        self.scheme = get_scheme(scheme, **(scheme_options or {}))
        self.depth, self.width, self.activation = depth, width, act
        self.init_gain = GAINS[act]
        s = self.scheme
        with torch.device("meta"):
            self.stem = s.linear(in_dim, width, bias=True)
            self.blocks = BlockStack(*[self.block(depth, i) for i in range(depth)])
            self.head = seq(s.final_norm(width, "features"), make_act(act), s.bias())
            self.classifier = nn.Linear(width, num_classes)
        materialize(self)
        self.reset_parameters()

    def block(self, num_blocks: int, index: int | None = None) -> nn.Module:
        """One residual block of this model's scheme in a stack of ``num_blocks`` (at position
        ``index``): ``W σ(norm(x))`` wrapped by the scheme."""
        s, act, width = self.scheme, self.activation, self.width
        return s.residual(
            seq(
                s.norm(width, "features"),
                make_act(act),
                s.bias(),
                s.linear(width, width, act=act),
                s.scale(),
                s.bias(),
            ),
            width,
            "features",
            num_blocks,
            info=BlockInfo(index=index, num_blocks=num_blocks, m=1, gain=GAINS[act]),
        )

    def example_input(self, batch_size: int = 64) -> torch.Tensor:
        """A fixed batch of standard-normal inputs ``(batch_size, in_dim)`` (its own generator,
        seed 0): what a scheme profiles the model on at init (Admin)."""
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch_size, self.config["in_dim"], generator=g)
        return x.to(self.stem.weight.device)

    # -- growing (depthlab.models.grow) ---------------------------------------------------
    def grow_units(self) -> list[list[nn.Module]]:
        return [[b] for b in self.blocks]

    def grow_features(self, index: int, units: list[list[nn.Module]]) -> int:
        return self.width

    def grow_block(self, features: int, num_blocks: int) -> list[nn.Module]:
        return [self.block(num_blocks)]

    def grow_commit(self, n: int) -> None:
        self.depth += n

    def reset_parameters(self) -> None:
        default_init(self, self.init_gain)
        self.scheme.initialize(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x.flatten(1))  # (N, width)
        x = self.blocks(x)
        return self.classifier(self.head(x))
