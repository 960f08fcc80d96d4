"""GPU code paths: the same properties as the CPU tests, on a CUDA device.

Skipped (with the reason) where torch sees no CUDA device, as on the CI machine; run on a GPU
machine with ``pytest tests/test_cuda.py``. The fused MLP stack reads its gates on the host once
per chunk on a GPU, SGD in the backward pass steps CUDA weights, the training loop moves batches
to the device, checkpoints written from a GPU run load on a CPU, and the matrix-free Jacobian
keeps its Krylov basis on the device.
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch

import depthlab as dl
from depthlab import TrainConfig
from depthlab.nn.fusion import stack as fused

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: the GPU paths are checked on a GPU"
)
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def _ieee_float32():
    """TF32 off (cuDNN convolutions use it by default): the CPU comparisons assume IEEE float32."""
    flags = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = flags


def _mlp(scheme: str, act: str, opts: dict, depth: int = 70) -> torch.nn.Module:
    torch.manual_seed(0)
    m = dl.create_model(
        "mlp", depth=depth, width=24, in_dim=5, scheme=scheme, activation=act, scheme_options=opts
    ).double()
    with torch.no_grad():  # off the init (gates 0, zero biases), so every term counts
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return m.to(CUDA)


def _step(m: torch.nn.Module, x: torch.Tensor):
    m.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    out = m(x)
    w = torch.linspace(-1, 1, out.shape[1], dtype=out.dtype, device=out.device)
    (out.sin() * w).sum().backward()
    return (
        out.detach(),
        x.grad,
        {n: p.grad for n, p in m.named_parameters()},
        fused.count_fused_nodes(out),
    )


@pytest.mark.parametrize("segments", [0, 5])
@pytest.mark.parametrize(
    "scheme,act,opts",
    [("rezero", "relu", {}), ("skipinit", "tanh", {"alpha_init": 0.3}), ("plain", "linear", {})],
)
def test_fused_stack_on_cuda_equals_module_by_module(scheme, act, opts, segments):
    m = _mlp(scheme, act, opts)
    m.blocks.checkpoint_segments = segments
    x = torch.randn(6, 5, dtype=torch.float64, device=CUDA)
    out, gx, grads, nodes = _step(m, x)
    m.blocks.fuse = False
    ref_out, ref_gx, ref_grads, ref_nodes = _step(m, x)
    assert nodes >= 2 and ref_nodes == 0  # 70 blocks: two chunks of at most 64
    torch.testing.assert_close(out, ref_out, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-11, atol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


def test_sgd_in_backward_on_cuda_is_the_optimizer_step():
    from depthlab.train.optim import make_optimizer

    ref, m = _mlp("skipinit", "tanh", {"alpha_init": 0.3}), _mlp("skipinit", "tanh", {})
    m.load_state_dict(ref.state_dict())
    cfg = TrainConfig(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3)
    opt_ref, opt = make_optimizer(ref, cfg), make_optimizer(m, cfg)
    m.blocks.sgd_in_backward = fused.SGDInBackward(opt)
    x = torch.randn(7, 5, dtype=torch.float64, device=CUDA)
    for _ in range(3):
        for model, o in ((ref, opt_ref), (m, opt)):
            o.zero_grad(set_to_none=True)
            w = torch.linspace(-1, 1, 10, dtype=x.dtype, device=CUDA)
            (model(x).sin() * w).sum().backward()
            o.step()
    assert all(blk.branch[1].weight.grad is None for blk in m.blocks)
    for (name, p), q in zip(ref.named_parameters(), m.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-8, atol=1e-8, msg=name)


@pytest.mark.parametrize(
    "model_kw,cfg_kw",
    [
        (dict(name="mlp", depth=8, width=64, scheme="rezero"), dict(lr=0.05)),
        (
            dict(name="resnet", depth=8, scheme="fixup", in_channels=1),
            dict(lr=0.05, channels_last=True, scalar_lr_mult=0.1),
        ),
        (dict(name="resnet", depth=8, scheme="batchnorm", in_channels=1), dict(lr=0.05)),
    ],
)
def test_training_on_cuda_follows_the_cpu_loss_curve(model_kw, cfg_kw):
    torch.backends.cudnn.deterministic = True
    curves = {}
    for device in ("cpu", "cuda"):
        torch.manual_seed(0)
        kw = dict(model_kw)
        model = dl.create_model(kw.pop("name"), **kw)
        cfg = TrainConfig(steps=12, batch_size=32, eval_every=6, device=device, **cfg_kw)
        hist = dl.train(model, "digits", cfg)
        assert next(model.parameters()).device.type == device
        curves[device] = [r["train_loss"] for r in hist.records if "train_loss" in r]
    assert curves["cuda"][-1] < curves["cuda"][0]  # it trains
    torch.testing.assert_close(
        torch.tensor(curves["cuda"]), torch.tensor(curves["cpu"]), rtol=2e-3, atol=1e-4
    )


def test_cuda_run_resumes_bit_identical_and_its_checkpoint_loads_on_cpu(tmp_path):
    def run(out, steps, resume=False):
        torch.manual_seed(0)
        model = dl.create_model("mlp", depth=6, width=32, scheme="rezero")
        cfg = TrainConfig(steps=steps, lr=0.05, momentum=0.9, batch_size=32, device="cuda")
        dl.train(model, "digits", cfg, out_dir=out, resume=resume)
        return model

    full = run(tmp_path / "full", 10)
    run(tmp_path / "cut", 5)
    resumed = run(tmp_path / "cut", 10, resume=True)
    for (name, p), q in zip(full.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    # the GPU run's checkpoint continues on the CPU
    torch.manual_seed(0)
    model = dl.create_model("mlp", depth=6, width=32, scheme="rezero")
    cfg = TrainConfig(steps=12, lr=0.05, momentum=0.9, batch_size=32, device="cpu")
    hist = dl.train(model, "digits", cfg, out_dir=tmp_path / "full", resume=True)
    assert hist.summary["steps"] == 12 and next(model.parameters()).device.type == "cpu"


def test_matrix_free_jacobian_on_cuda_equals_dense():
    torch.manual_seed(0)
    net = dl.create_model(
        "mlp", depth=3, width=600, scheme="skipinit", scheme_options={"alpha_init": 0.5}
    )
    model = net.blocks.double().to(CUDA)
    x = torch.randn(1, 600, dtype=torch.float64, device=CUDA)
    dense = dl.jacobian_spectrum(model, x, method="dense", k=5)
    free = dl.jacobian_spectrum(model, x, method="lanczos", k=5, tol=1e-6)
    for kind in ("top", "bottom"):
        d = dense[dense.kind == kind]["singular_value"].to_numpy()
        f = free[free.kind == kind]["singular_value"].to_numpy()
        np.testing.assert_allclose(f, d, rtol=1e-5)


def test_signal_propagation_and_gradient_norms_on_cuda_equal_cpu():
    torch.manual_seed(0)
    model = dl.create_model("resnet", depth=8, scheme="batchnorm", in_channels=1)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    gpu_model = copy.deepcopy(model).to(CUDA)  # (train-mode BN updates its running statistics)
    cpu_sig = dl.signal_propagation(model, x)
    cpu_grad = dl.gradient_norms(model, x, y)
    gpu_sig = dl.signal_propagation(gpu_model, x.to(CUDA))
    gpu_grad = dl.gradient_norms(gpu_model, x.to(CUDA), y.to(CUDA))
    num = cpu_sig.select_dtypes("number").columns
    np.testing.assert_allclose(gpu_sig[num].to_numpy(), cpu_sig[num].to_numpy(), rtol=1e-3)
    numg = cpu_grad.select_dtypes("number").columns
    np.testing.assert_allclose(gpu_grad[numg].to_numpy(), cpu_grad[numg].to_numpy(), rtol=1e-3)


TRAINING = ("batch-size", "bn-smoothness", "deep-fc", "degeneracy", "depth-sweep",
            "fc-convergence", "fixup-ablation", "grow", "skipinit-depth",
            "transformer-convergence", "transformer-jacobian")  # fmt: skip


@pytest.mark.parametrize("name", TRAINING)
def test_an_experiment_cell_runs_on_cuda(name):
    """``--set device=cuda``: a smoke cell of every experiment that trains runs, and every module
    call of it (a global forward pre-hook sees each call's first tensor) is on the GPU."""
    from torch.nn.modules.module import register_module_forward_pre_hook

    from depthlab.experiments import get_experiment

    seen = set()

    def hook(module, args):
        first = next((a for a in args if isinstance(a, torch.Tensor)), None)
        if first is not None:
            seen.add(first.device.type)

    exp = get_experiment(name)
    cell = exp.grid(exp.config("smoke", {"device": "cuda"}))[0]
    handle = register_module_forward_pre_hook(hook)
    try:
        records = exp.run_cell(dict(cell))
    finally:
        handle.remove()
    assert records and seen == {"cuda"}


def test_timed_steps_run_on_the_cells_gpu():
    """``run --dry-run --measure`` on a GPU host: a cell on ``auto`` is timed on CUDA, and the
    timed step trains there (its loss falls on the fixed batch)."""
    from depthlab.experiments import get_experiment
    from depthlab.experiments import timing as tm

    exp = get_experiment("depth-sweep")
    cell = exp.grid(exp.config("smoke", {"device": "auto"}))[0]
    step = tm.cell_step(exp, cell)
    assert step.device.startswith("cuda")
    model, one_step = tm.build_step(step)
    assert next(model.parameters()).is_cuda
    losses = [one_step() for _ in range(40)]
    assert losses[-1] < 0.7 * losses[0]
    seconds = tm.time_step(step, repeats=2)
    assert math.isfinite(seconds) and seconds > 0


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "adagrad"])
def test_every_optimizer_steps_cuda_parameters(name):
    """make_optimizer's optimizers step a model on CUDA (torch 2.11 accepts ``fused=True`` for
    Adagrad when it is built and refuses CUDA parameters at the first step) and take the CPU's
    steps up to float rounding."""
    from depthlab.train.optim import make_optimizer

    cfg = TrainConfig(optimizer=name, lr=0.05, momentum=0.9, weight_decay=1e-3)
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 10, (16,))
    models = []
    for device in ("cpu", CUDA):
        torch.manual_seed(0)
        m = dl.create_model("mlp", depth=4, width=16, in_dim=4, scheme="plain")
        m = m.double().to(device)
        opt = make_optimizer(m, cfg)
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            torch.nn.functional.cross_entropy(m(x.to(device)), y.to(device)).backward()
            opt.step()
        models.append(m)
    for p, q in zip(models[0].parameters(), models[1].parameters(), strict=True):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-9, atol=1e-9)
