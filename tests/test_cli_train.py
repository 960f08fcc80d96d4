"""``depthlab train``: the run folder, resume, and bad input (exit 2, no partial output)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from depthlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


BASE = ["train", "--model", "resnet", "--depth", "8", "--scheme", "fixup", "--data", "digits"]


def test_train_writes_the_run_folder_and_resumes(tmp_path, capsys):
    out = tmp_path / "run"
    argv = [*BASE, "--steps", "6", "--out", str(out), "--set", "scalar_lr_mult=0.1"]
    assert main([*argv, "--set", "checkpoint_every=3", "--set", "model.width=2"]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["checkpoint.pt", "config.yaml", "metrics.jsonl", "summary.json", "tb"]
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["model"] == {
        "name": "resnet", "scheme": "fixup", "depth": 8, "width": 2, "in_channels": 1,
        "num_classes": 10, "activation": "relu", "variant": "postact",
    }  # fmt: skip
    assert cfg["train"]["scalar_lr_mult"] == 0.1 and cfg["data"] == {"name": "digits"}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 6 and summary["diverged"] is False
    assert 0 <= summary["test_accuracy"] <= 1 and summary["examples_per_s"] > 0
    table = capsys.readouterr().out
    assert "test_accuracy" in table and "diverged          no" in table
    # resume with the saved config, extending the run
    assert main(["train", "--out", str(out), "--resume", "--steps", "9", "--quiet"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(x)["step"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert summary["steps"] == 9 and steps == list(range(10))
    # the written config.yaml reproduces the run through --config
    again = tmp_path / "again"
    assert (
        main(["train", "--config", str(out / "config.yaml"), "--out", str(again), "--quiet"]) == 0
    )
    assert yaml.safe_load((again / "config.yaml").read_text()) == yaml.safe_load(
        (out / "config.yaml").read_text()
    )


def test_scheme_options_and_data_options_via_set(tmp_path):
    out = tmp_path / "r"
    argv = ["train", "--model", "mlp", "--depth", "3", "--scheme", "skipinit", "--steps", "2"]
    argv += ["--set", "scheme_options.alpha_init=1/sqrt(d)", "--set", "data.flat=true"]
    assert main([*argv, "--set", "model.width=24", "--out", str(out), "--quiet"]) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["scheme_options"]["alpha_init"] == "1/sqrt(d)" and cfg["model"]["width"] == 24
    assert cfg["data"]["flat"] is True and cfg["model"]["in_dim"] == 64


def _fails(argv, capsys, *needles):
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    for n in needles:
        assert n in err, err
    return err


@pytest.mark.parametrize(
    ("extra", "needles"),
    [
        (["--optimizer", "rmsprop"], ["unknown optimizer 'rmsprop'", "adamw"]),
        (["--scheme", "fixpu"], ["unknown scheme 'fixpu'", "did you mean 'fixup'"]),
        (["--model", "vgg"], ["unknown model 'vgg'", "resnet"]),
        (["--data", "mnist"], ["unknown data set 'mnist'", "cifar10"]),
        (["--set", "model.widht=3"], ["unknown key 'model.widht'", "model.width", "lr"]),
        (["--set", "lrr=3"], ["unknown key 'lrr'", "valid keys", "data.flat", "train.KEY"]),
        (
            ["--data", "cifar10", "--data-dir", "/nonexistent"],
            ["cifar-10-batches-py/", "test_batch"],
        ),
        (["--depth", "9"], ["6n+2"]),
        (["--scheme", "rezero", "--set", "scheme_options.alpah_init=0"], ["alpha_init"]),
        (["--device", "cuda:7"] if not torch.cuda.is_available() else ["--lr", "-1"], ["device"]),
    ],
)
def test_bad_input_exits_2_with_no_output(tmp_path, capsys, monkeypatch, extra, needles):
    monkeypatch.delenv("DEPTHLAB_CIFAR10", raising=False)
    out = tmp_path / "run"
    _fails([*BASE, "--steps", "2", "--out", str(out), *extra], capsys, *needles)
    assert not out.exists()


def test_malformed_yaml_names_the_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  lr: 0.1\n  steps: [1, 2\n")
    _fails([*BASE, "--config", str(bad), "--out", str(tmp_path / "o")], capsys, "line 4")
    bad.write_text("trian:\n  lr: 0.1\n")
    _fails([*BASE, "--config", str(bad), "--out", str(tmp_path / "o")], capsys, "unknown section")
    assert not (tmp_path / "o").exists()


def test_resume_refuses_corrupt_checkpoint_and_other_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert main([*BASE, "--steps", "2", "--out", str(out), "--quiet"]) == 0
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    _fails([*BASE, "--depth", "14", "--out", str(out), "--resume"], capsys, "different model")
    _fails([*BASE, "--steps", "2", "--out", str(out)], capsys, "already holds a run", "--resume")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    (out / "checkpoint.pt").write_bytes(b"garbage")
    _fails(["train", "--out", str(out), "--resume"], capsys, "corrupt", "start afresh")
    _fails(["train", "--out", str(tmp_path / "none"), "--resume"], capsys, "does not exist")


def test_error_after_the_folder_exists_removes_what_was_written(tmp_path, capsys, monkeypatch):
    import depthlab.cli.train_cmd as tc

    def boom(*a, **k):
        from depthlab import DepthlabError

        raise DepthlabError("simulated failure during training")

    monkeypatch.setattr(tc, "train", boom)
    out = tmp_path / "run"
    _fails([*BASE, "--out", str(out)], capsys, "simulated failure")
    assert not out.exists()
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    _fails([*BASE, "--out", str(out)], capsys, "simulated failure")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
