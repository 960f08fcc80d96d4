"""Byte-level language modelling: enwik8 (or any file), or the running Python's own stdlib."""

from __future__ import annotations

import functools
import sysconfig
from collections.abc import Iterator
from pathlib import Path

import torch

from depthlab.data.base import Batch, Dataset, generator
from depthlab.registry import DepthlabError

#: train / valid / test fractions; on enwik8 (10⁸ bytes) exactly the standard 90M / 5M / 5M split
SPLIT = (0.9, 0.05, 0.05)
SPLITS = ("valid", "test")


def split_sizes(n: int) -> tuple[int, int, int]:
    """Bytes in the train / valid / test parts of an ``n``-byte stream (:data:`SPLIT`);
    ``split_sizes(10**8) == (90_000_000, 5_000_000, 5_000_000)``, enwik8's standard split."""
    n_train, n_valid = int(n * SPLIT[0]), int(n * SPLIT[1])
    return n_train, n_valid, n - n_train - n_valid


def stdlib_files(root: str | Path | None = None) -> list[Path]:
    """Every ``.py`` file under the standard library folder (``sysconfig`` ``stdlib`` path),
    excluding ``site-packages``, sorted by POSIX relative path: a deterministic order."""
    base = Path(root or sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in base.rglob("*.py")
        if not ({"site-packages", "dist-packages"} & set(p.relative_to(base).parts)) and p.is_file()
    ]
    return sorted(files, key=lambda p: p.relative_to(base).as_posix())


@functools.lru_cache(maxsize=4)
def stdlib_corpus(max_bytes: int | None = None, root: str | None = None) -> bytes:
    """The concatenation of :func:`stdlib_files` (the default corpus, ~30 MB on CPython 3.11),
    cut at ``max_bytes``; read once per process and cached in memory."""
    chunks, total = [], 0
    for path in stdlib_files(root):
        data = path.read_bytes()
        chunks.append(data)
        total += len(data)
        if max_bytes is not None and total >= max_bytes:
            break
    corpus = b"".join(chunks)
    return corpus if max_bytes is None else corpus[:max_bytes]


def read_file(path: str | Path, max_bytes: int | None = None) -> bytes:
    p = Path(path).expanduser()
    if not p.is_file():
        raise DepthlabError(
            f"bytes data file {p} does not exist; pass path= a text file (e.g. enwik8 from "
            f"http://mattmahoney.net/dc/enwik8.zip, unzipped), or leave it unset for the "
            f"stdlib corpus"
        )
    with open(p, "rb") as f:
        return f.read() if max_bytes is None else f.read(max_bytes)


class Bytes(Dataset):
    """Windows of a byte stream for next-byte prediction; the metric is bits per byte.

    The stream is split into contiguous train / valid / test parts by :data:`SPLIT` (90% / 5% /
    5%; on the 10⁸-byte enwik8 file exactly its standard 90M/5M/5M split, on smaller files the
    same proportions). A training example is a window ``x = s[o : o+T]``, ``y = s[o+1 : o+T+1]``
    (T = ``context``) at an offset drawn uniformly for step ``(seed, step)``. Evaluation uses
    consecutive non-overlapping windows of the ``eval_split`` part, at most ``max_eval_windows``.

    ``path=None`` uses the running Python's standard library sources (:func:`stdlib_corpus`),
    real text present on every machine; ``max_bytes`` reads only a prefix.
    """

    name = "bytes"
    task = "lm"
    num_classes = 256

    @classmethod
    def shape_hint(cls, context: object = 128, **_: object) -> tuple[int, ...]:
        return (context,) if isinstance(context, int) and not isinstance(context, bool) else ()

    def __init__(
        self,
        path: str | None = None,
        context: int = 128,
        max_bytes: int | None = None,
        eval_split: str = "test",
        max_eval_windows: int = 256,
    ) -> None:
        if not isinstance(context, int) or context <= 0:
            raise DepthlabError(f"context must be a positive integer, got {context!r}")
        if eval_split not in SPLITS:
            raise DepthlabError(
                f"eval_split must be one of {', '.join(SPLITS)}, got {eval_split!r}"
            )
        if max_bytes is not None and (not isinstance(max_bytes, int) or max_bytes <= 0):
            raise DepthlabError(f"max_bytes must be a positive integer, got {max_bytes!r}")
        if not isinstance(max_eval_windows, int) or max_eval_windows < 1:
            raise DepthlabError(
                f"max_eval_windows must be a positive integer (windows of the evaluation split "
                f"scored), got {max_eval_windows!r}"
            )
        data = stdlib_corpus(max_bytes) if path is None else read_file(path, max_bytes)
        if len(data) == 0:
            raise DepthlabError(f"the byte file {path} is empty; pass a file with text in it")
        self.path, self.context, self.eval_split = path, context, eval_split
        self.max_eval_windows = int(max_eval_windows)
        n_train, n_valid, _ = split_sizes(len(data))
        stream = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        self.train_data = stream[:n_train]
        self.valid_data = stream[n_train : n_train + n_valid]
        self.test_data = stream[n_train + n_valid :]
        for part, t in (("train", self.train_data), (eval_split, self.eval_data)):
            if len(t) < context + 1:
                raise DepthlabError(
                    f"the {part} part of the byte stream has {len(t)} bytes, fewer than "
                    f"context+1 = {context + 1}; use a larger file or a smaller context"
                )
        self.input_shape = (context,)

    @property
    def eval_data(self) -> torch.Tensor:
        return self.test_data if self.eval_split == "test" else self.valid_data

    def num_train(self) -> int:
        """Windows per epoch: ⌊train bytes / context⌋."""
        return max(1, len(self.train_data) // self.context)

    def train_batch(self, step: int, batch_size: int, seed: int) -> Batch:
        t = self.context
        offsets = torch.randint(
            0, len(self.train_data) - t, (batch_size,), generator=generator(seed, 4, step)
        )
        idx = offsets[:, None] + torch.arange(t + 1)  # (B, T+1)
        win = self.train_data[idx].long()
        return win[:, :-1], win[:, 1:]

    def test_batches(self, batch_size: int) -> Iterator[Batch]:
        t = self.context
        n_win = min(self.max_eval_windows, (len(self.eval_data) - 1) // t)
        for i in range(0, n_win, batch_size):
            starts = torch.arange(i, min(i + batch_size, n_win)) * t
            win = self.eval_data[starts[:, None] + torch.arange(t + 1)].long()
            yield win[:, :-1], win[:, 1:]

    def model_hints(self) -> dict[str, int]:
        return {"vocab_size": 256, "context": self.context, "num_classes": 256}

    def describe(self) -> str:
        src = self.path or "stdlib sources"
        mb = (len(self.train_data) + len(self.valid_data) + len(self.test_data)) / 1e6
        return f"bytes ({src}, {mb:.1f} MB, context {self.context})"


def entropy_bits(stream: torch.Tensor, order: int = 1) -> float:
    """The plug-in entropy of a byte stream in bits per byte: ``order=0`` the unigram entropy
    H(X), ``order=1`` the bigram conditional entropy H(X_t | X_{t-1}) (from the 256×256 pair
    counts). A model that predicts from the byte frequencies alone cannot beat the first; one that
    looks one byte back cannot beat the second, so a loss below it means longer context is used."""
    x = stream.long().flatten()
    if order == 0:
        p = torch.bincount(x, minlength=256).double()
        p = p[p > 0] / p.sum()
        return float(-(p * p.log2()).sum())
    if order != 1:
        raise DepthlabError(f"order must be 0 or 1, got {order!r}")
    pairs = torch.bincount(x[:-1] * 256 + x[1:], minlength=256 * 256).double().view(256, 256)
    joint = pairs / pairs.sum()
    prev = joint.sum(1, keepdim=True)
    nz = joint > 0
    cond = joint[nz] / prev.expand_as(joint)[nz]
    return float(-(joint[nz] * cond.log2()).sum())
