"""Data sets as deterministic batch streams: ``create_dataset(name, **options)``.

===========  ================================================================================
digits       scikit-learn 8×8 digits (default), 1×8×8 images or flat 64-vectors (``flat=True``)
cifar10      the ``cifar-10-batches-py`` folder (``data_dir=`` or ``$DEPTHLAB_CIFAR10``)
synthetic    ``kind="random-labels"`` (memorization) or ``"teacher"`` (linear regression)
bytes        byte-level LM on a file (enwik8) or, by default, the Python stdlib sources
file         your own ``.npz``/``.pt`` file (``path=``; see :mod:`depthlab.data.own`)
===========  ================================================================================

``depthlab.train`` also takes tensors, torch Datasets and DataLoaders (:func:`as_dataset`).
"""

from __future__ import annotations

import inspect

from depthlab.data.base import Dataset, TensorDataset
from depthlab.data.bytes import Bytes, split_sizes, stdlib_corpus, stdlib_files
from depthlab.data.cifar10 import CIFAR10, random_crop_flip
from depthlab.data.digits import Digits
from depthlab.data.own import File as FileDataset
from depthlab.data.own import InMemory, as_dataset, load_file
from depthlab.data.synthetic import Synthetic
from depthlab.registry import DepthlabError, Registry
from depthlab.validate import check_kwargs

DATASETS: Registry[type[Dataset]] = Registry("data set")
DATASETS.register("digits")(Digits)
DATASETS.register("cifar10")(CIFAR10)
DATASETS.register("synthetic")(Synthetic)
DATASETS.register("bytes")(Bytes)
DATASETS.register("file")(FileDataset)


def list_datasets() -> list[str]:
    """Names of every registered data set."""
    return DATASETS.names()


def dataset_options(name: str) -> list[str]:
    """The keyword arguments data set ``name`` accepts."""
    sig = inspect.signature(DATASETS.get(name).__init__)
    return [p for p in sig.parameters if p != "self"]


def create_dataset(name: str = "digits", **options: object) -> Dataset:
    """Build a registered data set: ``create_dataset("digits", flat=True)``."""
    cls = DATASETS.get(name)
    valid = dataset_options(name)
    bad = [k for k in options if k not in valid]
    if bad:
        raise DepthlabError(
            f"unknown option(s) {bad} for data set '{name}'; valid: {', '.join(valid) or '(none)'}"
        )
    return cls(**check_kwargs(cls.__init__, options, f"data set '{name}'"))


__all__ = [
    "CIFAR10",
    "DATASETS",
    "Bytes",
    "Dataset",
    "Digits",
    "FileDataset",
    "InMemory",
    "Synthetic",
    "TensorDataset",
    "as_dataset",
    "create_dataset",
    "dataset_options",
    "list_datasets",
    "load_file",
    "random_crop_flip",
    "split_sizes",
    "stdlib_corpus",
    "stdlib_files",
]
