"""Data-parallel training under ``torchrun``: process group, DDP, SyncBatchNorm, sharding.

``torchrun --nproc_per_node=P [--nnodes=N ...] -m depthlab train ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous variables; :func:`setup` then joins the
process group (``nccl`` on GPUs, ``gloo`` on CPU). Every rank computes the same global batch of
step s (a pure function of the seed and s) and trains on its contiguous slice of
``batch_size / W`` examples; DDP averages the gradients, so with equal slices the update equals
the single-process update on the whole batch. Only rank 0 writes files.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from depthlab.nn.norm import convert_distributed_batchnorm
from depthlab.registry import DepthlabError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    owns_group: bool = False  # True when setup() created the process group (and must destroy it)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def setup(device: torch.device) -> DistInfo:
    """Join the process group described by torchrun's environment variables (no-op otherwise)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(
            dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0))
        )
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 or "RANK" not in os.environ:
        return DistInfo()
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend=backend)
    return DistInfo(
        dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), True
    )


def teardown(info: DistInfo, barrier: bool = True) -> None:
    """Leave the process group setup() created; the barrier (skipped after an error, when a peer
    may be gone) keeps a fast rank from closing its connections while a peer is still finishing
    its last collective."""
    if info.owns_group and dist.is_initialized():
        if barrier:
            dist.barrier()
        dist.destroy_process_group()


def shard(x: torch.Tensor, info: DistInfo) -> torch.Tensor:
    """This rank's contiguous slice of a global batch (dimension 0)."""
    if not info.enabled:
        return x
    n = x.shape[0]
    if n % info.world_size:
        raise DepthlabError(
            f"batch_size {n} is not divisible by the world size {info.world_size}; choose a "
            f"multiple of {info.world_size}"
        )
    per = n // info.world_size
    return x[info.rank * per : (info.rank + 1) * per]


def has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def wrap(model: nn.Module, info: DistInfo, device: torch.device, sync_bn: bool = True) -> nn.Module:
    """``DistributedDataParallel`` around ``model``. With ``sync_bn``, every BatchNorm normalizes
    over the whole distributed batch: torch's ``SyncBatchNorm`` on GPUs,
    :class:`~depthlab.nn.norm.DistributedBatchNorm` on the CPU (torch's has no CPU kernel) and
    for token-layout BatchNorms; without it each rank normalizes over its own shard."""
    if not info.enabled:
        return model
    if sync_bn and has_batchnorm(model):
        model = convert_distributed_batchnorm(model, cpu=device.type == "cpu")
    ids = (
        [device.index if device.index is not None else info.local_rank]
        if device.type == "cuda"
        else None
    )
    return nn.parallel.DistributedDataParallel(model, device_ids=ids)


def all_reduce_sum(values: list[float], info: DistInfo, device: torch.device) -> list[float]:
    """Sum a few floats over ranks (identity for one process)."""
    if not info.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()
