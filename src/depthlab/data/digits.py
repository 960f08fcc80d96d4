"""scikit-learn's 8×8 handwritten digits: real data that ships with the package (1,797 images)."""

from __future__ import annotations

import torch

from depthlab.data.base import TensorDataset, generator
from depthlab.registry import DepthlabError


class Digits(TensorDataset):
    """The UCI optical handwritten digits (``sklearn.datasets.load_digits``), 10 classes.

    Pixels (0–16) are scaled to ``(x/16 - μ)/σ`` with the scalar mean and std of the training
    pixels. The split is fixed (a seed-0 permutation, the last ``test_fraction`` held out), so
    every run and every training seed sees the same test set: 1,438 train / 359 test by default.
    Inputs are ``(1, 8, 8)`` images, or flat 64-vectors with ``flat=True``.
    """

    name = "digits"
    task = "classification"
    num_classes = 10

    @classmethod
    def shape_hint(cls, flat: object = False, **_: object) -> tuple[int, ...]:
        return (64,) if flat is True else (1, 8, 8)

    def __init__(self, flat: bool = False, test_fraction: float = 0.2) -> None:
        super().__init__()
        if not 0.0 < float(test_fraction) < 1.0:
            raise DepthlabError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
        from sklearn.datasets import load_digits

        raw = load_digits()
        x = torch.tensor(raw.data, dtype=torch.float32) / 16.0  # (1797, 64)
        y = torch.tensor(raw.target, dtype=torch.long)
        perm = torch.randperm(len(y), generator=generator(0, 0))
        n_test = int(round(len(y) * float(test_fraction)))
        tr, te = perm[:-n_test], perm[-n_test:]
        mean, std = x[tr].mean(), x[tr].std()
        x = (x - mean) / std
        self.flat = bool(flat)
        self.input_shape = (64,) if self.flat else (1, 8, 8)
        x = x if self.flat else x.view(-1, 1, 8, 8)
        self.x_train, self.y_train = x[tr].contiguous(), y[tr]
        self.x_test, self.y_test = x[te].contiguous(), y[te]
