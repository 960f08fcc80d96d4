"""The ``deep`` presets hold the papers' depths and settings (the configured values, asserted),
``run all --preset deep`` runs exactly the experiments that have one, and the runner's ETA."""

from __future__ import annotations

from types import SimpleNamespace

import pandas as pd
import pytest

from depthlab import DepthlabError
from depthlab.experiments import get_experiment
from depthlab.experiments.base import PRESETS
from depthlab.experiments.runner import eta_text, experiments_with, resolve

DEEP = {"deep-fc", "depth-sweep", "fixup-ablation", "transformer-convergence",
        "transformer-jacobian", "grow", "nonlinear-degeneracy", "bn-smoothness",
        "batch-size", "skipinit-depth"}  # fmt: skip


def test_deep_is_a_preset_between_quick_and_full_and_all_runs_those_that_have_it():
    assert PRESETS == ("smoke", "quick", "deep", "full")
    assert set(experiments_with("deep")) == DEEP
    assert {e.name for e, _ in resolve("all", "deep", {})} == DEEP
    with pytest.raises(DepthlabError, match="deep"):  # named explicitly: refused, presets listed
        resolve("bn-signal", "deep", {})


def test_deep_fc_is_10000_layers_against_every_control():
    cfg = get_experiment("deep-fc").config("deep")
    assert cfg.depth == 10_000 and len(cfg.seeds) >= 2
    assert set(cfg.schemes) == {"rezero", "frozen", "noskip", "plain", "layernorm"}
    assert cfg.optimizer == "adam" and cfg.lr == 0.001  # the paper's Adam, no warm-up or clipping
    assert cfg.target_loss == pytest.approx(0.230, abs=1e-3)  # ln(10)/10, fixed in advance


def test_depth_sweep_deep_is_fixups_fig3_protocol():
    exp = get_experiment("depth-sweep")
    cfg = exp.config("deep")
    assert cfg.depths == (14, 110, 1004, 10_004)  # ≈ 10, 100, 1,000, 10,000 layers (6n+2)
    assert cfg.lr == 0.1 and cfg.grad_clip == 0 and cfg.weight_decay == 5e-4
    assert cfg.steps * cfg.batch_size <= 1438 < (cfg.steps + 1) * cfg.batch_size  # one epoch
    assert cfg.judge_depths == (1004, 10_004) and len(cfg.seeds) >= 2
    top = [c for c in exp.grid(cfg) if c["depth"] == 10_004]
    arms = {(c["scheme"], c["variant"]) for c in top}
    assert arms == {("batchnorm", "postact"), ("fixup", "postact"), ("frozen", "postact")}
    at_1004 = {c["scheme"] for c in exp.grid(cfg) if c["depth"] == 1004}
    assert at_1004 == {"batchnorm", "skipinit", "fixup", "rezero", "frozen", "plain", "scaled"}
    assert all(c["channels_last"] for c in top)


def test_skipinit_depth_deep_is_tables_1_and_2_on_n2_wide_resnets():
    exp = get_experiment("skipinit-depth")
    cfg = exp.config("deep")
    assert cfg.depths == (16, 100, 1000) and cfg.width == 2 and cfg.variant == "preact"
    assert set(cfg.schemes) == {"batchnorm", "skipinit", "plain", "scaled", "frozen"}
    assert (cfg.batch_size, cfg.grad_clip, cfg.schedule) == (64, 0, "constant")
    assert cfg.lrs == (0.01, 0.03, 0.1)  # every arm at its best lr of one grid fixed in advance
    assert {c["lr"] for c in exp.grid(cfg)} == set(cfg.lrs)
    assert len(cfg.seeds) >= 2 and not cfg.top_schemes  # every arm at every depth
    assert {c["depth"] for c in exp.grid(cfg)} == {16, 100, 1000}
    # a cell's net is the n-2 Wide-ResNet: 1,000 layers = 166 blocks per stage, 32/64/128 channels
    import depthlab as dl

    (cell,) = [c for c in exp.grid(cfg) if c["depth"] == 1000][:1]
    name, kwargs, _, _ = exp.cell_model(cell)
    net = dl.create_model(name, **kwargs)
    assert len(net.blocks) == 3 * 166 and net.blocks[-1].branch[-1].out_channels == 128
    assert net.blocks[0].shortcut is not None  # 16 → 32 channels: a 1×1 projection
    with pytest.raises(DepthlabError, match="6N\\+4"):  # a 6n+2 depth is depth-sweep's
        exp.config("smoke", {"depths": [14]})
    with pytest.raises(DepthlabError, match="milestones"):
        exp.config("smoke", {"milestones": [0.8, 0.3]})


def test_transformer_deep_parts_are_64_and_128_layers():
    cfg = get_experiment("transformer-convergence").config("deep")
    assert cfg.deep_depths == (64, 128) and cfg.variants == ()
    assert set(cfg.deep_variants) == {"rezero", "postnorm", "postnorm+warmup", "rezero-alpha1"}
    cells = get_experiment("transformer-convergence").grid(cfg)
    assert {c["depth"] for c in cells} == {64, 128} and {c["part"] for c in cells} == {"deep"}
    assert all((c["warmup_steps"] > 0) == (c["variant"] == "postnorm+warmup") for c in cells)
    jac = get_experiment("transformer-jacobian").config("deep")
    assert {"postnorm-64", "postnorm-128", "rezero-64", "rezero-128"} <= set(jac.models)


def test_fixup_ablation_deep_is_at_least_1000_layers_at_two_learning_rates():
    cfg = get_experiment("fixup-ablation").config("deep")
    assert cfg.depth >= 1000 and (cfg.depth - 2) % 6 == 0
    assert cfg.lrs == (0.1, 1.0) and {"fixup", "frozen", "no-rescale"} <= set(cfg.arms)


def test_depth_sweep_refuses_unknown_top_arms_and_judge_depths_not_run():
    exp = get_experiment("depth-sweep")
    with pytest.raises(DepthlabError, match="top_schemes"):
        exp.config("smoke", {"top_schemes": ["fixup:sideways"]})
    with pytest.raises(DepthlabError, match="judge_depths"):
        exp.config("smoke", {"judge_depths": [56]})


def test_eta_from_the_rate_of_the_finished_cells():
    assert eta_text(60.0, 2, 1) == "; ETA 30 s"
    assert eta_text(600.0, 2, 4) == "; ETA 20 min"
    assert eta_text(10.0, 0, 3) == "" and eta_text(10.0, 3, 0) == ""


# -- full: the papers' setups on the papers' data --
def _cifar_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (folder / name).write_bytes(b"")  # the layout is checked here; the batches are read later
    return str(tmp_path)


@pytest.mark.parametrize(
    ("name", "key"),
    [("depth-sweep", "data_dir"), ("fc-convergence", "data_dir"), ("deep-fc", "data_dir"),
     ("transformer-convergence", "path"), ("skipinit-depth", "data_dir"),
     ("batch-size", "data_dir"), ("fixup-ablation", "data_dir"), ("transformer-jacobian", "path")],
)  # fmt: skip
def test_full_needs_the_papers_data_and_says_how(name, key, monkeypatch):
    monkeypatch.delenv("DEPTHLAB_CIFAR10", raising=False)
    with pytest.raises(DepthlabError, match=f"--set {key}=PATH"):
        get_experiment(name).config("full")


def test_full_reads_cifar_from_the_environment_variable(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHLAB_CIFAR10", _cifar_folder(tmp_path))
    cfg = get_experiment("fc-convergence").config("full")
    assert cfg.data_dir == str(tmp_path)  # recorded in the config, so the cells carry it


def test_full_presets_hold_the_papers_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("DEPTHLAB_MAX_MEMORY", "1000")  # a GPU's memory, not this host's
    data = {"data_dir": _cifar_folder(tmp_path)}
    sweep = get_experiment("depth-sweep").config("full", data)
    # Fixup Fig. 3: CIFAR-10, one epoch at batch 128, the default lr 0.1, to 10,000 layers
    assert sweep.depths[-1] == 10_004 and sweep.batch_size == 128 and sweep.lr == 0.1
    assert sweep.steps * 128 <= 50_000 < (sweep.steps + 1) * 128 and sweep.checkpointing > 0
    fc = get_experiment("fc-convergence").config("full", data)
    # ReZero Fig. 3: 32 layers × 256, Adagrad 0.01, 10 epochs of CIFAR-10 at batch 128
    assert (fc.depth, fc.width, fc.optimizer, fc.lr) == (32, 256, "adagrad", 0.01)
    assert fc.dataset == "cifar10" and abs(fc.steps * fc.batch_size / 50_000 - 10) < 0.02
    assert 0.52 < fc.target_loss < 1.87  # between the notebook's ReZero and the others
    deep = get_experiment("deep-fc").config("full", data)
    assert deep.depth == 10_000 and deep.width == 256 and deep.checkpointing > 0
    lm = tmp_path / "enwik8"
    lm.write_bytes(b"x" * 1000)
    tc = get_experiment("transformer-convergence").config("full", {"path": str(lm)})
    assert tc.target_bpb == 1.2 and tc.deep_depths == (64, 128) and tc.d_model == 512
    bs = get_experiment("batch-size").config("full", data)
    # SkipInit Figs. 5–6: Wide-ResNet-16-4, batch 64 to 4,096, 200 epochs at each, an lr grid
    assert (bs.depth, bs.width, bs.epochs) == (16, 4, 200.0)
    assert bs.batch_sizes == (64, 256, 1024, 4096) and len(bs.lrs) >= 5
    fa = get_experiment("fixup-ablation").config("full", data)
    assert fa.depth == 1202 and fa.data_dir == data["data_dir"] and fa.lrs == (0.1, 1.0)
    tj = get_experiment("transformer-jacobian").config("full", {"path": str(lm)})
    assert {"postnorm-64", "postnorm-128", "rezero-64", "rezero-128"} <= set(tj.models)
    assert all(c["path"] == str(lm) for c in get_experiment("transformer-jacobian").grid(tj))
    si = get_experiment("skipinit-depth").config("full", data)
    # SkipInit Table 1: n-2 Wide-ResNets to 1,000 layers, 200 CIFAR-10 epochs at batch 64
    assert si.depths == (16, 100, 1000) and si.width == 2 and si.batch_size == 64
    assert si.steps * 64 == 200 * 50_000 and si.schedule == "step"


def test_checkpointing_enters_the_memory_check_of_a_10000_layer_cifar_cell(tmp_path):
    exp = get_experiment("depth-sweep")
    cfg = exp.config("full", {"data_dir": _cifar_folder(tmp_path)})  # fits with checkpointing
    (cell,) = [c for c in exp.grid(cfg) if c["depth"] == 10_004][:1]
    assert exp.cell_model(cell)[2] < cell["batch_size"] // 10
    with pytest.raises(DepthlabError, match="would need about"):
        exp.config("full", {"data_dir": cfg.data_dir, "checkpointing": 0})


def test_grow_and_nonlinear_degeneracy_deep_reach_1000_blocks_and_layers():
    grow = get_experiment("grow").config("deep")
    assert grow.depths[-1] >= 1000 and list(grow.depths) == sorted(grow.depths)
    nd = get_experiment("nonlinear-degeneracy").config("deep")
    assert max(nd.fold_depths) >= 1000 and nd.rank_depth >= 1000
    assert max(nd.spectrum_depths) >= 1000


@pytest.mark.parametrize(
    "backend",
    [
        {"pool": SimpleNamespace(_max_workers=2), "name": "local"},
        {"workers": 2, "name": "ray"},  # RayBackend: the cluster's CPUs per cell's CPUs
    ],
)
def test_sweep_eta_predicts_the_queued_cells_from_their_work_and_the_measured_rate(backend):
    """A queued cell with work costs its predicted seconds × its experiment's measured ratio
    (wall / predicted of the finished cells), a cell without work its experiment's mean cell,
    spread over the workers: experiment A ran a 10 s cell in 50 s (ratio 5) and has a 20 s one
    queued (100 s); B ran a cell in 4 s and has one queued (4 s); on 2 workers (100 + 4) / 2 =
    52 s — where A's mean cell (50 s) would have said (50 + 4) / 2."""
    from depthlab.experiments.cost import Work
    from depthlab.experiments.runner import _Job, _Sweep

    def s(seconds):  # work of `seconds` at the ETA's prior rate (no launches)
        return Work(flops=seconds * 100e9, launches=0.0)

    sweep = _Sweep("deep", lambda s: None, True, SimpleNamespace(**backend))
    a, b, c = (_Job(SimpleNamespace(name=n), None, None, [{}, {}], {}, {0, 1}, 0) for n in "abc")
    sweep.eta.add("a", s(10), 50.0)
    sweep.eta.add("b", None, 4.0)
    a.works, b.works = {1: s(20)}, {1: None}
    sweep.jobs = [a, b]
    sweep.handles = {"h1": (a, 1), "h2": (b, 1)}
    assert sweep._eta() == "; ETA 52 s"
    # an experiment none of whose cells has finished: its cell with work at all finished cells'
    # ratio shrunk towards 1 by the prior (100 s × (50 + 1000) / (10 + 1000)), its cell without
    # work at the mean of all finished cells ((50 + 4) / 2); flagged as a guess
    c.works = {0: s(100), 1: None}
    sweep.jobs.append(c)
    sweep.handles |= {"h3": (c, 0), "h4": (c, 1)}
    expect = (100 + 4 + 100 * 1050 / 1010 + 27) / 2
    assert sweep._eta() == (
        f"; ETA {expect:.0f} s (1 experiment not timed yet: a guess from FLOPs and kernel "
        "counts, or the mean cell)"
    )


def test_bn_smoothness_and_batch_size_deep_are_deeper_than_quick():
    for name, attr in (("bn-smoothness", "depth"), ("batch-size", "depth")):
        exp = get_experiment(name)
        quick, deep = exp.config("quick"), exp.config("deep")
        assert getattr(deep, attr) > getattr(quick, attr) and len(deep.seeds) >= 2
    bs = get_experiment("batch-size").config("deep")
    assert bs.depth % 6 == 2 and bs.tiny_batch_sizes == (2, 4, 8)
    assert set(bs.tiny_schemes) == {"batchnorm", "layernorm", "skipinit"}


def test_skipinit_depth_schedule_reaches_the_training_run(monkeypatch):
    """A step schedule in the config is carried by every cell into its TrainConfig."""
    from types import SimpleNamespace

    from depthlab.experiments import depth_sweep

    seen = {}

    def fake_train(model, data, cell, **kw):
        seen.update(kw)
        return SimpleNamespace(summary={}, diverged=False, diverged_step=None)

    monkeypatch.setattr(depth_sweep, "train", fake_train)
    exp = get_experiment("skipinit-depth")
    cfg = exp.config("smoke", {"schedule": "step", "milestones": [0.5, 0.9], "step_gamma": 0.1})
    cell = exp.grid(cfg)[0]
    exp.run_cell(cell)
    assert seen["schedule"] == "step" and tuple(seen["milestones"]) == (0.5, 0.9)
    assert seen["step_gamma"] == 0.1
    seen.clear()
    exp.run_cell(exp.grid(exp.config("smoke"))[0])  # constant: nothing passed, the default
    assert "schedule" not in seen


def _real_cifar(root, n=8):
    """A CIFAR-10 python folder in the real format (pickled batches), ``n`` images per batch."""
    import pickle

    import numpy as np

    folder = root / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            b"labels": rng.integers(0, 10, n).tolist(),
        }
        (folder / name).write_bytes(pickle.dumps(batch))
    return str(root)


def test_batch_size_trains_on_cifar_when_given_a_folder(tmp_path):
    """``--set data_dir=`` puts batch-size on CIFAR-10: the cell reads the folder, builds a
    3-channel net and counts its epochs in CIFAR examples; digits cells keep their hash."""
    exp = get_experiment("batch-size")
    digits = exp.grid(exp.config("smoke"))[0]
    cfg = exp.config("smoke", {"data_dir": _real_cifar(tmp_path), "tiny_schemes": []})
    cell = exp.grid(cfg)[0]
    assert "data_dir" not in digits and cell["data_dir"] == cfg.data_dir
    assert exp.cell_model(cell)[3] == (3, 32, 32) and exp.cell_model(digits)[3] == (1, 8, 8)
    (rec,) = exp.run_cell({**cell, "epochs": 1.0, "batch_size": 8})
    assert rec["steps"] == 5  # 40 training images, batch 8, one epoch
    assert 0.0 <= rec["test_accuracy"] <= 1.0
    claims = exp.claims(pd.DataFrame([{**cell, **rec}]), cfg)
    assert all("CIFAR-10" in c.setup for c in claims)


def test_fixup_ablation_and_transformer_jacobian_read_the_papers_data(tmp_path):
    """fixup-ablation trains on a CIFAR-10 folder (3-channel net, CIFAR examples), and
    transformer-jacobian trains on an enwik8 file, when given one."""
    exp = get_experiment("fixup-ablation")
    cfg = exp.config("smoke", {"data_dir": _real_cifar(tmp_path), "steps": 2, "batch_size": 4})
    cell = exp.grid(cfg)[0]
    assert exp.cell_model(cell)[3] == (3, 32, 32) and "CIFAR-10" in exp.setup(cfg)
    (rec,) = exp.run_cell(cell)
    assert 0.0 <= rec["test_accuracy"] <= 1.0
    text = tmp_path / "enwik8"
    text.write_bytes(bytes(range(256)) * 40)
    jac = get_experiment("transformer-jacobian")
    jcfg = jac.config("smoke", {"path": str(text), "models": ["rezero-2"], "seeds": [0]})
    (jcell,) = jac.grid(jcfg)
    rows = jac.run_cell(jcell)
    assert rows and {r["phase"] for r in rows} == {"init", "trained"}
    with pytest.raises(DepthlabError, match="not a file"):
        jac.config("smoke", {"path": str(tmp_path / "missing")})
