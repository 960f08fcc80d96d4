"""The training loop: it really trains, divergence is a result, optimizer groups and schedules."""

from __future__ import annotations

import dataclasses
import importlib
import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import depthlab as dl
from depthlab import DepthlabError, TrainConfig
from depthlab.cli import main
from depthlab.train import evaluate, lr_factor, param_groups

pytestmark = pytest.mark.usefixtures("one_thread")


def test_rezero_mlp_depth32_reaches_95_percent_on_digits():
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=32, width=256, scheme="rezero")
    hist = dl.train(model, "digits", TrainConfig(steps=100, lr=0.05, eval_every=50))
    assert hist.summary["test_accuracy"] >= 0.95
    assert not hist.diverged
    first = hist.records[0]
    assert first["test_accuracy"] < 0.3  # it started from chance
    assert hist.summary["final_train_loss"] < 0.1 * first["train_loss"]


def test_fixup_resnet20_reaches_95_percent_on_digits():
    torch.manual_seed(0)
    model = dl.create_model("resnet", depth=20, scheme="fixup", in_channels=1)
    cfg = TrainConfig(steps=100, lr=0.1, scalar_lr_mult=0.1)
    hist = dl.train(model, "digits", cfg)
    assert hist.summary["test_accuracy"] >= 0.95
    assert [r["step"] for r in hist.records] == list(range(101))  # 100 steps + final eval


def test_plain_depth_1000_diverges_with_step_and_cli_exits_0(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["train", "--model", "mlp", "--depth", "1000", "--width", "16", "--scheme", "plain"]
    argv += ["--lr", "1.0", "--steps", "50", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["diverged"] is True and summary["diverged_step"] == 0
    assert "yes, at step 0" in capsys.readouterr().out


def test_divergence_mid_run_stops_at_that_step():
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=8, width=64, scheme="plain")
    hist = dl.train(model, "digits", TrainConfig(steps=100, lr=5.0, momentum=0.9))
    assert hist.diverged and 0 < hist.diverged_step < 100
    train_recs = [r for r in hist.records if "train_loss" in r]
    assert train_recs[-1]["step"] == hist.diverged_step and train_recs[-1]["diverged"]
    bad = train_recs[-1]["train_loss"]
    assert not math.isfinite(bad) or bad > 10 * train_recs[0]["train_loss"]
    assert all(math.isfinite(r["train_loss"]) for r in train_recs[:-1])
    assert hist.summary["diverged_step"] == hist.diverged_step and hist.summary["steps"] < 100


def test_param_groups_scalars_get_lr_mult_and_no_decay():
    model = dl.create_model("resnet", depth=8, scheme="fixup", in_channels=1)
    cfg = TrainConfig(lr=0.2, weight_decay=5e-4, scalar_lr_mult=0.1)
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["scalars"]["lr"] == pytest.approx(0.02) and groups["scalars"]["weight_decay"] == 0
    assert all(p.dim() == 0 for p in groups["scalars"]["params"])
    assert groups["vectors"]["weight_decay"] == 0  # classifier bias
    assert all(p.dim() == 1 for p in groups["vectors"]["params"])
    assert groups["decay"]["weight_decay"] == 5e-4 and groups["decay"]["lr"] == 0.2
    n = sum(len(g["params"]) for g in groups.values())
    assert n == len(list(model.parameters()))
    n_scalars = sum(1 for p in model.parameters() if p.dim() == 0)
    assert len(groups["scalars"]["params"]) == n_scalars > 0


@pytest.mark.parametrize(
    ("name", "kw"),
    [("sgd", {"momentum": 0.9, "weight_decay": 1e-3}), ("sgd", {"nesterov": True}),
     ("adam", {"weight_decay": 1e-3}), ("adamw", {"weight_decay": 1e-2}), ("adagrad", {})],
)  # fmt: skip
def test_optimizer_is_fused_where_torch_has_it_and_equals_the_reference_loop(name, kw):
    """make_optimizer picks torch's fused kernel on a CPU where this torch has one (else the
    multi-tensor one); either takes the same steps as torch's per-parameter loop implementation
    (``foreach=False``) up to float rounding, over param groups with and without decay."""
    import copy

    from depthlab.train.optim import make_optimizer

    torch.manual_seed(0)
    cfg = TrainConfig(optimizer=name, lr=0.05, scalar_lr_mult=0.1, **kw)
    model = dl.create_model("resnet", depth=8, scheme="fixup", in_channels=1)
    ref_model = copy.deepcopy(model)
    opt = make_optimizer(model, cfg)
    if tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4):
        assert opt.defaults["fused"] is True
    else:
        assert opt.defaults["foreach"] is True
    same = {
        k: opt.defaults[k] for k in ("momentum", "nesterov", "betas", "eps") if k in opt.defaults
    }
    ref = type(opt)(param_groups(ref_model, cfg), lr=cfg.lr, foreach=False, **same)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    for _ in range(4):
        for m, o in ((model, opt), (ref_model, ref)):
            o.zero_grad(set_to_none=True)
            F.cross_entropy(m(x), y).backward()
            o.step()
    # Adam's m/√v and Adagrad's g/(√Σg² + ε) turn a rounding difference in a near-zero gradient
    # (~1e-8 here) into one of up to ~1e-3 of a step (lr = 0.05 here); SGD stays at float32
    # rounding
    tol = 1e-6 if name == "sgd" else 1e-4
    for (n, p), q in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=tol, msg=n)


def test_fused_kernel_only_where_a_fused_step_runs(monkeypatch):
    """``fused_supported`` answers by a fused step on the device: the CPU has all four kernels
    (torch ≥ 2.4), the ``meta`` device none. Where torch refuses the fused kernel only at the
    first step (torch 2.11's fused Adagrad on CUDA, simulated here by making its device check
    refuse every parameter), make_optimizer builds the multi-tensor optimizer, which steps."""
    from depthlab.train import optim

    monkeypatch.setattr(optim, "_FUSED", {})
    new_torch = tuple(int(v) for v in torch.__version__.split(".")[:2]) >= (2, 4)
    for name in ("sgd", "adam", "adamw", "adagrad"):
        assert optim.fused_supported(name, "cpu") is new_torch
        assert optim.fused_supported(name, "meta") is False
    if not torch.cuda.is_available():  # a device this machine lacks: no, rather than an error
        assert optim.fused_supported("adam", "cuda") is False

    def refuse(p, cuda_unsupported=False):
        raise RuntimeError("`fused=True` requires all the params to be ... supported devices")

    monkeypatch.setattr(optim, "_FUSED", {})
    adagrad = importlib.import_module("torch.optim.adagrad")
    monkeypatch.setattr(adagrad, "_device_dtype_check_for_fused", refuse)
    model = dl.create_model("mlp", depth=3, width=8, in_dim=4, scheme="rezero")
    opt = optim.make_optimizer(model, TrainConfig(optimizer="adagrad", lr=0.1))
    assert not opt.defaults["fused"] and opt.defaults["foreach"] is True
    before = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(torch.randn(5, 4)), torch.randint(0, 10, (5,))).backward()
    opt.step()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    sgd = optim.make_optimizer(model, TrainConfig(optimizer="sgd", lr=0.1))
    assert sgd.defaults["fused"] is new_torch


def test_lr_schedules_exact_values():
    c = TrainConfig(lr=1.0, schedule="cosine", warmup_steps=10)
    assert lr_factor(0, 110, c) == pytest.approx(0.1) and lr_factor(9, 110, c) == 1.0
    assert lr_factor(60, 110, c) == pytest.approx(0.5)  # halfway through the cosine
    s = TrainConfig(schedule="step", milestones=(0.5, 0.75), step_gamma=0.1)
    assert [lr_factor(i, 100, s) for i in (49, 50, 74, 75)] == pytest.approx([1, 0.1, 0.1, 0.01])
    lin = TrainConfig(schedule="linear", min_lr_ratio=0.2)
    assert lr_factor(50, 100, lin) == pytest.approx(0.6)
    assert lr_factor(77, 100, TrainConfig()) == 1.0


def test_config_validation_and_frozen():
    with pytest.raises(DepthlabError, match="choose one of: sgd, adam, adamw, adagrad"):
        TrainConfig(optimizer="rmsprop")
    with pytest.raises(DepthlabError, match="batch_size must be an integer"):
        TrainConfig(batch_size=0)
    with pytest.raises(DepthlabError, match="valid: steps, epochs"):
        TrainConfig.from_dict({"stepz": 3})
    assert TrainConfig.from_dict({"lr": "1e-3"}).lr == 1e-3  # YAML 1.1 reads 1e-3 as a string
    with pytest.raises(dataclasses.FrozenInstanceError):
        TrainConfig().lr = 1.0


def test_runs_are_deterministic_and_epochs_set_the_length():
    def run():
        torch.manual_seed(1)
        m = dl.create_model("mlp", depth=2, width=32)
        cfg = TrainConfig(epochs=2, batch_size=256, optimizer="adam", lr=1e-3, mixup=0.2)
        return dl.train(m, dl.create_dataset("digits", flat=True), cfg)

    a, b = run(), run()
    assert a.summary["steps"] == 2 * (1438 // 256) == 10
    assert [r["train_loss"] for r in a.records[:-1]] == [r["train_loss"] for r in b.records[:-1]]
    assert "train_accuracy" not in a.records[0]  # not meaningful under mixup


class _TinyLM(nn.Module):
    """Embedding + linear head: logits (B, T, 256) from bytes (B, T)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(256, 32)
        self.head = nn.Linear(32, 256)
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.emb(x))


def test_lm_task_reports_bits_per_byte(tmp_path):
    path = tmp_path / "text"
    path.write_bytes(b"the quick brown fox jumps over the lazy dog. " * 200)
    ds = dl.create_dataset("bytes", path=str(path), context=16, max_eval_windows=20)
    model = _TinyLM()
    init = evaluate(model, ds, 64, torch.device("cpu"))
    assert init["test_bpb"] == pytest.approx(8.0, abs=1e-5)  # uniform over 256 bytes
    hist = dl.train(model, ds, TrainConfig(steps=60, lr=0.05, optimizer="adam", batch_size=16))
    s = hist.summary
    assert s["test_bpb"] == pytest.approx(s["test_loss"] / math.log(2))
    assert s["test_bpb"] < 3.0  # a bigram model of a repeated sentence


def test_regression_task_uses_mse():
    data = dl.create_dataset("synthetic", kind="teacher", n=256, n_test=64, dim=8)
    model = dl.create_model("linear", depth=2, width=8, scheme="plain")
    hist = dl.train(model, data, TrainConfig(steps=200, lr=0.05, batch_size=64))
    with torch.no_grad():
        mse = F.mse_loss(model(data.x_test), data.y_test).item()
    assert hist.summary["test_loss"] == pytest.approx(mse, rel=1e-5)
    assert mse < 0.05 * hist.records[0]["train_loss"]


def test_callbacks_dropout_hooks_and_activation_checkpointing():
    seen = []
    torch.manual_seed(0)
    model = dl.create_model(
        "mlp", depth=4, width=32, scheme="skipinit", scheme_options={"alpha_init": 0.5}
    )
    ref = dl.create_model(
        "mlp", depth=4, width=32, scheme="skipinit", scheme_options={"alpha_init": 0.5}
    )
    ref.load_state_dict(model.state_dict())
    cfg = TrainConfig(steps=6, lr=0.05, eval_every=3, dropout=0.3)
    dl.train(model, "digits", cfg, callbacks=[lambda s, m, h: seen.append((s, len(h.records)))])
    assert [s for s, _ in seen] == [0, 3, 6]
    x = torch.randn(4, 64)
    model.train()
    assert torch.equal(model(x), model(x))  # dropout hooks removed after the run
    # activation checkpointing recomputes the same numbers
    torch.manual_seed(0)
    a = dl.create_model("mlp", depth=6, width=32, scheme="rezero")
    b = dl.create_model("mlp", depth=6, width=32, scheme="rezero")
    b.load_state_dict(a.state_dict())
    ha = dl.train(a, "digits", TrainConfig(steps=5, lr=0.1))
    hb = dl.train(b, "digits", TrainConfig(steps=5, lr=0.1, checkpointing=2))
    assert [r.get("train_loss") for r in ha.records] == [r.get("train_loss") for r in hb.records]
    assert b.blocks.checkpoint_segments == 2


def test_logging_writes_metrics_jsonl_and_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=2, width=16)
    hist = dl.train(model, "digits", TrainConfig(steps=8, log_every=2), out_dir=tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [0, 2, 4, 6, 8] == [r["step"] for r in hist.records]
    assert list(hist.frame()["step"]) == [0, 2, 4, 6, 8]
    events = list((tmp_path / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == 8


def test_compile_option_reproduces_the_eager_loss_curve():
    """``TrainConfig(compile=True)`` trains the ``torch.compile``d model (the fused ReZero stack
    steps aside while tracing) and gives the eager loss curve."""
    import shutil

    if not (shutil.which("cc") or shutil.which("gcc") or shutil.which("g++")):
        pytest.skip("torch.compile on CPU needs a C++ compiler")
    curves = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        model = dl.create_model("mlp", depth=3, width=32, scheme="rezero")
        cfg = TrainConfig(steps=6, lr=0.05, batch_size=32, compile=compile_)
        try:
            hist = dl.train(model, "digits", cfg)
        except Exception as e:  # a toolchain problem of the machine, not of depthlab
            if compile_ and ("Compil" in type(e).__name__ or "compil" in str(e).lower()):
                pytest.skip(f"torch.compile unavailable here: {type(e).__name__}")
            raise
        curves.append([r["train_loss"] for r in hist.records if "train_loss" in r])
    eager, compiled = curves
    assert len(eager) == len(compiled) >= 6
    assert eager[-1] < eager[0]  # it trains
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-4, atol=1e-5)


def test_sgd_in_backward_reproduces_the_run_and_resumes(tmp_path):
    """``TrainConfig(sgd_in_backward=True)``: the fused ReZero stack's weights take their SGD
    step (momentum, weight decay, cosine schedule) in the backward pass; the loss curve and the
    weights are those of the ordinary step, a run stopped after a checkpoint and resumed ends
    bit-identical to an uninterrupted one (momentum buffers are in the checkpoint), and the
    model is left without the hook."""
    base = dict(
        steps=12, lr=0.05, momentum=0.9, weight_decay=1e-3, schedule="cosine", batch_size=64
    )

    def run(sgd: bool, out=None, resume=False, stop_at=None):
        torch.manual_seed(0)
        model = dl.create_model("mlp", depth=6, width=32, scheme="rezero")
        if resume:
            model.load_state_dict(runs["full"][1].state_dict())  # any weights: the checkpoint wins
        cfg = TrainConfig(**base, sgd_in_backward=sgd, checkpoint_every=5, eval_every=1)

        def stop(step, m, h):
            if stop_at is not None and step == stop_at:
                raise KeyboardInterrupt  # a run killed after its step-5 checkpoint

        try:
            hist = dl.train(model, "digits", cfg, out_dir=out, callbacks=[stop], resume=resume)
        except KeyboardInterrupt:
            return None, model
        return hist, model

    runs = {"ref": run(False), "full": run(True, tmp_path / "full")}
    (h_ref, m_ref), (h, m) = runs["ref"], runs["full"]
    assert m.blocks.sgd_in_backward is None
    loss = [r["train_loss"] for r in h.records if "train_loss" in r]
    loss_ref = [r["train_loss"] for r in h_ref.records if "train_loss" in r]
    assert len(loss) == 12 and loss[-1] < 0.7 * loss[0]  # it trains
    torch.testing.assert_close(torch.tensor(loss), torch.tensor(loss_ref), rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(m_ref.named_parameters(), m.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)
    assert run(True, tmp_path / "cut", stop_at=7)[0] is None
    _, resumed = run(True, tmp_path / "cut", resume=True)
    for (name, p), q in zip(m.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name


def test_channels_last_trains_the_same_run_and_resumes(tmp_path):
    """``TrainConfig(channels_last=True)``: conv kernels and image batches in NHWC give the NCHW
    loss curve (to rounding), the kernels stay NHWC, and the checkpoint resumes."""
    curves, models = [], []
    for cl in (False, True):
        torch.manual_seed(0)
        model = dl.create_model("resnet", depth=8, scheme="fixup", in_channels=1)
        cfg = TrainConfig(steps=8, lr=0.05, batch_size=32, eval_every=4, channels_last=cl)
        hist = dl.train(model, "digits", cfg, out_dir=tmp_path / str(cl))
        curves.append([r["train_loss"] for r in hist.records if "train_loss" in r])
        models.append(model)
        assert (tmp_path / str(cl) / "checkpoint.pt").exists()
    kernel = models[1].blocks[0].branch[1].weight  # (16, 16, 3, 3), after the scalar bias
    assert kernel.is_contiguous(memory_format=torch.channels_last) and not kernel.is_contiguous()
    torch.testing.assert_close(
        torch.tensor(curves[1]), torch.tensor(curves[0]), rtol=1e-4, atol=1e-5
    )
    assert curves[0][-1] < curves[0][0]
    # resume the NHWC run to 12 steps from its checkpoint
    torch.manual_seed(1)
    again = dl.create_model("resnet", depth=8, scheme="fixup", in_channels=1)
    cfg = TrainConfig(steps=12, lr=0.05, batch_size=32, eval_every=4, channels_last=True)
    hist = dl.train(again, "digits", cfg, out_dir=tmp_path / "True", resume=True)
    assert hist.summary["steps"] == 12 and not hist.diverged


def test_evaluation_builds_no_autograd_graph():
    """``evaluate`` runs under no_grad: a 10,000-layer net's test pass must not keep every
    activation for a backward that never comes."""
    from depthlab.train.loop import evaluate

    model = dl.create_model("mlp", depth=4, width=8)
    seen = []
    model.blocks.register_forward_hook(lambda m, i, o: seen.append(torch.is_grad_enabled()))
    data = dl.create_dataset("digits", flat=True)
    out = evaluate(model, data, 512, torch.device("cpu"))
    assert seen and not any(seen) and 0.0 <= out["test_accuracy"] <= 1.0
