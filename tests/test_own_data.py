"""Your own data: ``dl.train`` on torch Datasets, DataLoaders, (train, test) pairs and .npz/.pt
files, with the documented 80/20 split; the CLI's ``--data FILE``; bad data refused clearly."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader
from torch.utils.data import TensorDataset as TorchTensorDataset

import depthlab as dl
from depthlab.cli import main
from depthlab.data import as_dataset, load_file
from depthlab.registry import DepthlabError


def _blobs(n=400, dim=16, classes=3, seed=0):
    """Separable Gaussian blobs: a model that trains gets well above chance."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=g) * 3
    y = torch.randint(0, classes, (n,), generator=g)
    return centers[y] + torch.randn(n, dim, generator=g), y


def _train(data, **kw):
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=2, width=32, in_dim=16, num_classes=3, scheme="rezero")
    cfg = dl.TrainConfig(steps=60, lr=1e-2, optimizer="adam", batch_size=32, eval_every=0, **kw)
    return dl.train(model, data, cfg)


def test_train_on_a_torch_tensor_dataset_with_the_documented_split():
    x, y = _blobs()
    ds = as_dataset(TorchTensorDataset(x, y))
    assert (ds.num_train(), ds.x_test.shape[0]) == (320, 80)  # the last 20% of a seeded shuffle
    assert ds.task == "classification" and ds.num_classes == 3 and ds.input_shape == (16,)
    both = torch.cat([ds.x_train, ds.x_test])
    assert torch.equal(both[torch.argsort(both[:, 0])], x[torch.argsort(x[:, 0])])  # a partition
    again = as_dataset(TorchTensorDataset(x, y))
    assert torch.equal(again.x_test, ds.x_test)  # the split is fixed by split_seed
    hist = _train(TorchTensorDataset(x, y))
    assert hist.summary["test_accuracy"] > 0.9
    assert hist.summary["final_train_loss"] < hist.records[0]["train_loss"] / 3


def test_a_dataloader_and_a_train_test_pair():
    x, y = _blobs()
    loader = DataLoader(TorchTensorDataset(x, y), batch_size=7, shuffle=False)
    ds = as_dataset(loader)
    assert ds.num_train() + ds.x_test.shape[0] == 400
    direct = as_dataset(TorchTensorDataset(x, y))
    assert torch.equal(ds.x_train, direct.x_train)  # the same examples as the dataset itself
    pair = as_dataset((TorchTensorDataset(x[:300], y[:300]), DataLoader(
        TorchTensorDataset(x[300:], y[300:]), batch_size=50)))  # fmt: skip
    assert pair.num_train() == 300 and torch.equal(pair.x_test, x[300:])
    assert _train(loader).summary["test_accuracy"] > 0.9


def test_float_targets_are_regression():
    x = torch.randn(200, 16)
    y = x @ torch.randn(16, 3)
    ds = as_dataset(TorchTensorDataset(x, y))
    assert ds.task == "regression" and ds.model_hints()["num_classes"] == 3
    torch.manual_seed(0)
    m = dl.create_model("mlp", depth=2, width=32, in_dim=16, num_classes=3, scheme="rezero")
    hist = dl.train(m, ds, dl.TrainConfig(steps=80, lr=1e-2, optimizer="adam", batch_size=32))
    assert hist.summary["test_loss"] < 0.5 * float(y.var())


@pytest.mark.parametrize("suffix", [".npz", ".pt"])
@pytest.mark.parametrize("split", [True, False])
def test_files_in_both_formats(tmp_path, suffix, split):
    x, y = _blobs(100)
    arrays = {"x": x, "y": y} if split else {
        "x_train": x[:70], "y_train": y[:70], "x_test": x[70:], "y_test": y[70:]}  # fmt: skip
    path = tmp_path / f"data{suffix}"
    if suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in arrays.items()})
    else:
        torch.save(arrays, path)
    ds = load_file(path)
    assert (ds.num_train(), ds.x_test.shape[0]) == ((80, 20) if split else (70, 30))
    assert ds.num_classes == 3 and _train(str(path)).summary["test_accuracy"] > 0.8


@pytest.mark.parametrize(
    "arrays,match",
    [
        ({"x": np.zeros((5, 2))}, "needs x_train"),
        ({"x": np.zeros((5, 2)), "y": np.zeros(4, dtype=np.int64)}, "must match"),
        ({"x": np.zeros((5, 2)), "y": np.array([0, 1, 2, 3, -1])}, "class labels"),
        ({"x": np.full((5, 2), np.nan), "y": np.zeros(5, dtype=np.int64)}, "NaN"),
        ({"x": np.zeros((0, 2)), "y": np.zeros(0, dtype=np.int64)}, "cannot be split"),
    ],
)
def test_bad_files_are_refused_clearly(tmp_path, arrays, match):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(DepthlabError, match=match):
        load_file(path)


def test_unreadable_or_unsafe_files_are_refused(tmp_path):
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(DepthlabError, match="could not be read"):
        load_file(tmp_path / "junk.npz")
    torch.save({"x": torch.zeros(3, 2), "y": [object()]}, tmp_path / "pickled.pt")
    with pytest.raises(DepthlabError, match="could not be read"):  # weights_only refuses it
        load_file(tmp_path / "pickled.pt")
    with pytest.raises(DepthlabError, match=".npz or .pt"):
        load_file(tmp_path / "data.csv")
    with pytest.raises(DepthlabError, match="DataLoader"):
        as_dataset(42)


def test_cli_trains_on_a_file_and_resumes(tmp_path, capsys):
    x, y = _blobs(200)
    data = tmp_path / "mine.npz"
    np.savez(data, x=x.numpy(), y=y.numpy())
    out = tmp_path / "run"
    args = ["train", "--data", str(data), "--model", "mlp", "--depth", "2", "--steps", "20",
            "--optimizer", "adam", "--lr", "0.01", "--out", str(out), "--quiet"]  # fmt: skip
    assert main(args) == 0
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["data"]["name"] == "file" and saved["data"]["path"] == str(data)
    assert saved["model"]["in_dim"] == 16 and saved["model"]["num_classes"] == 3
    assert main(["train", "--out", str(out), "--resume", "--set", "steps=30", "--quiet"]) == 0
    bad = tmp_path / "missing.npz"
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "r2"), "--quiet"]) == 2
    assert "does not exist" in capsys.readouterr().err and not (tmp_path / "r2").exists()
