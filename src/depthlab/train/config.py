"""``TrainConfig``: every knob of a training run, one frozen dataclass (variants via
``dataclasses.replace``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from depthlab.registry import DepthlabError, unknown_choice

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
SCHEDULES = ("constant", "step", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda", "mps")


_FLOATS = (
    "lr", "momentum", "eps", "weight_decay", "step_gamma", "min_lr_ratio", "grad_clip", "mixup",
    "label_smoothing", "dropout", "scalar_lr_mult", "divergence_factor", "epochs",
)  # fmt: skip


def _coerce(key: str, value: Any) -> Any:
    """YAML 1.1 reads ``1e-3`` (no dot) as a string; accept it for float fields."""
    if key in _FLOATS and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise DepthlabError(f"{key} must be a number, got {value!r}") from None
    return value


@dataclass(frozen=True)
class TrainConfig:
    """A training run. Each field's comment says what it does."""

    steps: int = 500  # optimizer steps (ignored when ``epochs`` is set)
    epochs: float | None = None  # train for this many passes over the training set instead
    batch_size: int = 128  # global batch (split across ranks under torchrun)
    lr: float = 0.1  # peak learning rate
    optimizer: str = "sgd"  # sgd | adam | adamw | adagrad
    momentum: float = 0.9  # SGD momentum
    nesterov: bool = False  # SGD Nesterov momentum
    betas: tuple[float, float] = (0.9, 0.999)  # Adam/AdamW β₁, β₂
    eps: float = 1e-8  # Adam/AdamW/Adagrad ε
    weight_decay: float = (
        0.0  # L2 (decoupled for adamw); never on 0-/1-dim params (scalars, biases, norms)
    )
    schedule: str = (
        "constant"  # constant | step (× step_gamma at milestones) | cosine | linear (decay to 0)
    )
    warmup_steps: int = 0  # linear warm-up from lr/warmup_steps to lr over this many steps
    milestones: tuple[float, ...] = (
        0.5,
        0.75,
    )  # step schedule: fractions of the run where lr drops
    step_gamma: float = 0.1  # step schedule: factor at each milestone
    min_lr_ratio: float = 0.0  # cosine/linear: final lr as a fraction of lr
    grad_clip: float | None = None  # clip the global gradient norm to this value
    mixup: float = 0.0  # mixup Beta(α, α) parameter, 0 = off (Zhang et al. 2017, arXiv 1710.09412)
    label_smoothing: float = 0.0  # classification cross-entropy label smoothing
    dropout: float = 0.0  # dropout on every residual branch output (before its gate)
    scalar_lr_mult: float = 1.0  # lr multiplier for 0-dim params (gates, scalar biases); Fixup: 0.1
    seed: int = 0  # seeds torch/numpy/python and the data order
    eval_every: int = 0  # evaluate on the test set every k steps (0: only at the end)
    eval_batch_size: int = 512  # batch size for evaluation
    log_every: int = 1  # record train loss every k steps (divergence is checked every step)
    checkpoint_every: int = (
        0  # write a checkpoint every k steps when out_dir is set (0: only at the end)
    )
    device: str = "auto"  # auto (cuda if available) | cpu | cuda | mps
    checkpointing: int = 0  # activation checkpointing: number of segments of model.blocks (0: off)
    compile: bool = False  # torch.compile the model
    channels_last: bool = False  # NHWC memory for conv weights and image batches (faster on CPU)
    sgd_in_backward: bool = (
        False  # SGD: fused MLP stacks' weights step during backward (no weight gradients kept)
    )
    divergence_factor: float | None = (
        10.0  # diverged if loss > factor × initial loss (None: only NaN/inf)
    )
    sync_bn: bool = True  # SyncBatchNorm for BN models when world size > 1
    extra: dict[str, Any] = field(default_factory=dict)  # free-form notes saved with the run

    def __post_init__(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise unknown_choice("optimizer", self.optimizer, list(OPTIMIZERS))
        if self.schedule not in SCHEDULES:
            raise unknown_choice("schedule", self.schedule, list(SCHEDULES))
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise unknown_choice("device", self.device, list(DEVICES))
        ints = {
            "steps": (self.steps, 1),
            "batch_size": (self.batch_size, 1),
            "warmup_steps": (self.warmup_steps, 0),
            "eval_every": (self.eval_every, 0),
            "eval_batch_size": (self.eval_batch_size, 1),
            "log_every": (self.log_every, 1),
            "checkpoint_every": (self.checkpoint_every, 0),
            "checkpointing": (self.checkpointing, 0),
            "seed": (self.seed, 0),
        }
        for key, (v, lo) in ints.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise DepthlabError(f"{key} must be an integer ≥ {lo}, got {v!r}")
        nonneg = {
            "lr": self.lr,
            "momentum": self.momentum,
            "weight_decay": self.weight_decay,
            "mixup": self.mixup,
            "label_smoothing": self.label_smoothing,
            "dropout": self.dropout,
            "scalar_lr_mult": self.scalar_lr_mult,
            "min_lr_ratio": self.min_lr_ratio,
            "step_gamma": self.step_gamma,
        }
        for key, v in nonneg.items():
            if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
                raise DepthlabError(f"{key} must be a number ≥ 0, got {v!r}")
        if self.dropout >= 1 or self.label_smoothing >= 1:
            raise DepthlabError("dropout and label_smoothing must be < 1")
        if self.epochs is not None and (
            not isinstance(self.epochs, (int, float)) or self.epochs <= 0
        ):
            raise DepthlabError(f"epochs must be a positive number or null, got {self.epochs!r}")
        if self.grad_clip is not None and (
            not isinstance(self.grad_clip, (int, float)) or self.grad_clip <= 0
        ):
            raise DepthlabError(
                f"grad_clip must be a positive number or null, got {self.grad_clip!r}"
            )
        if self.divergence_factor is not None and (
            not isinstance(self.divergence_factor, (int, float)) or self.divergence_factor <= 1
        ):
            raise DepthlabError(
                f"divergence_factor must be a number > 1 or null, got {self.divergence_factor!r}"
            )
        if self.nesterov and self.momentum == 0:
            raise DepthlabError("nesterov=True needs momentum > 0")
        if self.sgd_in_backward and (self.optimizer != "sgd" or self.grad_clip is not None):
            raise DepthlabError(
                "sgd_in_backward needs optimizer 'sgd' and no grad_clip (clipping needs every "
                f"gradient before any step), got optimizer {self.optimizer!r}, grad_clip "
                f"{self.grad_clip!r}; set sgd_in_backward false"
            )
        # YAML gives lists; keep the dataclass hashable-looking and comparable
        object.__setattr__(self, "betas", tuple(self.betas))
        object.__setattr__(self, "milestones", tuple(self.milestones))

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TrainConfig:
        """Build from a mapping (e.g. YAML); unknown keys are refused and the valid ones listed."""
        valid = cls.field_names()
        bad = [k for k in d if k not in valid]
        if bad:
            raise DepthlabError(f"unknown training option(s) {bad}; valid: {', '.join(valid)}")
        return cls(**{k: _coerce(k, v) for k, v in d.items()})

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["betas"], d["milestones"] = list(self.betas), list(self.milestones)
        return d

    def total_steps(self, steps_per_epoch: int) -> int:
        """The run length: ``steps``, or ``⌈epochs × steps_per_epoch⌉`` when ``epochs`` is set."""
        if self.epochs is None:
            return self.steps
        return max(1, int(-(-self.epochs * steps_per_epoch // 1)))
