"""The data set interface the training loop consumes.

A :class:`Dataset` is a fixed train/test split. The training batch for step ``s`` is a *pure
function* of ``(seed, s)``: the examples of epoch ``e`` are visited in the order of a permutation
drawn from a generator seeded by ``(seed, e)``, and any random augmentation of step ``s`` uses a
generator seeded by ``(seed, s)``. So the "data position" of a run is just its step, a resumed
run sees exactly the batches an uninterrupted one would, and ``W`` distributed ranks that each
take their slice of the same global batch see together what one process sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

Batch = tuple[torch.Tensor, torch.Tensor]


def generator(seed: int, *keys: int) -> torch.Generator:
    """A CPU generator seeded by a hash of ``(seed, *keys)`` (distinct streams per key)."""
    h = int(seed) & 0xFFFFFFFF
    for k in keys:
        h = (h * 1_000_003 + int(k) + 0x9E3779B9) & 0xFFFFFFFFFFFF
    return torch.Generator().manual_seed(h)


class Dataset:
    """Base class. Subclasses set the attributes below and implement :meth:`train_batch`,
    :meth:`test_batches` and :meth:`num_train`.

    * ``name``: registry name; ``task``: ``"classification"``, ``"regression"`` or ``"lm"``;
    * ``input_shape``: shape of one input (e.g. ``(1, 8, 8)``, ``(64,)``, ``(T,)`` for bytes);
    * ``num_classes``: number of classes (vocabulary size 256 for ``lm``), or ``None``.
    """

    name: str = "base"
    task: str = "classification"
    input_shape: tuple[int, ...] = ()
    num_classes: int | None = None

    @classmethod
    def shape_hint(cls, **options: object) -> tuple[int, ...]:
        """The ``input_shape`` the data set will have with ``options``, known before it is
        loaded (for memory checks); ``()`` when unknown."""
        return tuple(cls.input_shape)

    def num_train(self) -> int:
        """Training examples per epoch."""
        raise NotImplementedError

    def steps_per_epoch(self, batch_size: int) -> int:
        return max(1, self.num_train() // batch_size)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        """The global training batch of ``step`` (augmented), a pure function of its arguments."""
        raise NotImplementedError

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        """The fixed evaluation set in batches (no augmentation)."""
        raise NotImplementedError

    def model_hints(self) -> dict[str, int]:
        """Model constructor arguments this data set determines (``in_dim``, ``in_channels``,
        ``num_classes``, ``vocab_size``, ``context``); the CLI passes those a model accepts."""
        hints: dict[str, int] = {"in_dim": int(math.prod(self.input_shape))}
        if len(self.input_shape) == 3:
            hints["in_channels"] = int(self.input_shape[0])
        if self.num_classes is not None:
            hints["num_classes"] = int(self.num_classes)
        return hints

    def describe(self) -> str:
        return (
            f"{self.name} ({self.task}, input {tuple(self.input_shape)}, {self.num_train()} train)"
        )

    def __repr__(self) -> str:
        return f"<Dataset {self.describe()}>"


class TensorDataset(Dataset):
    """A data set held as tensors ``x_train, y_train, x_test, y_test`` in memory."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def __init__(self) -> None:
        self._perm_key: tuple[int, int] | None = None
        self._perm: torch.Tensor | None = None

    def num_train(self) -> int:
        return int(self.x_train.shape[0])

    def epoch_permutation(self, epoch: int, seed: int) -> torch.Tensor:
        """The visiting order of epoch ``epoch`` (cached for the current epoch)."""
        if self._perm_key != (seed, epoch):
            self._perm = torch.randperm(self.num_train(), generator=generator(seed, 1, epoch))
            self._perm_key = (seed, epoch)
        assert self._perm is not None
        return self._perm

    def batch_indices(self, step: int, batch_size: int, seed: int) -> torch.Tensor:
        """Indices of step ``step``: slice ``step mod S`` of epoch ``step // S``'s permutation,
        with S = ⌊n / batch_size⌋ batches per epoch (the remainder of each epoch is dropped)."""
        n = self.num_train()
        if batch_size > n:  # tiny data sets: sample with a per-step permutation instead
            g = generator(seed, 2, step)
            reps = -(-batch_size // n)
            return torch.cat([torch.randperm(n, generator=g) for _ in range(reps)])[:batch_size]
        per_epoch = self.steps_per_epoch(batch_size)
        epoch, i = divmod(step, per_epoch)
        return self.epoch_permutation(epoch, seed)[i * batch_size : (i + 1) * batch_size]

    def augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """Random augmentation of a training batch; identity by default."""
        return x

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        idx = self.batch_indices(step, batch_size, seed)
        x = self.augment(self.x_train[idx], generator(seed, 3, step))
        return x, self.y_train[idx]

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        for i in range(0, int(self.x_test.shape[0]), batch_size):
            yield self.x_test[i : i + batch_size], self.y_test[i : i + batch_size]
