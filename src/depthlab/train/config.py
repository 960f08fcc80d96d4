"""``TrainConfig``: every knob of a training run, one frozen dataclass (variants via
``dataclasses.replace``)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from depthlab import validate as v
from depthlab.registry import DepthlabError, unknown_choice

OPTIMIZERS = ("sgd", "adam", "adamw", "adagrad")
SCHEDULES = ("constant", "step", "cosine", "linear")
DEVICES = ("auto", "cpu", "cuda", "mps")
#: the longest run accepted (steps, or epochs)
MAX_STEPS = 10**12


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
    diagnose_every: int = 0  # TensorBoard: per-block signal and gradient norms every k steps
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
        self._check_names()
        self._check_numbers()
        self._check_lists()
        self._check_combinations()

    def _check_names(self) -> None:
        for key in ("optimizer", "schedule", "device"):
            if not isinstance(getattr(self, key), str):
                raise DepthlabError(f"{key} must be a string, got {getattr(self, key)!r}")
        if self.optimizer not in OPTIMIZERS:
            raise unknown_choice("optimizer", self.optimizer, list(OPTIMIZERS))
        if self.schedule not in SCHEDULES:
            raise unknown_choice("schedule", self.schedule, list(SCHEDULES))
        if self.device not in DEVICES and not str(self.device).startswith("cuda:"):
            raise unknown_choice("device", self.device, list(DEVICES))

    def _check_numbers(self) -> None:
        set_ = object.__setattr__
        ints = {
            "steps": (1, MAX_STEPS),
            "batch_size": (1, None),
            "warmup_steps": (0, MAX_STEPS),
            "eval_every": (0, None),
            "eval_batch_size": (1, None),
            "log_every": (1, None),
            "diagnose_every": (0, None),
            "checkpoint_every": (0, None),
            "checkpointing": (0, None),
        }
        for key, (lo, hi) in ints.items():
            set_(self, key, v.integer(key, getattr(self, key), lo, hi))
        set_(self, "seed", v.seed("seed", self.seed))
        ranges = {  # key: (lo, hi, hi_open)
            "lr": (0.0, None, False),
            "momentum": (0.0, 1.0, False),
            "weight_decay": (0.0, None, False),
            "mixup": (0.0, None, False),
            "label_smoothing": (0.0, 1.0, True),
            "dropout": (0.0, 1.0, True),
            "scalar_lr_mult": (0.0, None, False),
            "min_lr_ratio": (0.0, 1.0, False),
            "step_gamma": (0.0, None, False),
        }
        for key, (lo, hi, hi_open) in ranges.items():
            set_(self, key, v.number(key, getattr(self, key), lo, hi, hi_open=hi_open))
        set_(self, "eps", v.number("eps", self.eps, 0.0, lo_open=True))
        set_(self, "epochs", v.number("epochs", self.epochs, 0.0, lo_open=True, allow_none=True))
        if self.epochs is not None and self.epochs > MAX_STEPS:
            raise DepthlabError(f"epochs must be ≤ {MAX_STEPS:g}, got {self.epochs:g}")
        set_(
            self,
            "grad_clip",
            v.number("grad_clip", self.grad_clip, 0.0, lo_open=True, allow_none=True),
        )
        set_(
            self,
            "divergence_factor",
            v.number(
                "divergence_factor", self.divergence_factor, 1.0, lo_open=True, allow_none=True
            ),
        )
        for key in ("nesterov", "compile", "channels_last", "sgd_in_backward", "sync_bn"):
            v.boolean(key, getattr(self, key))

    def _check_lists(self) -> None:
        set_ = object.__setattr__
        betas = self.betas
        if not isinstance(betas, (list, tuple)) or len(betas) != 2:
            raise DepthlabError(f"betas must be a list of two numbers in [0, 1), got {betas!r}")
        set_(self, "betas", tuple(v.number("betas", b, 0.0, 1.0, hi_open=True) for b in betas))
        ms = self.milestones
        if not isinstance(ms, (list, tuple)):
            raise DepthlabError(
                f"milestones must be a list of fractions of the run in (0, 1), e.g. [0.5, 0.75]; "
                f"got {ms!r}"
            )
        ms = tuple(v.number("milestones", m, 0.0, 1.0, lo_open=True, hi_open=True) for m in ms)
        if list(ms) != sorted(ms):
            raise DepthlabError(f"milestones must be increasing, got {list(ms)}")
        set_(self, "milestones", ms)
        if not isinstance(self.extra, dict):
            raise DepthlabError(f"extra must be a mapping, got {self.extra!r}")

    def _check_combinations(self) -> None:
        if self.nesterov and self.momentum == 0:
            raise DepthlabError("nesterov=True needs momentum > 0")
        if self.sgd_in_backward and (self.optimizer != "sgd" or self.grad_clip is not None):
            raise DepthlabError(
                "sgd_in_backward needs optimizer 'sgd' and no grad_clip (clipping needs every "
                f"gradient before any step), got optimizer {self.optimizer!r}, grad_clip "
                f"{self.grad_clip!r}; set sgd_in_backward false"
            )

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
