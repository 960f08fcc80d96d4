"""CIFAR-10 from its standard python-pickle folder (no torchvision needed)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from depthlab.data.base import TensorDataset
from depthlab.registry import DepthlabError

FOLDER = "cifar-10-batches-py"
TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_FILE = "test_batch"
ENV_VAR = "DEPTHLAB_CIFAR10"
#: per-channel mean and std of the CIFAR-10 training images (pixel values in [0, 1])
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
LAYOUT = f"{FOLDER}/{{data_batch_1..data_batch_5, test_batch}}"


def find_folder(data_dir: str | os.PathLike | None) -> Path:
    """The ``cifar-10-batches-py`` folder: ``data_dir`` itself or its child of that name;
    ``data_dir=None`` reads the ``DEPTHLAB_CIFAR10`` environment variable."""
    where = data_dir if data_dir is not None else os.environ.get(ENV_VAR)
    how = (
        f"download https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz, extract it, and pass "
        f"--data-dir (or set {ENV_VAR}) to the folder holding {LAYOUT}"
    )
    if where is None:
        raise DepthlabError(f"cifar10 needs a data folder: {how}")
    base = Path(where).expanduser()
    for cand in (base, base / FOLDER):
        if all((cand / f).is_file() for f in (*TRAIN_FILES, TEST_FILE)):
            return cand
    missing = [f for f in (*TRAIN_FILES, TEST_FILE) if not (base / FOLDER / f).is_file()]
    raise DepthlabError(
        f"no CIFAR-10 batches found in {base} (missing {', '.join(missing)}); expected the "
        f"layout {LAYOUT}: {how}"
    )


#: the only globals a CIFAR-10 python batch needs to unpickle: numpy arrays and dtypes (and
#: ``_codecs.encode``, which Python 2 pickles use for byte strings)
SAFE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("_codecs", "encode"),
}


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that builds only plain containers, numbers, strings and numpy arrays: any
    other global a pickle asks for (``os.system``, ``builtins.eval``, ...) is refused before it
    is looked up, so a crafted file cannot run code."""

    def find_class(self, module: str, name: str):  # type: ignore[override]
        if (module, name) in SAFE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed in a CIFAR-10 batch")


def read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One pickled batch: ``{b"data": uint8 (N, 3072), b"labels": [N ints]}`` →
    images ``uint8 (N, 3, 32, 32)`` (channel-major, as stored) and labels ``int64 (N,)``.

    Read with :class:`RestrictedUnpickler`: a file that is not a plain CIFAR batch fails with a
    :class:`~depthlab.DepthlabError` and never executes anything."""
    fix = "re-extract cifar-10-python.tar.gz"
    try:
        with open(path, "rb") as f:
            d = RestrictedUnpickler(f, encoding="bytes").load()
        if not isinstance(d, dict):
            raise TypeError(f"a batch is a dict, got {type(d).__name__}")
        raw = d[b"data"]
        raw_labels = d.get(b"labels", d.get(b"fine_labels"))
        if not isinstance(raw, np.ndarray) or raw.dtype != np.uint8:
            raise TypeError("data must be a uint8 array")
        if not isinstance(raw_labels, (list, np.ndarray)):
            raise TypeError("labels must be a list of integers")
        data = raw
        labels = np.asarray(raw_labels)
        if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
            raise TypeError("labels must be a list of integers")
        labels = labels.astype(np.int64)
    except Exception as e:  # noqa: BLE001 — any failure means the file is not a CIFAR batch
        raise DepthlabError(
            f"{path} is not a CIFAR-10 python batch ({type(e).__name__}: {str(e)[:120]}); {fix}"
        ) from None
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise DepthlabError(
            f"{path}: expected data of shape (N, 3072) and N labels, got {data.shape} and "
            f"{len(labels)} labels; {fix}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() > 9):
        raise DepthlabError(
            f"{path}: labels must be in 0..9, found {labels.min()}..{labels.max()}; {fix}"
        )
    return data.reshape(-1, 3, 32, 32), labels


def random_crop_flip(x: torch.Tensor, g: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Standard CIFAR augmentation on a batch ``(N, C, H, W)`` at once: zero-pad by ``pad``,
    crop a random ``H×W`` window per image, flip each image horizontally with probability ½.

    Done with one gather (no Python loop over images): row/column indices per image are
    ``offset + arange(H)``.
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad))  # (N, C, H+2p, W+2p)
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=g)
    flip = torch.rand(n, generator=g) < 0.5
    rows = dy[:, None] + torch.arange(h)  # (N, H)
    cols = torch.arange(w).expand(n, w)
    cols = torch.where(flip[:, None], cols.flip(1), cols) + dx[:, None]  # (N, W)
    idx_r = rows[:, None, :, None].expand(n, c, h, w + 2 * pad)
    out = padded.gather(2, idx_r)  # (N, C, H, W+2p)
    idx_c = cols[:, None, None, :].expand(n, c, h, w)
    return out.gather(3, idx_c)


class CIFAR10(TensorDataset):
    """CIFAR-10 (Krizhevsky 2009): 50,000 train / 10,000 test 32×32 colour images, 10 classes.

    Read from the standard ``cifar-10-batches-py`` folder; images normalized per channel with the
    usual training-set mean and std. ``augment=True`` (default) applies random 4-pixel-padded crops
    and horizontal flips to training batches, vectorized over the batch.
    """

    name = "cifar10"
    task = "classification"
    num_classes = 10
    input_shape = (3, 32, 32)

    def __init__(self, data_dir: str | None = None, augment: bool = True) -> None:
        super().__init__()
        folder = find_folder(data_dir)
        self.data_dir = str(folder)
        parts = [read_batch(folder / f) for f in TRAIN_FILES]
        xs, ys = zip(*parts)
        xt, yt = read_batch(folder / TEST_FILE)
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)

        def norm(a: np.ndarray) -> torch.Tensor:
            return ((torch.from_numpy(a).float() / 255.0 - mean) / std).contiguous()

        self.x_train, self.y_train = norm(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))
        self.x_test, self.y_test = norm(xt), torch.from_numpy(yt)
        self.augment_enabled = bool(augment)

    def augment(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        return random_crop_flip(x, g) if self.augment_enabled else x
