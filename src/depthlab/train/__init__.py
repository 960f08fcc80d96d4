"""Training: ``train(model, data, TrainConfig(...)) -> History``; checkpoints, logging,
distributed data parallelism."""

from depthlab.train.checkpoint import load_checkpoint, save_checkpoint
from depthlab.train.config import OPTIMIZERS, SCHEDULES, TrainConfig
from depthlab.train.loop import History, evaluate, train
from depthlab.train.optim import lr_factor, make_optimizer, param_groups

__all__ = [
    "OPTIMIZERS",
    "SCHEDULES",
    "History",
    "TrainConfig",
    "evaluate",
    "load_checkpoint",
    "lr_factor",
    "make_optimizer",
    "param_groups",
    "save_checkpoint",
    "train",
]
