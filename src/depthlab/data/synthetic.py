"""Synthetic tasks: memorizing random labels, and teacher-student linear regression."""

from __future__ import annotations

import torch

from depthlab.data.base import TensorDataset, generator
from depthlab.registry import DepthlabError

KINDS = ("random-labels", "teacher")


class Synthetic(TensorDataset):
    """Two synthetic tasks, fixed by ``data_seed``.

    * ``kind="random-labels"``: ``n`` Gaussian inputs ``x ~ N(0, I_dim)`` with labels drawn
      uniformly from ``num_classes``: pure memorization, the task of ReZero's deep fully connected
      experiments (Bachlechner et al. 2020, arXiv 2003.04887). The "test" set *is* the training
      set, so ``test_accuracy`` measures how much has been memorized.
    * ``kind="teacher"``: linear regression ``y = T x (+ noise·ε)`` with a random teacher
      ``T ~ N(0, 1/dim)`` of shape ``dim × dim``, for deep linear networks (Saxe et al. 2013,
      arXiv 1312.6120); ``n`` training and ``n_test`` held-out pairs, mean-squared-error loss.
    """

    name = "synthetic"

    @classmethod
    def shape_hint(cls, dim: object = 64, **_: object) -> tuple[int, ...]:
        return (dim,) if isinstance(dim, int) and not isinstance(dim, bool) else ()

    def __init__(
        self,
        kind: str = "random-labels",
        n: int = 512,
        n_test: int = 512,
        dim: int = 64,
        num_classes: int = 10,
        noise: float = 0.0,
        data_seed: int = 0,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise DepthlabError(
                f"unknown synthetic kind '{kind}'; choose one of: {', '.join(KINDS)}"
            )
        for key, v in (("n", n), ("n_test", n_test), ("dim", dim), ("num_classes", num_classes)):
            if not isinstance(v, int) or v <= 0:
                raise DepthlabError(f"synthetic {key} must be a positive integer, got {v!r}")
        self.kind, self.dim = kind, dim
        g = generator(data_seed, 10)
        self.input_shape = (dim,)
        x = torch.randn(n, dim, generator=g)
        if kind == "random-labels":
            self.task, self.num_classes = "classification", num_classes
            y = torch.randint(0, num_classes, (n,), generator=g)
            self.x_train, self.y_train = x, y
            self.x_test, self.y_test = x, y
        else:
            self.task, self.num_classes = "regression", None
            self.teacher = torch.randn(dim, dim, generator=g) / dim**0.5  # (dim_out, dim_in)
            xt = torch.randn(n_test, dim, generator=g)
            eps = torch.randn(n + n_test, dim, generator=g) * float(noise)
            self.x_train, self.y_train = x, x @ self.teacher.T + eps[:n]
            self.x_test, self.y_test = xt, xt @ self.teacher.T + eps[n:]

    def model_hints(self) -> dict[str, int]:
        hints = super().model_hints()
        if self.task == "regression":
            hints["num_classes"] = self.dim  # output size of a classifier-headed model
            hints["width"] = self.dim  # square models without an input size (linear)
        return hints
