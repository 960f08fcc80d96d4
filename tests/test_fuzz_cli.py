"""A table of bad inputs across ``train``, ``run``, ``diagnose`` and ``report``: each must exit 2
with one line on stderr (no traceback) and leave the folders it was pointed at unchanged.

Each row is ``(id, argv, needle)``: ``argv`` may name files of the fixture folder through
``{tmp}`` (a fresh folder per test), ``{run}`` (a finished training run, copied per test),
``{exp}`` (a finished ``depthlab run`` folder, copied per test) and the prepared inputs below
(``{nan_cfg}``, ``{cifar_evil}``, ...); ``needle`` is a piece of the expected message.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from depthlab.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ["--model", "mlp", "--depth", "2", "--width", "8", "--steps", "2", "--quiet"]
LM = ["train", "--model", "transformer-lm", "--depth", "1", "--data", "bytes", "--quiet"]
LM += ["--set", "model.d_model=8", "--set", "model.nhead=2", "--out", "{tmp}/out"]
LM += ["--set", "data.path={text}"]
T = ["train", *TINY, "--out", "{tmp}/out"]  # a training run into a fresh folder
R = ["run", "depth-sweep", "--preset", "smoke", "--out", "{tmp}/out"]
D = ["diagnose", "--model", "mlp", "--depth", "4", "--out", "{tmp}/out"]
MARKER = "{tmp}/pwned"

CASES = [
    # -- train: numbers that make no sense ----------------------------------------------------
    ("lr-nan", [*T, "--lr", "nan"], "finite"),
    ("lr-inf", [*T, "--lr", "inf"], "finite"),
    ("lr-negative", [*T, "--lr", "-1"], "lr must be ≥ 0"),
    ("momentum-nan", [*T, "--set", "momentum=nan"], "momentum must be a finite"),
    ("momentum-above-1", [*T, "--set", "momentum=1.5"], "momentum must be ≤ 1"),
    ("divergence-factor-nan", [*T, "--set", "divergence_factor=nan"], "divergence_factor"),
    ("divergence-factor-1", [*T, "--set", "divergence_factor=1"], "divergence_factor must be >"),
    ("malformed-yaml-value", [*T, "--set", "lr=[0.5,"], "not valid YAML"),
    ("milestones-malformed", [*T, "--set", "milestones=[0.5,"], "not valid YAML"),
    ("milestones-string", [*T, "--set", "milestones=abc"], "milestones must be a list"),
    ("milestones-out-of-range", [*T, "--set", "milestones=[2.0]"], "milestones must be <"),
    ("milestones-decreasing", [*T, "--set", "milestones=[0.75, 0.5]"], "increasing"),
    ("compile-abc", [*T, "--set", "compile=abc"], "compile must be true or false"),
    ("compile-yes-please", [*T, "--set", "compile=yes please"], "compile must be true or false"),
    ("betas-one", [*T, "--set", "betas=[0.9]"], "betas must be a list of two"),
    ("betas-abc", [*T, "--set", "betas=abc"], "betas must be a list of two"),
    ("betas-above-1", [*T, "--set", "betas=[0.9, 1.5]"], "betas must be <"),
    ("eps-negative", [*T, "--set", "eps=-1"], "eps must be >"),
    ("eps-zero", [*T, "--set", "eps=0"], "eps must be >"),
    ("epochs-nan", [*T, "--epochs", "nan"], "epochs must be a finite"),
    ("epochs-inf", [*T, "--epochs", "inf"], "epochs must be a finite"),
    ("epochs-negative", [*T, "--epochs", "-1"], "epochs must be >"),
    ("seed-2**32", [*T, "--seed", str(2**32)], "seed must be an integer ≤"),
    ("seed-negative", [*T, "--seed", "-1"], "seed must be an integer ≥ 0"),
    ("steps-zero", [*T, "--steps", "0"], "steps must be an integer ≥ 1"),
    ("steps-negative", [*T, "--steps", "-5"], "steps must be an integer ≥ 1"),
    ("steps-fraction", [*T, "--set", "steps=1.5"], "steps must be an integer"),
    ("steps-bool", [*T, "--set", "steps=true"], "steps must be an integer"),
    ("steps-huge", [*T, "--set", "steps=1e13"], "steps must be an integer ≤"),
    ("warmup-negative", [*T, "--set", "warmup_steps=-1"], "warmup_steps"),
    ("label-smoothing-1", [*T, "--set", "label_smoothing=1"], "label_smoothing must be <"),
    ("dropout-1.5", [*T, "--set", "dropout=1.5"], "dropout must be <"),
    ("grad-clip-negative", [*T, "--set", "grad_clip=-1"], "grad_clip must be >"),
    ("grad-clip-nan", [*T, "--set", "grad_clip=.nan"], "grad_clip must be a finite"),
    ("weight-decay-inf", [*T, "--set", "weight_decay=.inf"], "weight_decay must be a finite"),
    ("scalar-lr-mult-negative", [*T, "--set", "scalar_lr_mult=-1"], "scalar_lr_mult"),
    ("nesterov-maybe", [*T, "--set", "nesterov=maybe"], "nesterov must be true or false"),
    ("log-every-zero", [*T, "--set", "log_every=0"], "log_every"),
    ("eval-batch-zero", [*T, "--set", "eval_batch_size=0"], "eval_batch_size"),
    ("extra-not-mapping", [*T, "--set", "extra=5"], "extra must be a mapping"),
    ("sgd-in-backward-adam", [*T, "--optimizer", "adam", "--set", "sgd_in_backward=true"], "sgd"),
    ("batch-size-float-flag", [*T, "--batch-size", "1e9"], "invalid int value"),
    ("lr-word-flag", [*T, "--lr", "fast"], "invalid float value"),
    ("unknown-flag", [*T, "--bogus"], "unrecognized arguments"),
    # -- train: names and keys ----------------------------------------------------------------
    ("unknown-key", [*T, "--set", "lrr=1"], "unknown key 'lrr'"),
    ("set-without-equals", [*T, "--set", "lr"], "expects key=value"),
    ("unknown-model", [*T, "--model", "vgg"], "unknown model"),
    ("unknown-scheme", [*T, "--scheme", "bogus"], "unknown scheme"),
    ("unknown-data", [*T, "--data", "mnist"], "unknown data set"),
    ("unknown-optimizer", [*T, "--optimizer", "rmsprop"], "unknown optimizer"),
    ("unknown-schedule", [*T, "--schedule", "exp"], "unknown schedule"),
    ("unknown-device", [*T, "--device", "tpu"], "unknown device"),
    ("model-name-number", [*T, "--set", "model.name=5"], "unknown model"),
    ("model-depth-zero", [*T, "--set", "model.depth=0"], "depth must be a positive"),
    ("model-depth-string", [*T, "--set", "model.depth=deep"], "depth in model 'mlp' must be"),
    ("model-width-float", [*T, "--set", "model.width=8.5"], "width in model 'mlp' must be"),
    ("model-activation", [*T, "--set", "model.activation=gelu2"], "unknown activation"),
    (
        "run-noise-std",
        ["run", "bn-smoothness", "--preset", "smoke", "--set", "noise_std=0.5", "--out", "{tmp}/o"],
        "noise_std in experiment 'bn-smoothness' must be ≥ 1",
    ),
    (
        "run-landscape-every-0",
        [
            "run",
            "bn-smoothness",
            "--preset",
            "smoke",
            "--set",
            "landscape_every=0",
            "--out",
            "{tmp}/o",
        ],
        "landscape_every in experiment 'bn-smoothness' must be ≥ 1",
    ),
    (
        "resnet-variant",
        [*T, "--model", "resnet", "--depth", "8", "--set", "model.variant=v3"],
        "variant must be one of",
    ),
    (
        "fixup-fan-mode",
        [*T, "--scheme", "fixup", "--set", "scheme_options.fan_mode=fan_avg"],
        "fan_mode in scheme 'fixup'",
    ),
    (
        "deepnorm-init",
        [*T, "--scheme", "deepnorm", "--set", "scheme_options.init=uniform"],
        "init in scheme 'deepnorm'",
    ),
    ("data-flat-maybe", [*T, "--set", "data.flat=maybe"], "flat in data set 'digits'"),
    ("data-test-fraction-nan", [*T, "--set", "data.test_fraction=.nan"], "test_fraction"),
    ("data-test-fraction-1", [*T, "--set", "data.test_fraction=1"], "test_fraction"),
    ("scheme-option-unknown", [*T, "--scheme", "rezero", "--set", "scheme_options.x=1"], "x"),
    (
        "scheme-option-nan",
        [*T, "--scheme", "rezero", "--set", "scheme_options.alpha_init=.nan"],
        "alpha_init must be a finite",
    ),
    (
        "scheme-option-bool",
        [*T, "--scheme", "rezero", "--set", "scheme_options.learnable=maybe"],
        "learnable in scheme 'rezero' must be true or false",
    ),
    # -- train: sizes that cannot be allocated ------------------------------------------------
    ("depth-1e9", [*T, "--depth", "1000000000"], "would need about"),
    ("width-1e9", [*T, "--width", "1000000000"], "would need about"),
    ("batch-1e9", [*T, "--batch-size", "1000000000"], "would need about"),
    ("batch-1e9-set", [*T, "--set", "batch_size=1e9"], "would need about"),
    ("model-width-1e9-set", [*T, "--set", "model.width=1e9"], "would need about"),
    ("resnet-width-1e6", [*T, "--model", "resnet", "--depth", "8", "--width", "1000000"], "need"),
    (
        "transformer-context-1e7",
        [*LM, "--set", "model.d_model=100000"],
        "would need about",
    ),
    # -- train: files ---------------------------------------------------------------------------
    ("config-lr-nan", ["train", *TINY, "--config", "{nan_cfg}", "--out", "{tmp}/out"], "finite"),
    (
        "config-depth-string",
        ["train", *TINY[4:], "--config", "{str_depth_cfg}", "--out", "{tmp}/out"],
        "depth in model 'mlp' must be an integer",
    ),
    ("config-binary", ["train", *TINY, "--config", "{binary}", "--out", "{tmp}/out"], "UTF-8"),
    ("config-missing", ["train", *TINY, "--config", "{tmp}/no.yaml", "--out", "{tmp}/out"], "no"),
    ("config-list", ["train", *TINY, "--config", "{list_cfg}", "--out", "{tmp}/out"], "mapping"),
    ("config-folder", ["train", *TINY, "--config", "{tmp}", "--out", "{tmp}/out"], "not a file"),
    (
        "config-alias-bomb",
        ["train", *TINY, "--config", "{bomb}", "--out", "{tmp}/out"],
        "expands to more than",
    ),
    ("config-malformed", ["train", *TINY, "--config", "{bad_yaml}", "--out", "{tmp}/out"], "line"),
    ("data-cifar-no-folder", [*T, "--data", "cifar10"], "cifar10 needs a data folder"),
    ("data-cifar-missing", [*T, "--data", "cifar10", "--data-dir", "{tmp}/none"], "data_batch_1"),
    ("cifar-malicious", [*T, "--data", "cifar10", "--data-dir", "{cifar_evil}"], "not allowed"),
    ("cifar-labels", [*T, "--data", "cifar10", "--data-dir", "{cifar_labels}"], "labels must be"),
    ("cifar-shape", [*T, "--data", "cifar10", "--data-dir", "{cifar_shape}"], "(N, 3072)"),
    ("cifar-not-dict", [*T, "--data", "cifar10", "--data-dir", "{cifar_list}"], "a batch is a"),
    (
        "bytes-empty-file",
        [*LM, "--set", "data.path={empty}"],
        "empty",
    ),
    (
        "bytes-zero-eval-windows",
        [*LM, "--set", "data.max_eval_windows=0"],
        "max_eval_windows",
    ),
    (
        "bytes-context-zero",
        [*LM, "--set", "data.context=0"],
        "context",
    ),
    # -- train: output folders ------------------------------------------------------------------
    ("out-empty", ["train", *TINY, "--out", ""], "--out must name a folder"),
    ("out-root", ["train", *TINY, "--out", "/"], "filesystem root"),
    ("out-is-file", ["train", *TINY, "--out", "{binary}"], "is a file"),
    ("out-under-file", ["train", *TINY, "--out", "{binary}/run"], "is a file"),
    ("out-dev-null", ["train", *TINY, "--out", "/dev/null"], "virtual filesystem"),
    ("out-proc", ["train", *TINY, "--out", "/proc/depthlab-run"], "virtual filesystem"),
    ("out-long-name", ["train", *TINY, "--out", "{tmp}/" + "x" * 300], "file name may have"),
    ("out-read-only", ["train", *TINY, "--out", "{readonly}/run"], "{readonly_needle}"),
    # -- train: resume and checkpoints ----------------------------------------------------------
    ("resume-without-out", ["train", *TINY, "--resume"], "--resume needs --out"),
    ("resume-not-a-run", ["train", "--out", "{tmp}", "--resume"], "does not exist"),
    ("run-over-a-run", ["train", *TINY, "--out", "{run}"], "already holds a run"),
    ("resume-other-model", ["train", "--out", "{run}", "--resume", "--width", "16"], "different"),
    ("ckpt-garbage", ["train", "--out", "{run}", "--resume"], "corrupt"),
    ("ckpt-malicious", ["train", "--out", "{run}", "--resume"], "corrupt"),
    ("ckpt-no-records", ["train", "--out", "{run}", "--resume"], "lacks 'records'"),
    ("ckpt-negative-step", ["train", "--out", "{run}", "--resume"], "its step is -3"),
    ("ckpt-string-step", ["train", "--out", "{run}", "--resume"], "metadata 'step'"),
    ("ckpt-shape-lie", ["train", "--out", "{run}", "--resume"], "has shape"),
    ("ckpt-no-optimizer", ["train", "--out", "{run}", "--resume"], "no optimizer state"),
    ("ckpt-rng-garbage", ["train", "--out", "{run}", "--resume"], "RNG state"),
    ("ckpt-momentum-shape", ["train", "--out", "{run}", "--resume"], "optimizer state"),
    ("ckpt-bad-record", ["train", "--out", "{run}", "--resume"], "a record is"),
    # -- run --------------------------------------------------------------------------------------
    ("run-unknown", ["run", "bogus", "--out", "{tmp}/out"], "unknown experiment"),
    ("run-preset", ["run", "depth-sweep", "--preset", "huge", "--out", "{tmp}/out"], "preset"),
    ("run-depths-zero", [*R, "--set", "depths=[0]"], "depths in experiment"),
    ("run-depths-empty", [*R, "--set", "depths=[]"], "at least one value"),
    ("run-depths-1e9", [*R, "--set", "depths=[1e9]"], "must be ≤ 100,000"),
    ("run-schemes-bogus", [*R, "--set", "schemes=[bogus]"], "unknown value of schemes"),
    ("run-data-dir-missing", [*R, "--set", "data_dir={tmp}/none"], "no CIFAR-10 batches"),
    ("run-lr-nan", ["run", "degeneracy", "--out", "{tmp}/out", "--set", "lr=.nan"], "finite"),
    ("run-lr-negative", [*R, "--set", "lr=-0.1"], "lr in experiment"),
    ("run-steps-word", [*R, "--set", "steps=abc"], "steps in experiment"),
    ("run-width-zero", [*R, "--set", "width=0"], "width in experiment"),
    ("run-malformed", [*R, "--set", "depths=[4,"], "not valid YAML"),
    ("run-unknown-key", [*R, "--set", "bogus=1"], "unknown key"),
    (
        "run-all-unknown-key",
        ["run", "all", "--preset", "smoke", "--out", "{tmp}/out", "--set", "x=1"],
        "no exp",
    ),
    (
        "run-variant",
        ["run", "path-variance", "--out", "{tmp}/out", "--set", "variants=[bogus]"],
        "unknown value of variants",
    ),
    (
        "run-tc-variant",
        ["run", "transformer-convergence", "--out", "{tmp}/out", "--set", "variants=[x]"],
        "unknown value of variants",
    ),
    (
        "run-seeds-negative",
        ["run", "degeneracy", "--out", "{tmp}/out", "--set", "seeds=[-1]"],
        "seeds in experiment",
    ),
    (
        "run-inits-bogus",
        ["run", "degeneracy", "--out", "{tmp}/out", "--set", "inits=[fold:x]"],
        "unknown init",
    ),
    (
        "run-tj-models",
        ["run", "transformer-jacobian", "--out", "{tmp}/out", "--set", "models=[bogus-4]"],
        "SCHEME-DEPTH",
    ),
    (
        "run-bn-resnet-depth",
        ["run", "bn-signal", "--out", "{tmp}/out", "--set", "resnet_depth=7"],
        "6n+2",
    ),
    (
        "run-fc-dataset",
        ["run", "fc-convergence", "--out", "{tmp}/out", "--set", "dataset=bogus"],
        "unknown value of dataset",
    ),
    (
        "run-tc-heads",
        ["run", "transformer-convergence", "--out", "{tmp}/out", "--set", "nhead=5"],
        "not divisible",
    ),
    ("run-device-cuda", [*R, "--set", "device=cuda"], "CUDA is not available"),
    ("run-device-bogus", [*R, "--set", "device=tpu"], "unknown device"),
    ("run-jobs-zero", [*R, "--jobs", "0"], "--jobs must be"),
    ("run-jobs-huge", [*R, "--jobs", "100000"], "--jobs must be"),
    ("run-out-empty", ["run", "depth-sweep", "--out", ""], "--out must name a folder"),
    ("run-out-root", ["run", "depth-sweep", "--out", "/"], "filesystem root"),
    ("run-out-file", ["run", "depth-sweep", "--out", "{binary}"], "is a file"),
    ("run-out-proc", ["run", "depth-sweep", "--out", "/proc/x"], "virtual filesystem"),
    # -- diagnose ---------------------------------------------------------------------------------
    ("diag-batch-1", [*D, "--batch", "1"], "--batch must be an integer ≥ 2"),
    ("diag-examples-0", [*D, "--examples", "0"], "--examples must be an integer ≥ 1"),
    ("diag-what", [*D, "--what", "bogus"], "unknown --what"),
    ("diag-method", [*D, "--method", "bogus"], "unknown --method"),
    ("diag-depth-1e9", ["diagnose", "--depth", "1000000000", "--out", "{tmp}/o"], "would need"),
    ("diag-batch-1e8", [*D, "--batch", "100000000"], "--batch must be an integer ≤"),
    ("diag-batch-1e6", [*D, "--set", "model.width=9999", "--batch", "999999"], "would need"),
    ("diag-seed", [*D, "--seed", "-1"], "--seed must be"),
    ("diag-rtol", [*D, "--rtol", "nan"], "--rtol must be a finite"),
    ("diag-k", [*D, "--k", "0"], "--k must be"),
    ("diag-out-file", [*D[:-1], "{binary}"], "is a file"),
    ("diag-width", [*D, "--set", "model.width=abc"], "width in model 'mlp'"),
    ("diag-section", [*D, "--set", "width=3"], "SECTION.KEY"),
    ("diag-model", ["diagnose", "--model", "vgg", "--out", "{tmp}/o"], "unknown model"),
    # -- report -----------------------------------------------------------------------------------
    ("report-missing", ["report", "{tmp}/none"], "is not a folder"),
    ("report-empty-folder", ["report", "{tmp}"], "holds no experiment results"),
    ("report-empty-csv", ["report", "{exp}"], "is empty"),
    ("report-binary-csv", ["report", "{exp}"], "not a CSV of records"),
    ("report-wrong-columns", ["report", "{exp}"], "lacks the column"),
    ("report-truncated", ["report", "{exp}"], "truncated"),
    ("report-unknown-experiment", ["report", "{exp}"], "unknown experiment"),
    ("report-bad-config", ["report", "{exp}"], "malformed YAML"),
]


# -- fixtures: the prepared inputs ---------------------------------------------------------------
def _alias_bomb(levels: int = 8) -> str:
    """A short YAML file under ``train.extra`` whose aliases expand to 10**levels strings."""
    lines = ["train:", "  extra:", "    l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    for i in range(1, levels):
        lines.append(f"    l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]")
    return "\n".join(lines) + "\n"


def _cifar(folder: Path, data: object = None, labels: object = None, payload: object = None):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = payload
        if d is None:
            d = {
                b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8) if data is None else data,
                b"labels": [1, 2, 3, 4] if labels is None else labels,
            }
        (folder / name).write_bytes(pickle.dumps(d))
    return folder


class _Evil:
    """Unpickling this would run ``touch MARKER``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A finished two-step training run with a checkpoint (``{run}``)."""
    out = tmp_path_factory.mktemp("base") / "run"
    assert main(["train", *TINY, "--out", str(out)]) == 0
    return out


@pytest.fixture(scope="module")
def base_exp(tmp_path_factory):
    """A finished ``depthlab run path-variance --preset smoke`` folder (``{exp}``)."""
    out = tmp_path_factory.mktemp("exp")
    assert main(["run", "path-variance", "--preset", "smoke", "--out", str(out)]) == 0
    return out / "path-variance"


def _tamper_checkpoint(run: Path, case: str) -> None:
    path = run / "checkpoint.pt"
    if case == "ckpt-garbage":
        path.write_bytes(b"garbage" * 10)
        return
    if case == "ckpt-malicious":
        marker = str(run.parent / "pwned")
        path.write_bytes(pickle.dumps({"metadata": _Evil(marker)}))
        return
    payload = torch.load(path, weights_only=True)
    meta = json.loads(payload["metadata"])
    if case == "ckpt-no-records":
        del meta["records"]
    elif case == "ckpt-negative-step":
        meta["step"] = -3
    elif case == "ckpt-string-step":
        meta["step"] = "two"
    elif case == "ckpt-bad-record":
        meta["records"] = [{"step": "x"}]
    elif case == "ckpt-shape-lie":
        k = next(k for k, v in payload["model"].items() if v.dim() == 2)
        payload["model"][k] = torch.zeros(3, 3)
    elif case == "ckpt-no-optimizer":
        del payload["optimizer"]
    elif case == "ckpt-rng-garbage":
        payload["rng"]["torch"] = torch.zeros(7, dtype=torch.uint8)
    elif case == "ckpt-momentum-shape":
        state = payload["optimizer"]["state"]
        k = next(iter(state))
        state[k]["momentum_buffer"] = torch.zeros(5)
    payload["metadata"] = json.dumps(meta)
    torch.save(payload, path)


def _tamper_records(exp: Path, case: str) -> None:
    csv = exp / "records.csv"
    if case == "report-empty-csv":
        csv.write_text("")
    elif case == "report-binary-csv":
        csv.write_bytes(bytes(range(256)) * 4)
    elif case == "report-wrong-columns":
        csv.write_text("a,b\n1,2\n")
    elif case == "report-truncated":
        text = csv.read_text()
        csv.write_text(text[: len(text) // 2 + 3].rstrip("\n") + "1")
    elif case == "report-unknown-experiment":
        (exp / "config.yaml").write_text("experiment: bogus\npreset: smoke\n")
    elif case == "report-bad-config":
        (exp / "config.yaml").write_text("experiment: [path-variance\n")


def _read_only_folder(tmp: Path) -> tuple[Path, str] | None:
    """A folder writes into fail: a permission-less folder, or (as root, whom permissions do
    not stop) a read-only tmpfs where this machine lets us mount one."""
    ro = tmp / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o555)
        return ro, "not writable"
    if shutil.which("mount") is None:
        return None
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "none", str(ro)], check=False)
    return (ro, "read-only filesystem") if r.returncode == 0 else None


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    out = {}
    for p in sorted(root.rglob("*")):
        st = p.lstat()
        out[str(p.relative_to(root))] = (st.st_size, st.st_mtime_ns) if p.is_file() else (0, 0)
    return out


@pytest.mark.parametrize(("case", "argv", "needle"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(
    case, argv, needle, tmp_path, capsys, monkeypatch, base_run, base_exp
):
    monkeypatch.delenv("DEPTHLAB_CIFAR10", raising=False)
    monkeypatch.delenv("DEPTHLAB_MAX_MEMORY", raising=False)
    if case in ("unknown-device", "run-device-cuda") and torch.cuda.is_available():
        pytest.skip("needs a host without the device")
    paths = {"tmp": str(tmp_path), "readonly_needle": ""}
    binary = tmp_path / "binary.bin"
    binary.write_bytes(b"\x00\xff\xfe" * 100)
    paths["binary"] = str(binary)
    files = {
        "nan_cfg": "train:\n  lr: .nan\n",
        "str_depth_cfg": "model:\n  name: mlp\n  depth: deep\n",
        "list_cfg": "- 1\n- 2\n",
        "bad_yaml": "train:\n  lr: [1,\n",
        "bomb": _alias_bomb(),
        "empty": "",
        "text": "depthlab reads bytes. " * 200,
    }
    for key, text in files.items():
        (tmp_path / f"{key}.txt").write_text(text)
        paths[key] = str(tmp_path / f"{key}.txt")
    if "cifar" in case:
        x = np.zeros((4, 3072), dtype=np.uint8)
        paths["cifar_evil"] = str(_cifar(tmp_path / "evil", payload=_Evil(MARKER.format(**paths))))
        paths["cifar_labels"] = str(_cifar(tmp_path / "labels", data=x, labels=[0, 1, 2, 99]))
        paths["cifar_shape"] = str(_cifar(tmp_path / "shape", data=np.zeros((4, 10), np.uint8)))
        paths["cifar_list"] = str(_cifar(tmp_path / "list", payload=[1, 2, 3]))
    if "{run}" in argv:
        run = tmp_path / "run"
        shutil.copytree(base_run, run)
        if case.startswith("ckpt-"):
            _tamper_checkpoint(run, case)
        paths["run"] = str(run)
    if "{exp}" in argv:
        exp = tmp_path / "exp"
        shutil.copytree(base_exp, exp)
        _tamper_records(exp, case)
        paths["exp"] = str(exp)
    mounted = None
    if any("{readonly}" in a for a in argv):
        ro = _read_only_folder(tmp_path)
        if ro is None:
            pytest.skip("no read-only folder can be made here")
        mounted = ro[0] if os.geteuid() == 0 else None
        paths["readonly"], needle = str(ro[0]), ro[1]
    args = [a.format(**paths) for a in argv]
    before = _snapshot(tmp_path)
    try:
        if _argparse_error(needle):
            with pytest.raises(SystemExit) as exc:
                main(args)
            assert exc.value.code == 2
        else:
            assert main(args) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert needle in lines[0], lines[0]
        assert _snapshot(tmp_path) == before  # nothing written, nothing removed
        assert not (tmp_path / "pwned").exists()  # no code ran
    finally:
        if mounted is not None:
            subprocess.run(["umount", str(mounted)], check=False)


def _argparse_error(needle: str) -> bool:
    return needle.startswith(("invalid ", "unrecognized"))


def test_argparse_errors_are_one_line_with_exit_2():
    """argparse's own errors (a flag of the wrong type) are one line and exit 2, in a real
    process."""
    r = subprocess.run(
        [sys.executable, "-m", "depthlab.cli", "train", "--batch-size", "1e9"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1 and "invalid int value" in r.stderr


def test_the_table_covers_every_subcommand_with_over_a_hundred_rows():
    assert len(CASES) >= 100
    assert {c[1][0] for c in CASES} == {"train", "run", "diagnose", "report"}
    assert len({c[0] for c in CASES}) == len(CASES)
