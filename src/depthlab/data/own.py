"""Your own data: tensors, a ``torch.utils.data.Dataset``, a ``DataLoader`` or a file.

``dl.train(model, data)`` accepts, besides a registered name or a depthlab :class:`Dataset`:

* a pair ``(train, test)`` of any of the forms below — the test set as given;
* a ``torch.utils.data.Dataset`` of ``(x, y)`` items (e.g. ``TensorDataset``) or a
  ``DataLoader`` — read once into memory (a loader's transforms run once, in its order); the
  test set is then the last ``test_fraction`` (default 0.2) of the examples after a shuffle
  fixed by ``split_seed`` (default 0), the rest is the training set;
* a file (:func:`load_file`): ``.npz`` or ``.pt`` holding ``x_train``, ``y_train``, ``x_test``,
  ``y_test`` (or only ``x``, ``y``, split as above). ``.pt`` files are read with
  ``torch.load(weights_only=True)``: a dict of tensors, nothing else is unpickled.

The task follows the targets: integer ``y`` of shape (N,) is classification with
``max(y) + 1`` classes (or ``num_classes``); floating ``y`` is regression (mean squared error).
Inputs keep their shape per example ((N, D) for an MLP, (N, C, H, W) for a ResNet). The batches
then follow depthlab's rule: step ``s`` of a run is a pure function of ``(seed, s)``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from depthlab.data.base import Dataset, TensorDataset, generator
from depthlab.registry import DepthlabError

FORMATS = (".npz", ".pt")


class InMemory(TensorDataset):
    """A train/test split held as tensors (see the module docstring)."""

    def __init__(
        self,
        x_train: torch.Tensor,
        y_train: torch.Tensor,
        x_test: torch.Tensor,
        y_test: torch.Tensor,
        name: str = "tensors",
        num_classes: int | None = None,
    ) -> None:
        super().__init__()
        self.name = name
        parts = {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}
        for key, t in parts.items():
            if not isinstance(t, torch.Tensor):
                raise DepthlabError(f"{name}: {key} must be a tensor, got {type(t).__name__}")
            if t.dim() == 0 or t.shape[0] == 0:
                raise DepthlabError(f"{name}: {key} is empty; give at least one example")
        for a, b in (("x_train", "y_train"), ("x_test", "y_test")):
            if parts[a].shape[0] != parts[b].shape[0]:
                raise DepthlabError(
                    f"{name}: {a} has {parts[a].shape[0]} examples but {b} has "
                    f"{parts[b].shape[0]}; they must match"
                )
        if x_train.shape[1:] != x_test.shape[1:]:
            raise DepthlabError(
                f"{name}: train inputs are {tuple(x_train.shape[1:])} per example, test inputs "
                f"{tuple(x_test.shape[1:])}; they must match"
            )
        if not (x_train.is_floating_point() and x_test.is_floating_point()):
            x_train, x_test = x_train.float(), x_test.float()
        for key, t in (("x_train", x_train), ("x_test", x_test)):
            if not torch.isfinite(t).all():
                raise DepthlabError(f"{name}: {key} holds NaN or inf; clean the inputs first")
        if y_train.is_floating_point() != y_test.is_floating_point():
            raise DepthlabError(f"{name}: y_train and y_test must both be integer or both float")
        self.input_shape = tuple(int(s) for s in x_train.shape[1:])
        if y_train.is_floating_point():
            self.task, self.num_classes = "regression", None
            y_train, y_test = y_train.float(), y_test.float()
        else:
            if y_train.dim() != 1 or y_test.dim() != 1:
                raise DepthlabError(
                    f"{name}: integer targets are class labels, one per example (shape (N,)); "
                    f"got {tuple(y_train.shape)}; use float targets for regression"
                )
            y_train, y_test = y_train.long(), y_test.long()
            lo = int(min(y_train.min(), y_test.min()))
            hi = int(max(y_train.max(), y_test.max()))
            classes = num_classes if num_classes is not None else hi + 1
            if lo < 0 or hi >= classes:
                raise DepthlabError(
                    f"{name}: class labels must lie in 0 … {classes - 1}, got {lo} … {hi}"
                )
            self.task, self.num_classes = "classification", int(classes)
        self.x_train, self.y_train, self.x_test, self.y_test = x_train, y_train, x_test, y_test

    def model_hints(self) -> dict[str, int]:
        hints = super().model_hints()
        if self.task == "regression":
            out = int(torch.tensor(self.y_train.shape[1:]).prod()) if self.y_train.dim() > 1 else 1
            hints["num_classes"] = out
        return hints


def _collect(data: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(x, y)`` of a torch Dataset or DataLoader, stacked."""
    from torch.utils.data import DataLoader
    from torch.utils.data import Dataset as TorchDataset

    xs, ys = [], []
    try:
        if isinstance(data, DataLoader):
            for batch in data:
                x, y = _pair(batch, what)
                xs.append(x)
                ys.append(y)
            if not xs:
                raise DepthlabError(f"{what}: the DataLoader yielded no batch")
            return torch.cat(xs), torch.cat(ys)
        if isinstance(data, TorchDataset):
            n = len(data)  # type: ignore[arg-type]
            if n == 0:
                raise DepthlabError(f"{what}: the data set is empty")
            for i in range(n):
                x, y = _pair(data[i], what)
                xs.append(torch.as_tensor(x))
                ys.append(torch.as_tensor(y))
            return torch.stack(xs), torch.stack(ys)
    except TypeError as e:
        raise DepthlabError(f"{what}: could not read its examples ({e})") from None
    raise DepthlabError(
        f"{what}: expected a data set name, a depthlab Dataset, a torch Dataset or DataLoader of "
        f"(x, y) pairs, a (train, test) pair of those, or a .npz/.pt file; got "
        f"{type(data).__name__}"
    )


def _pair(item: Any, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, dict) and {"x", "y"} <= set(item):
        return torch.as_tensor(item["x"]), torch.as_tensor(item["y"])
    if isinstance(item, (tuple, list)) and len(item) == 2:
        return torch.as_tensor(item[0]), torch.as_tensor(item[1])
    raise DepthlabError(f"{what}: each item must be an (x, y) pair, got {type(item).__name__}")


def split(
    x: torch.Tensor, y: torch.Tensor, test_fraction: float = 0.2, split_seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The documented split: shuffle by ``split_seed``, the last ``test_fraction`` is the test
    set (at least one example on each side)."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise DepthlabError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    n = int(x.shape[0])
    if x.dim() == 0 or y.dim() == 0 or int(y.shape[0]) != n:
        raise DepthlabError(
            f"x has {n if x.dim() else 0} examples but y has {int(y.shape[0]) if y.dim() else 0}; "
            "they must match"
        )
    if n < 2:
        raise DepthlabError(f"{n} example(s) cannot be split into a train and a test set")
    n_test = min(n - 1, max(1, round(n * float(test_fraction))))
    perm = torch.randperm(n, generator=generator(split_seed, 4))
    tr, te = perm[: n - n_test], perm[n - n_test :]
    return x[tr], y[tr], x[te], y[te]


def as_dataset(
    data: Any, test_fraction: float = 0.2, split_seed: int = 0, num_classes: int | None = None
) -> Dataset:
    """A depthlab :class:`Dataset` from what :func:`depthlab.train` accepts (module docstring)."""
    if isinstance(data, Dataset):
        return data
    if isinstance(data, str) and data.endswith(FORMATS):
        return load_file(data, test_fraction=test_fraction, split_seed=split_seed)
    if isinstance(data, Path):
        return load_file(data, test_fraction=test_fraction, split_seed=split_seed)
    if isinstance(data, str):
        from depthlab.data import create_dataset

        return create_dataset(data)
    if isinstance(data, tuple) and len(data) == 2:
        x_tr, y_tr = _collect(data[0], "the training data")
        x_te, y_te = _collect(data[1], "the test data")
        return InMemory(x_tr, y_tr, x_te, y_te, num_classes=num_classes)
    x, y = _collect(data, "data")
    return InMemory(*split(x, y, test_fraction, split_seed), num_classes=num_classes)


def load_file(path: str | Path, test_fraction: float = 0.2, split_seed: int = 0) -> InMemory:
    """A data set from a ``.npz`` or ``.pt`` file (module docstring)."""
    p = Path(path)
    if p.suffix not in FORMATS:
        raise DepthlabError(f"data file {p} must end with .npz or .pt")
    if not p.is_file():
        raise DepthlabError(f"data file {p} does not exist")
    try:
        if p.suffix == ".npz":
            import numpy as np

            with np.load(p, allow_pickle=False) as z:
                arrays = {k: torch.from_numpy(np.array(z[k])) for k in z.files}
        else:
            loaded = torch.load(p, map_location="cpu", weights_only=True)
            if not isinstance(loaded, dict):
                raise DepthlabError(f"data file {p} must hold a dict of tensors")
            arrays = loaded
    except DepthlabError:
        raise
    except Exception as e:  # noqa: BLE001 - any unreadable file is the same user error
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise DepthlabError(f"data file {p} could not be read ({first})") from None
    full = {"x_train", "y_train", "x_test", "y_test"}
    if full <= set(arrays):
        parts = [arrays[k] for k in ("x_train", "y_train", "x_test", "y_test")]
    elif {"x", "y"} <= set(arrays):
        parts = list(split(arrays["x"], arrays["y"], test_fraction, split_seed))
    else:
        raise DepthlabError(
            f"data file {p} holds {sorted(arrays)}; it needs x_train, y_train, x_test, y_test "
            "(or x, y, which are split 80/20)"
        )
    if not all(isinstance(t, torch.Tensor) for t in parts):
        raise DepthlabError(f"data file {p}: every array must be a tensor")
    return InMemory(*parts, name=p.name)


class File(InMemory):
    """Your own ``.npz`` or ``.pt`` file (``path=``; ``depthlab train --data F.npz``).

    See :func:`load_file` for the format; ``test_fraction`` and ``split_seed`` split a file
    that holds only ``x`` and ``y``."""

    @classmethod
    def shape_hint(cls, **_: object) -> tuple[int, ...]:
        return ()

    def __init__(self, path: str = "", test_fraction: float = 0.2, split_seed: int = 0) -> None:
        if not path:
            raise DepthlabError("data set 'file' needs path=: a .npz or .pt file")
        loaded = load_file(path, test_fraction=test_fraction, split_seed=split_seed)
        super().__init__(loaded.x_train, loaded.y_train, loaded.x_test, loaded.y_test,
                         name="file", num_classes=loaded.num_classes)  # fmt: skip
        self.path = str(path)
