"""A test experiment whose cells count the denormal products that come out non-zero on torch's
threads — what a worker that flushes denormals to zero computes (imported by the sweep's worker
processes, local or Ray, through the driver's ``sys.path``)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from depthlab.experiments import EXPERIMENTS, Claim, Experiment


@dataclass(frozen=True)
class DenormalConfig:
    n: int = 2
    size: int = 1 << 20  # large enough for torch to split the product over its threads
    device: str = "auto"  # where the sweep would run its cells (the products run on the CPU)


@EXPERIMENTS.register()
class DenormalCells(Experiment):
    name = "test-denormal-cells"
    title = "counts the denormal results of a product"
    columns = ("i", "denormals", "threads", "pid")
    Config = DenormalConfig
    presets = {"smoke": DenormalConfig()}

    def cells(self, cfg):
        return [{"i": i, "size": cfg.size} for i in range(cfg.n)]

    def run_cell(self, cell):
        return [denormal_products(cell["size"])]

    def claims(self, df, cfg):
        return [Claim("products", "-", f"{len(df)} records", "reproduced")]


def denormal_products(size: int) -> dict:
    """How many of ``size`` products 2⁻¹²⁷ · 1.0001 (a denormal times a normal number) come out
    non-zero here, on torch's threads. The denormal is written as its bits: converting a number
    to it would already flush it to zero on a thread that flushes."""
    import torch

    x = torch.full((size,), 0x00400000, dtype=torch.int32).view(torch.float32)  # 2⁻¹²⁷
    return {
        "denormals": int((x * 1.0001 != 0).sum()),
        "threads": torch.get_num_threads(),
        "pid": os.getpid(),
    }
