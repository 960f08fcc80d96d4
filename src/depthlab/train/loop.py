"""The training loop: ``train(model, data, config) -> History``.

Conventions. Iteration ``i`` (0-based) draws the batch of step i, measures its loss with the
weights after i updates, then updates. The record of step i holds that training loss and lr and,
at evaluation steps (``i % eval_every == 0``), the test metrics measured before the update; a
final record at ``step = total`` holds the test metrics of the trained model.

Divergence is a result, not a crash: if the (all-reduced) training loss of step i is NaN/inf or
exceeds ``divergence_factor ×`` the loss of step 0, the run stops before updating and
``History.diverged_step = i``.
"""

from __future__ import annotations

import math
import os
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from depthlab.data import Dataset, as_dataset
from depthlab.data.base import generator
from depthlab.gctools import frozen
from depthlab.io import write_json
from depthlab.models.common import BlockStack
from depthlab.nn.fusion import sgd_in_backward
from depthlab.nn.fusion.stack import SGDInBackward
from depthlab.nn.residual import residual_blocks
from depthlab.registry import DepthlabError
from depthlab.train import checkpoint as ckpt
from depthlab.train import distributed as dd
from depthlab.train.config import TrainConfig
from depthlab.train.logger import RunLogger, _clean
from depthlab.train.optim import lr_factor, make_optimizer, optimizer_step, set_lr
from depthlab.validate import check_out_dir

LN2 = math.log(2.0)
Callback = Callable[[int, nn.Module, "History"], Any]


@dataclass
class History:
    """What a run produced: per-step ``records``, the divergence flag and a ``summary``."""

    records: list[dict[str, Any]] = field(default_factory=list)
    diverged: bool = False
    diverged_step: int | None = None
    summary: dict[str, Any] = field(default_factory=dict)
    config: TrainConfig | None = None

    def frame(self):  # -> pandas.DataFrame
        import pandas as pd

        return pd.DataFrame.from_records(self.records)

    def last(self, key: str) -> Any:
        """The latest value of ``key`` over the records (None if never logged)."""
        for r in reversed(self.records):
            if key in r:
                return r[key]
        return None


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DepthlabError(
            f"device '{name}' requested but CUDA is not available; use device cpu (or auto)"
        )
    if name.startswith("cuda:"):
        index = name.partition(":")[2]
        if not index.isdigit() or int(index) >= torch.cuda.device_count():
            raise DepthlabError(
                f"device '{name}' is not on this machine ({torch.cuda.device_count()} CUDA "
                f"device(s)); use cuda:0..cuda:{torch.cuda.device_count() - 1} or cpu"
            )
    if name == "mps" and not torch.backends.mps.is_available():
        raise DepthlabError("device 'mps' requested but MPS is not available; use device cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 — the legacy global RNG, for user code
    torch.manual_seed(seed)


#: an initial loss this many times the loss of a uniform prediction is divergence at step 0
ABSURD_LOSS_FACTOR = 1e6


def absurd_loss(dataset: Dataset) -> float:
    """The initial loss beyond which a run counts as diverged at step 0:
    ``ABSURD_LOSS_FACTOR × log(num_classes)`` (the loss of a uniform prediction) for
    classification and language modelling, ``ABSURD_LOSS_FACTOR × max(1, E[y²])`` (the loss of
    predicting 0) for regression. A network whose loss is already ≈ 1e36 at init (a deep
    ``plain`` ResNet) is never "10× its initial loss", so it needs this test."""
    if dataset.task == "regression":
        _, y = dataset.train_batch(0, 64, 0)
        return ABSURD_LOSS_FACTOR * max(1.0, float(y.float().square().mean()))
    return ABSURD_LOSS_FACTOR * math.log(max(2, int(dataset.num_classes or 2)))


def compute_loss(out: torch.Tensor, y: torch.Tensor, task: str, smoothing: float) -> torch.Tensor:
    """Cross-entropy (classification; over the last dim for ``lm``) or mean squared error."""
    if task == "regression":
        return F.mse_loss(out, y)
    if task == "lm":
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1))
    return F.cross_entropy(out, y, label_smoothing=smoothing)


def _channels_last(model: nn.Module) -> bool:
    """True when the model's conv kernels are stored NHWC (``TrainConfig.channels_last``)."""
    return any(
        p.dim() == 4
        and not p.is_contiguous()
        and p.is_contiguous(memory_format=torch.channels_last)
        for p in model.parameters()
    )


@torch.no_grad()
def evaluate(
    model: nn.Module,
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    info: dd.DistInfo | None = None,
) -> dict[str, float]:
    """Test metrics in eval mode: ``test_loss`` and ``test_accuracy`` (classification), ``test_bpb``
    = nats/ln 2 per byte (lm), or the mean squared error (regression). Ranks split the batches."""
    info = info or dd.DistInfo()
    was_training = model.training
    model.eval()
    loss_sum = correct = count = 0.0
    for k, (x, y) in enumerate(dataset.test_batches(batch_size)):
        if k % info.world_size != info.rank:
            continue
        x, y = x.to(device), y.to(device)
        if x.dim() == 4 and _channels_last(model):
            x = x.contiguous(memory_format=torch.channels_last)
        out = model(x).float()
        if dataset.task == "regression":
            loss_sum += F.mse_loss(out, y, reduction="sum").item()
            count += y.numel()
            continue
        logits = out.reshape(-1, out.shape[-1])
        target = y.reshape(-1)
        loss_sum += F.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(-1) == target).sum().item()
        count += target.numel()
    loss_sum, correct, count = dd.all_reduce_sum([loss_sum, correct, count], info, device)
    model.train(was_training)
    loss = loss_sum / max(count, 1.0)
    if dataset.task == "regression":
        return {"test_loss": loss}
    if dataset.task == "lm":
        return {"test_loss": loss, "test_bpb": loss / LN2}
    return {"test_loss": loss, "test_accuracy": correct / max(count, 1.0)}


def add_dropout(model: nn.Module, p: float) -> list:
    """Dropout on every residual branch output (before its gate), as forward hooks."""
    if p <= 0:
        return []
    blocks = residual_blocks(model)
    if not blocks:
        raise DepthlabError("dropout > 0 needs a model built from residual blocks; set dropout=0")

    def hook(module: nn.Module, inputs: Any, out: torch.Tensor) -> torch.Tensor:
        return F.dropout(out, p, module.training)

    return [blk.branch.register_forward_hook(hook) for blk in blocks]


def _mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """mixup (Zhang et al. 2017, arXiv 1710.09412): ``x' = λx + (1-λ)x[π]``, λ ~ Beta(α, α),
    π a random permutation; both drawn from step ``(seed, step)``. Returns x', y[π], λ."""
    lam = float(np.random.default_rng([seed, 5, step]).beta(alpha, alpha))
    perm = torch.randperm(x.shape[0], generator=generator(seed, 5, step))
    return lam * x + (1 - lam) * x[perm], y[perm], lam


def _grow_resumed(model: nn.Module, cfg: TrainConfig, payload: dict, grow: tuple, out_dir: Path):
    """Grow a model just loaded from a checkpoint; return an optimizer over the old parameters
    holding the checkpoint's state, for :func:`~depthlab.models.grow.carry_state`."""
    from depthlab.models.grow import grow as grow_model

    path = out_dir / ckpt.FILENAME
    before = make_optimizer(model, cfg)
    ckpt.validate_optimizer(payload["optimizer"], before, path)
    before.load_state_dict(payload["optimizer"])
    grow_model(model, grow[0], grow[1])
    return before


def _diagnose(model, dataset, cfg, device, logger, step: int, probe: list) -> None:
    """Per-block output variance and gradient norm on a fixed test batch, to TensorBoard."""
    from depthlab.diagnostics import gradient_norms, signal_propagation

    if not probe:
        x, y = next(iter(dataset.test_batches(min(256, cfg.eval_batch_size))))
        probe += [x.to(device), y.to(device)]
    x, y = probe
    sig = signal_propagation(model, x)
    grads = gradient_norms(model, x, y, loss_fn=lambda o, t: compute_loss(o, t, dataset.task, 0.0))
    act = grads[grads["kind"] == "activation"].sort_values("block")
    logger.log_diagnostics(step, [float(v) for v in sig["out_var"]],
                           [float(v) for v in act["norm"]])  # fmt: skip


def train(
    model: nn.Module,
    data: Any = "digits",
    config: TrainConfig | None = None,
    out_dir: str | Path | None = None,
    callbacks: Iterable[Callback] = (),
    quiet: bool = True,
    resume: bool = False,
    should_stop: Callable[[], BaseException | None] | None = None,
    grow: tuple[int, str | int] | None = None,
) -> History:
    """Train ``model`` on ``data``: a data set name, a :class:`~depthlab.data.Dataset`, a
    ``.npz``/``.pt`` file, a torch ``Dataset`` or ``DataLoader`` of ``(x, y)`` pairs, or a
    ``(train, test)`` pair of those (:func:`depthlab.data.as_dataset`: without a test set, the
    last 20% of a seeded shuffle is held out).

    With ``out_dir``, rank 0 writes ``metrics.jsonl``, TensorBoard events (``tb/``),
    ``checkpoint.pt`` (every ``checkpoint_every`` steps and at the end) and ``summary.json``;
    ``resume=True`` continues from ``out_dir/checkpoint.pt``. Under ``torchrun`` the run is
    data-parallel (see :mod:`depthlab.train.distributed`). ``callbacks`` are called as
    ``cb(step, model, history)`` after each evaluation. ``should_stop()`` is polled before
    every step; an exception it returns is raised there, at a step boundary (the CLI turns
    SIGINT/SIGTERM into one, so that an interruption never lands inside a file write or the
    TensorBoard writer's shutdown).

    ``grow=(n, where)`` with ``resume=True``: after loading the checkpoint, insert ``n`` new
    identity blocks (:func:`depthlab.grow`), keep the optimizer state of the old parameters, save
    the grown checkpoint at once, and continue training the grown model.
    """
    cfg = config or TrainConfig()
    if grow is not None and not resume:
        raise DepthlabError("grow continues a run: it needs resume=True and a checkpoint")
    dataset = as_dataset(data)
    if resume and out_dir is None:
        raise DepthlabError("resume=True needs the out_dir that holds the checkpoint")
    if out_dir is not None and int(os.environ.get("RANK", "0")) == 0:
        check_out_dir(out_dir, "out_dir")
    device = resolve_device(cfg.device)
    info = dd.setup(device)
    if device.type == "cuda" and info.enabled:
        device = torch.device("cuda", info.local_rank)
        torch.cuda.set_device(device)
    hooks: list = []
    ok = False
    try:
        hooks = add_dropout(model, cfg.dropout)
        hist = _run(
            model, dataset, cfg, device, info, out_dir, list(callbacks), quiet, resume,
            should_stop, grow,
        )  # fmt: skip
        ok = True
        return hist
    finally:
        for h in hooks:
            h.remove()
        dd.teardown(info, barrier=ok)


def _run(
    model: nn.Module,
    dataset: Dataset,
    cfg: TrainConfig,
    device: torch.device,
    info: dd.DistInfo,
    out_dir: str | Path | None,
    callbacks: list[Callback],
    quiet: bool,
    resume: bool,
    should_stop: Callable[[], BaseException | None] | None = None,
    grow: tuple[int, str | int] | None = None,
) -> History:
    seed_everything(cfg.seed)
    run = _Run(model, dataset, cfg, device, info, out_dir, callbacks)
    if resume:
        run.restore()
    model.to(device)
    before_growth = None
    if grow is not None and run.payload is not None:
        where = Path(out_dir)  # type: ignore[arg-type]
        before_growth = _grow_resumed(model, cfg, run.payload, grow, where)
    run.prepare_model()
    net = dd.wrap(model, info, device, cfg.sync_bn)
    run.make_optimizer(before_growth)
    if cfg.compile:
        net = torch.compile(net)
    run.logger = RunLogger(out_dir, run.total, run.start, quiet, info.is_main, run.hist.records)
    if before_growth is not None:
        run.save(
            run.start, run.wall0
        )  # the checkpoint now holds the grown model, as config.yaml says
    with frozen():  # the model and optimizer state out of the full collections' scans
        run.loop(net, should_stop)
    return run.finish()


class _Run:
    """The state of one training run: the model, its optimizer, the history and the steps (what
    :func:`train` does, in parts)."""

    def __init__(self, model, dataset, cfg, device, info, out_dir, callbacks) -> None:
        self.model, self.dataset, self.cfg, self.device, self.info = (
            model,
            dataset,
            cfg,
            device,
            info,
        )
        self.out_dir, self.callbacks = out_dir, callbacks
        self.total = cfg.total_steps(dataset.steps_per_epoch(cfg.batch_size))
        self.hist = History(config=cfg)
        self.payload: dict | None = None
        self.start, self.wall0, self.init_loss = 0, 0.0, None
        self.blocks: Any = None
        self.sgd_step: SGDInBackward | None = None
        self.logger: Any = None
        self.probe: list = []  # the fixed batch of the periodic diagnostics, drawn once
        self.step = self.steps_run = 0
        self.train_time = self.wall = 0.0
        self.final: dict[str, Any] = {}

    # -- set-up ------------------------------------------------------------------------------
    def restore(self) -> None:
        """Load the checkpoint in ``out_dir``: weights, step, wall time, records."""
        path = Path(self.out_dir) / ckpt.FILENAME  # type: ignore[arg-type]
        self.payload = payload = ckpt.load_checkpoint(path)
        ckpt.validate(payload, self.model, path)
        self.model.load_state_dict(payload["model"])
        meta = payload["metadata"]
        self.start = int(meta["step"])
        self.wall0, self.init_loss = float(meta["wall_time_s"]), meta["initial_loss"]
        self.hist.records = [r for r in meta["records"] if r["step"] < self.start]
        self.hist.diverged, self.hist.diverged_step = bool(meta["diverged"]), meta["diverged_step"]

    def prepare_model(self) -> None:
        """NHWC conv kernels and activation checkpointing, as the config asks."""
        cfg, model = self.cfg, self.model
        if cfg.channels_last:  # conv kernels (4-d parameters) in NHWC; batches converted per step
            model.to(memory_format=torch.channels_last)
        if cfg.checkpointing:
            blocks = getattr(model, "blocks", None)
            if blocks is None or not hasattr(blocks, "checkpoint_segments"):
                raise DepthlabError(
                    "checkpointing > 0 needs a depthlab model with .blocks (a BlockStack); set 0"
                )
            blocks.checkpoint_segments = cfg.checkpointing

    def make_optimizer(self, before_growth) -> None:
        """The optimizer (its state restored, or carried over a growth), and SGD in the
        backward pass where the config asks for it."""
        cfg, model = self.cfg, self.model
        self.optimizer = optimizer = make_optimizer(model, cfg)
        if cfg.sgd_in_backward:
            blocks = getattr(model, "blocks", None)
            if not isinstance(blocks, BlockStack):
                raise DepthlabError(
                    "sgd_in_backward needs a depthlab model with .blocks (a BlockStack); set false"
                )
            if self.info.world_size > 1:
                raise DepthlabError(
                    "sgd_in_backward cannot run data-parallel (gradients must be averaged over "
                    "ranks before any step); set sgd_in_backward false under torchrun"
                )
            self.blocks, self.sgd_step = blocks, SGDInBackward(optimizer)
        if before_growth is not None:  # the old parameters keep their state; the new start afresh
            from depthlab.models.grow import carry_state

            carry_state(before_growth, optimizer)
            ckpt.set_rng_state(self.payload["rng"])  # type: ignore[index]
        elif self.payload is not None:
            self._load_optimizer()

    def _load_optimizer(self) -> None:
        path = Path(self.out_dir) / ckpt.FILENAME  # type: ignore[arg-type]
        payload: dict = self.payload  # type: ignore[assignment]
        ckpt.validate_optimizer(payload["optimizer"], self.optimizer, path)
        try:
            self.optimizer.load_state_dict(payload["optimizer"])
            ckpt.set_rng_state(payload["rng"])
        except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
            raise DepthlabError(
                f"checkpoint {path} is damaged ({type(e).__name__}: {str(e)[:120]}); delete it "
                f"(or choose a new --out) to start afresh"
            ) from None

    # -- records -----------------------------------------------------------------------------
    def save(self, step: int, wall: float) -> None:
        if self.out_dir is None or not self.info.is_main:
            return
        hist = self.hist
        meta = {
            "wall_time_s": wall,
            "initial_loss": self.init_loss,
            "records": hist.records,
            "diverged": hist.diverged,
            "diverged_step": hist.diverged_step,
            "config": self.cfg.to_dict(),
            "dataset": self.dataset.name,
        }
        path = Path(self.out_dir) / ckpt.FILENAME
        ckpt.save_checkpoint(path, self.model, self.optimizer, step, meta)

    def log(self, rec: dict[str, Any]) -> None:
        self.hist.records.append(rec)
        self.logger.log(rec)

    def run_eval(self, step: int, rec: dict[str, Any]) -> None:
        rec.update(evaluate(self.model, self.dataset, self.cfg.eval_batch_size, self.device,
                            self.info))  # fmt: skip
        rec["eval"] = True
        self.logger.log_model(step, self.model)

    # -- the steps ---------------------------------------------------------------------------
    def loop(self, net, should_stop) -> None:
        cfg = self.cfg
        absurd = absurd_loss(self.dataset)
        t_start = time.perf_counter()
        self.step = self.start
        net.train()
        try:
            while self.step < self.total and not self.hist.diverged:
                if should_stop is not None and (stop := should_stop()) is not None:
                    raise stop
                if not self._one_step(net, absurd):
                    break
                if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0:
                    if self.step < self.total:
                        self.save(self.step, self.wall0 + time.perf_counter() - t_start)
            self.final = {"step": self.step}
            self.run_eval(self.step, self.final)
            self.log(self.final)
            for cb in self.callbacks:
                cb(self.step, self.model, self.hist)
            self.wall = self.wall0 + time.perf_counter() - t_start
            self.save(self.step, self.wall)
        finally:
            self.logger.close()

    def _one_step(self, net, absurd: float) -> bool:
        """One training step; False when it diverged (recorded, the run stops)."""
        cfg, step = self.cfg, self.step
        rec: dict[str, Any] = {"step": step}
        evaluated = cfg.eval_every > 0 and step % cfg.eval_every == 0
        if evaluated:
            self.run_eval(step, rec)
        if cfg.diagnose_every and step % cfg.diagnose_every == 0 and self.logger.tensorboard:
            _diagnose(self.model, self.dataset, cfg, self.device, self.logger, step, self.probe)
        t0 = time.perf_counter()
        lr = set_lr(self.optimizer, lr_factor(step, self.total, cfg))
        # SGD in the backward pass (sgd_in_backward): for this step's forward and backward only
        with sgd_in_backward(self.blocks, self.sgd_step):
            loss, g_loss, g_acc, mixed = self._forward(net, step)
            diverged = self._diverged(g_loss, step, absurd)
            if not diverged:
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
        rec.update({"train_loss": g_loss, "lr": lr})
        if self.dataset.task == "classification" and not mixed:
            rec["train_accuracy"] = g_acc
        if diverged or not self._update(rec):
            self.hist.diverged, self.hist.diverged_step = True, step
            rec["diverged"] = True
            self.log(rec)
            return False
        dt = time.perf_counter() - t0
        self.train_time += dt
        self.steps_run += 1
        self.step += 1
        if evaluated or step % cfg.log_every == 0:
            self.log(rec)  # records stay deterministic: the throughput goes to TensorBoard only
            self.logger.scalar("train/examples_per_s", cfg.batch_size / max(dt, 1e-9), step)
        self.logger.progress(1, g_loss, cfg.batch_size / max(dt, 1e-9))
        if evaluated:
            for cb in self.callbacks:
                cb(step, self.model, self.hist)
        return True

    def _forward(self, net, step: int):
        """``(loss, all-reduced loss, all-reduced accuracy, mixed)`` of the step's batch."""
        cfg, dataset, info, device = self.cfg, self.dataset, self.info, self.device
        x, y = dataset.train_batch(step, cfg.batch_size, cfg.seed)
        y_b, lam = None, 1.0
        if cfg.mixup > 0 and dataset.task == "classification":
            x, y_b, lam = _mixup(x, y, cfg.mixup, cfg.seed, step)
            y_b = dd.shard(y_b, info).to(device)
        x, y = dd.shard(x, info).to(device), dd.shard(y, info).to(device)
        if cfg.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        out = net(x)
        loss = compute_loss(out, y, dataset.task, cfg.label_smoothing)
        if y_b is not None:
            loss = lam * loss + (1 - lam) * compute_loss(
                out, y_b, dataset.task, cfg.label_smoothing
            )
        stats = [loss.item(), 0.0]
        if dataset.task == "classification":
            stats[1] = (out.detach().argmax(-1) == y).float().mean().item()
        g_loss, g_acc = (v / info.world_size for v in dd.all_reduce_sum(stats, info, device))
        return loss, g_loss, g_acc, y_b is not None

    def _diverged(self, g_loss: float, step: int, absurd: float) -> bool:
        """NaN/inf, or above ``divergence_factor ×`` the first loss, or an absurd first loss."""
        if step == 0 or self.init_loss is None:
            self.init_loss = g_loss
        factor, init = self.cfg.divergence_factor, self.init_loss
        bad = not math.isfinite(g_loss) or (
            factor is not None and math.isfinite(init) and g_loss > factor * init
        )
        # diverged before training: the initial loss is already absurd
        return bad or (step == self.start == 0 and g_loss > absurd)

    def _update(self, rec: dict[str, Any]) -> bool:
        """Clipping and the optimizer step after the backward pass; False when the step
        overflows (lr × gradient beyond float range: divergence)."""
        if self.cfg.grad_clip is not None:
            gn = nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
            rec["grad_norm"] = float(gn)
        try:
            optimizer_step(self.optimizer)  # step(), without re-walking 40k tensors (fused Adam)
        except RuntimeError as e:
            if "overflow" not in str(e):
                raise
            return False
        return True

    def finish(self) -> History:
        """The run's summary (and ``summary.json``)."""
        hist, cfg, final, step = self.hist, self.cfg, self.final, self.step
        t = self.train_time
        hist.summary = {
            "final_train_loss": hist.last("train_loss"),
            "test_loss": final.get("test_loss"),
            "diverged": hist.diverged,
            "diverged_step": hist.diverged_step,
            "steps": step,
            "total_steps": self.total,
            "epochs": step * cfg.batch_size / self.dataset.num_train(),
            "wall_time_s": self.wall,
            "steps_per_s": self.steps_run / t if t > 0 else None,
            "examples_per_s": self.steps_run * cfg.batch_size / t if t > 0 else None,
            "world_size": self.info.world_size,
            "device": str(self.device),
            "dataset": self.dataset.name,
            "task": self.dataset.task,
            "num_params": int(sum(p.numel() for p in self.model.parameters())),
        }
        for key in ("test_accuracy", "test_bpb"):
            if key in final:
                hist.summary[key] = final[key]
        if self.out_dir is not None and self.info.is_main:
            summary = {k: _clean(v) for k, v in hist.summary.items()}
            write_json(Path(self.out_dir) / "summary.json", summary)
        return hist
