"""Data sets: real-format loaders on small files written here, deterministic batch streams."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from depthlab import DepthlabError
from depthlab.data import (
    create_dataset,
    list_datasets,
    random_crop_flip,
    split_sizes,
    stdlib_corpus,
    stdlib_files,
)
from depthlab.data.base import TensorDataset, generator
from depthlab.data.cifar10 import MEAN, STD

pytestmark = pytest.mark.usefixtures("one_thread")


def test_registry_lists_the_five_datasets_and_refuses_unknown_names():
    assert list_datasets() == ["bytes", "cifar10", "digits", "file", "synthetic"]
    with pytest.raises(
        DepthlabError, match="choose one of: bytes, cifar10, digits, file, synthetic"
    ):
        create_dataset("mnist")
    with pytest.raises(DepthlabError, match="valid: flat, test_fraction"):
        create_dataset("digits", flatten=True)


def test_digits_split_shapes_and_standardization():
    ds = create_dataset("digits")
    assert (ds.task, ds.num_classes, ds.input_shape) == ("classification", 10, (1, 8, 8))
    assert ds.x_train.shape == (1438, 1, 8, 8) and ds.x_test.shape == (359, 1, 8, 8)
    assert abs(ds.x_train.mean().item()) < 1e-5 and abs(ds.x_train.std().item() - 1) < 1e-4
    assert set(ds.y_test.tolist()) == set(range(10))
    flat = create_dataset("digits", flat=True)
    assert flat.input_shape == (64,)
    assert torch.equal(flat.x_train, ds.x_train.flatten(1))  # same split either way
    assert ds.model_hints() == {"in_dim": 64, "in_channels": 1, "num_classes": 10}


class _Range(TensorDataset):
    def __init__(self, n: int) -> None:
        super().__init__()
        self.x_train = torch.arange(n)
        self.y_train = torch.arange(n)
        self.x_test, self.y_test = self.x_train, self.y_train


def test_batches_are_a_pure_function_of_seed_and_step_and_cover_each_epoch_once():
    ds = _Range(100)
    epoch0 = torch.cat([ds.train_batch(s, 10, seed=3)[0] for s in range(10)])
    assert sorted(epoch0.tolist()) == list(range(100))  # a permutation: every example once
    epoch1 = torch.cat([ds.train_batch(s, 10, seed=3)[0] for s in range(10, 20)])
    assert sorted(epoch1.tolist()) == list(range(100)) and not torch.equal(epoch0, epoch1)
    again = _Range(100).train_batch(13, 10, seed=3)[0]  # fresh object, out of order
    assert torch.equal(again, epoch1[30:40])
    assert not torch.equal(ds.train_batch(13, 10, seed=4)[0], again)
    # remainder dropped: 100 // 30 = 3 batches per epoch, step 3 starts epoch 1
    assert ds.steps_per_epoch(30) == 3
    tiny = _Range(5).train_batch(0, 12, seed=0)[0]  # batch larger than the data set
    assert len(tiny) == 12 and set(tiny.tolist()) == set(range(5))


def _write_cifar(folder, n_per_batch=6):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in files:
        d = {
            b"data": rng.integers(0, 256, (n_per_batch, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n_per_batch).tolist(),
            b"batch_label": name.encode(),
        }
        with open(folder / name, "wb") as f:
            pickle.dump(d, f)
    return files


def test_cifar10_reads_python_pickle_batches(tmp_path, monkeypatch):
    _write_cifar(tmp_path / "cifar-10-batches-py")
    ds = create_dataset("cifar10", data_dir=str(tmp_path))
    assert ds.x_train.shape == (30, 3, 32, 32) and ds.x_test.shape == (6, 3, 32, 32)
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_2", "rb") as f:
        raw = pickle.load(f)
    # image 0 of batch 2 is training example 6; channel-major rows of 32 pixels
    pix = raw[b"data"][0].reshape(3, 32, 32)[1, 5, 7]
    assert ds.x_train[6, 1, 5, 7].item() == pytest.approx((pix / 255 - MEAN[1]) / STD[1], abs=1e-5)
    assert ds.y_train[6:12].tolist() == raw[b"labels"]
    # the folder itself works, and so does the environment variable
    same = create_dataset("cifar10", data_dir=str(tmp_path / "cifar-10-batches-py"))
    assert torch.equal(same.x_test, ds.x_test)
    monkeypatch.setenv("DEPTHLAB_CIFAR10", str(tmp_path))
    assert torch.equal(create_dataset("cifar10").y_test, ds.y_test)
    # augmentation happens on training batches only, deterministically per step
    b1, b2 = ds.train_batch(0, 8, seed=0)[0], ds.train_batch(0, 8, seed=0)[0]
    assert torch.equal(b1, b2)
    plain = create_dataset("cifar10", data_dir=str(tmp_path), augment=False)
    assert not torch.equal(b1, plain.train_batch(0, 8, seed=0)[0])


def test_cifar10_missing_folder_names_the_expected_layout(tmp_path, monkeypatch):
    monkeypatch.delenv("DEPTHLAB_CIFAR10", raising=False)
    with pytest.raises(DepthlabError) as e:
        create_dataset("cifar10", data_dir=str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "cifar-10-batches-py" in msg and "data_batch_1" in msg and "test_batch" in msg
    with pytest.raises(DepthlabError, match="--data-dir"):
        create_dataset("cifar10")
    (tmp_path / "bad" / "cifar-10-batches-py").mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (tmp_path / "bad" / "cifar-10-batches-py" / name).write_bytes(b"not a pickle")
    with pytest.raises(DepthlabError, match="not a CIFAR-10 python batch"):
        create_dataset("cifar10", data_dir=str(tmp_path / "bad"))


def test_random_crop_flip_matches_a_per_image_reference():
    x = torch.randn(16, 3, 8, 8)
    out = random_crop_flip(x, generator(0, 1), pad=2)
    g = generator(0, 1)  # the same draws, in the same order
    dy = torch.randint(0, 5, (16,), generator=g)
    dx = torch.randint(0, 5, (16,), generator=g)
    flip = torch.rand(16, generator=g) < 0.5
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    for i in range(16):
        ref = padded[i, :, dy[i] : dy[i] + 8, dx[i] : dx[i] + 8]
        if flip[i]:
            ref = ref.flip(-1)
        assert torch.equal(out[i], ref)
    assert 0 < flip.sum() < 16  # both branches exercised


def test_synthetic_random_labels_and_teacher():
    mem = create_dataset("synthetic", kind="random-labels", n=64, dim=16, num_classes=5)
    assert mem.task == "classification" and mem.x_train.shape == (64, 16)
    assert torch.equal(mem.x_test, mem.x_train) and int(mem.y_train.max()) <= 4
    assert torch.equal(
        create_dataset("synthetic", n=64, dim=16, num_classes=5).y_train, mem.y_train
    )
    t = create_dataset("synthetic", kind="teacher", n=32, n_test=8, dim=12)
    assert t.task == "regression" and t.num_classes is None
    torch.testing.assert_close(t.y_train, t.x_train @ t.teacher.T)
    torch.testing.assert_close(t.y_test, t.x_test @ t.teacher.T)
    assert t.model_hints()["width"] == 12
    with pytest.raises(DepthlabError, match="random-labels, teacher"):
        create_dataset("synthetic", kind="noise")


def test_bytes_file_split_and_windows(tmp_path):
    assert split_sizes(10**8) == (90_000_000, 5_000_000, 5_000_000)  # enwik8's standard split
    text = bytes(range(256)) * 8  # 2,048 bytes
    path = tmp_path / "enwik8"
    path.write_bytes(text)
    ds = create_dataset("bytes", path=str(path), context=16, max_eval_windows=3)
    assert (len(ds.train_data), len(ds.valid_data), len(ds.test_data)) == (1843, 102, 103)
    assert ds.task == "lm" and ds.num_classes == 256 and ds.input_shape == (16,)
    x, y = ds.train_batch(5, 4, seed=0)
    assert x.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert torch.equal(y[:, -1], (x[:, -1] + 1) % 256)  # the file counts up byte by byte
    (tx, ty), *rest = list(ds.test_batches(2))
    assert torch.equal(tx[0], torch.tensor(list(text[1945:1961])))
    assert torch.equal(tx[1, 0], torch.tensor(text[1961]))  # consecutive windows
    assert sum(len(b[0]) for b in [(tx, ty), *rest]) == 3
    assert ds.model_hints()["context"] == 16
    with pytest.raises(DepthlabError, match="does not exist"):
        create_dataset("bytes", path=str(tmp_path / "missing"))
    with pytest.raises(DepthlabError, match="smaller context"):
        create_dataset("bytes", path=str(path), context=200)


def test_stdlib_corpus_is_deterministic_and_large():
    files = stdlib_files()
    assert files == stdlib_files() and len(files) > 100
    base = files[0].parent
    rel = [f.relative_to(base).as_posix() for f in files]
    assert rel == sorted(rel)
    assert not any("site-packages" in p for p in rel)
    assert sum(f.stat().st_size for f in files) > 10_000_000  # > 10 MB of real text
    head = stdlib_corpus(max_bytes=50_000)
    expect = b""
    for f in files:
        expect += f.read_bytes()
        if len(expect) >= 50_000:
            break
    assert head == expect[:50_000]
    stdlib_corpus.cache_clear()
    assert stdlib_corpus(max_bytes=50_000) == head
    ds = create_dataset("bytes", max_bytes=50_000, context=32)
    assert bytes(ds.train_data[:100].tolist()) == head[:100]
