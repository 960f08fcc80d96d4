"""``dl.grow``: new identity blocks leave a (trained) model's function exactly unchanged, the old
tensors untouched, gradients reach the new gates, the growth is rebuilt from the config, the
optimizer keeps the old state, and ``depthlab train --resume --grow`` continues a run."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import depthlab as dl
from depthlab.cli import main
from depthlab.models.grow import insertion_points
from depthlab.registry import DepthlabError

CASES = {
    "mlp": (dict(depth=4, width=16, in_dim=64), lambda: torch.randn(6, 64)),
    "resnet": (dict(depth=8, in_channels=1), lambda: torch.randn(4, 1, 8, 8)),
    "resnet-postact": (dict(depth=8, in_channels=1, variant="postact"),
                       lambda: torch.randn(4, 1, 8, 8)),
    "resnet-bottleneck": (dict(depth=26, in_channels=1, stem="cifar", base_width=8,
                               num_classes=10), lambda: torch.randn(3, 1, 8, 8)),
    "transformer-lm": (dict(depth=2, d_model=16, nhead=2, context=8),
                       lambda: torch.randint(0, 256, (3, 8))),
}  # fmt: skip
SCHEMES = ("rezero", "skipinit", "plain", "batchnorm", "layernorm", "fixup")


def _build(case: str, scheme: str) -> torch.nn.Module:
    kw, _ = CASES[case]
    return dl.create_model(case.removesuffix("-postact"), scheme=scheme, **kw)


def _as_if_trained(model: torch.nn.Module) -> None:
    """Every parameter and BN statistic moved off its init (gates ≠ 0, biases ≠ 0), as after
    training, so that the test does not lean on zero-initialised parts."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.uniform_(0.5, 2.0, generator=g)
            elif name.endswith("running_mean"):
                b.normal_(0.0, 0.3, generator=g)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("scheme", SCHEMES)
def test_growing_leaves_the_function_and_old_tensors_unchanged(case, scheme):
    torch.manual_seed(0)
    model = _build(case, scheme)
    _as_if_trained(model)
    x = CASES[case][1]()
    old = [(t, t.detach().clone()) for t in (*model.parameters(), *model.buffers())]
    n_blocks = len(model.blocks)
    with torch.no_grad():  # train mode (BN: batch statistics) on a copy: it moves running stats
        y_eval = model.eval()(x)
        y_train = copy.deepcopy(model).train()(x)
    added = []
    for n, where in ((2, "end"), (3, "even"), (1, 0)):
        added += dl.grow(model, n, where)
    per = 2 if case == "transformer-lm" else 1
    assert len(model.blocks) == n_blocks + 6 * per and len(added) == 6 * per
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), y_eval, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(copy.deepcopy(model).train()(x), y_train, rtol=1e-6, atol=1e-6)
    new = {id(t) for m in added for t in (*m.parameters(), *m.buffers())}
    now = {id(t) for t in (*model.parameters(), *model.buffers())}
    assert now == new | {id(t) for t, _ in old}  # the old tensors are still the model's …
    assert all(torch.equal(t, saved) for t, saved in old)  # … with their values


@pytest.mark.parametrize("case", ["mlp", "resnet", "transformer-lm"])
def test_gradients_reach_the_new_alphas(case):
    torch.manual_seed(0)
    model = _build(case, "rezero")
    _as_if_trained(model)
    added = dl.grow(model, 2, "even")
    gates = [m.gate.alpha for m in added]
    assert all(float(a) == 0.0 for a in gates)
    x = CASES[case][1]()
    model.train()(x).square().mean().backward()
    assert all(a.grad is not None and a.grad.abs() > 0 for a in gates)


def test_a_grown_model_is_rebuilt_from_its_config():
    torch.manual_seed(0)
    model = _build("resnet", "fixup")
    dl.grow(model, 3, "even")
    dl.grow(model, 1, 2)
    assert model.config["grow"] == [[3, "even"], [1, 2]]
    assert model.depth == 8 + 2 * 4
    again = dl.create_model("resnet", scheme="fixup", **json.loads(json.dumps(model.config)))
    again.load_state_dict(model.state_dict())  # strict: the same structure
    x = torch.randn(2, 1, 8, 8)
    torch.testing.assert_close(again.eval()(x), model.eval()(x))


def test_new_resnet_blocks_take_their_stage_channels():
    model = _build("resnet", "rezero")  # 16/32/64 channels, one block per stage
    added = dl.grow(model, 4, "even")  # positions 1, 2, 3, 3 (ceil(k·3/4))
    assert insertion_points(4, 3, "even") == [1, 2, 3, 3]
    from depthlab.nn.residual import weight_layers

    chans = [weight_layers(m.branch)[-1].weight.shape[0] for m in added]
    assert chans == [16, 32, 64, 64]


@pytest.mark.parametrize("scheme", ["scaled", "postnorm", "deepnorm", "noskip"])
def test_schemes_whose_blocks_cannot_be_the_identity_are_refused_untouched(scheme):
    model = dl.create_model("mlp", depth=3, width=8, scheme=scheme)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(DepthlabError, match="cannot be the identity"):
        dl.grow(model, 2)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert "grow" not in model.config


@pytest.mark.parametrize(
    "args,match",
    [((0, "end"), "positive"), ((2, "middle"), "where"), ((2, 9), "outside"), ((True, "end"), "n")],
)
def test_bad_growth_arguments_say_what_to_do(args, match):
    with pytest.raises(DepthlabError, match=match):
        dl.grow(dl.create_model("mlp", depth=3, width=8, scheme="rezero"), *args)


def test_optimizer_keeps_old_state_and_trains_the_new_parameters():
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=3, width=16, scheme="rezero")
    cfg = dl.TrainConfig(lr=0.01, momentum=0.9)
    from depthlab.train import make_optimizer

    opt = make_optimizer(model, cfg)
    x, y = torch.randn(8, 64), torch.randint(0, 10, (8,))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    buffers = {id(p): opt.state[p]["momentum_buffer"].clone() for p in model.parameters()}
    added = dl.grow(model, 2, "end", optimizer=opt)
    new = [p for m in added for p in m.parameters()]
    assert {id(p) for g in opt.param_groups for p in g["params"]} >= {id(p) for p in new}
    assert all(torch.equal(opt.state[p]["momentum_buffer"], buffers[id(p)])
               for p in model.parameters() if id(p) in buffers)  # fmt: skip
    scalars = [
        g for g in opt.param_groups if any(p is m.gate.alpha for m in added for p in g["params"])
    ]
    assert scalars and all(g["name"] == "scalars" for g in scalars)
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert all(float(m.gate.alpha) != 0.0 for m in added)


def test_train_resume_with_grow_continues_from_the_same_loss(tmp_path):
    """``dl.train(resume=True, grow=...)``: the grown model's first evaluation equals the trained
    model's last one; the checkpoint then holds the grown model."""
    data = dl.create_dataset("digits")
    kw = dict(lr=1e-3, optimizer="adam", batch_size=32, eval_every=10)
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=3, width=16, scheme="rezero")
    first = dl.train(model, data, dl.TrainConfig(steps=20, **kw), out_dir=tmp_path)
    before = first.records[-1]["test_loss"]
    hist = dl.train(model, data, dl.TrainConfig(steps=40, **kw), out_dir=tmp_path, resume=True,
                    grow=(6, "even"))  # fmt: skip
    after = next(r for r in hist.records if r.get("eval") and r["step"] == 20)
    assert after["test_loss"] == pytest.approx(before, rel=1e-6)
    assert hist.records[-1]["test_loss"] < before
    from depthlab.train.checkpoint import load_checkpoint

    payload = load_checkpoint(tmp_path / "checkpoint.pt")
    rebuilt = dl.create_model("mlp", scheme="rezero", **payload["metadata"]["model"]["config"])
    rebuilt.load_state_dict(payload["model"])
    assert len(rebuilt.blocks) == 9
    with pytest.raises(DepthlabError, match="resume"):
        dl.train(model, data, dl.TrainConfig(steps=1), grow=(1, "end"))


def test_cli_resume_with_grow(tmp_path, capsys):
    out = tmp_path / "run"
    base = ["train", "--model", "mlp", "--depth", "3", "--width", "16", "--scheme", "rezero",
            "--steps", "20", "--lr", "0.001", "--optimizer", "adam", "--out", str(out),
            "--quiet"]  # fmt: skip
    assert main(base) == 0
    config = (out / "config.yaml").read_text()
    assert main(["train", "--out", str(out), "--quiet", "--grow", "2"]) == 2  # needs --resume
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--grow", "2",
                 "--grow-where", "nowhere"]) == 2  # fmt: skip
    assert (out / "config.yaml").read_text() == config  # nothing written on refusal
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--grow", "4",
                 "--grow-where", "even", "--set", "steps=30"]) == 0  # fmt: skip
    import yaml

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["model"]["grow"] == [[4, "even"]]
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--set", "steps=35"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 35
    capsys.readouterr()


def test_cli_refuses_a_scheme_that_cannot_grow_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--model", "mlp", "--depth", "3", "--width", "8", "--scheme", "scaled",
                 "--steps", "5", "--out", str(out), "--quiet"]) == 0  # fmt: skip
    config = (out / "config.yaml").read_text()
    stamp = (out / "checkpoint.pt").stat().st_mtime_ns
    assert main(["train", "--out", str(out), "--resume", "--quiet", "--grow", "2"]) == 2
    assert "cannot be the identity" in capsys.readouterr().err
    assert (out / "config.yaml").read_text() == config
    assert (out / "checkpoint.pt").stat().st_mtime_ns == stamp
