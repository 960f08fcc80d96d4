"""A registered experiment whose cells only sleep, for bench_executors.py (a module, so that
worker processes and Ray workers can import it)."""

from __future__ import annotations

import time
from dataclasses import dataclass

from depthlab.experiments import EXPERIMENTS, Experiment


@dataclass(frozen=True)
class SleepConfig:
    n: int = 20
    seconds: float = 0.1
    tag: str = ""  # makes a fresh cell hash per measurement


@EXPERIMENTS.register()
class SleepCells(Experiment):
    name = "bench-sleep"
    title = "cells that sleep"
    columns = ("i",)
    Config = SleepConfig
    presets = {"smoke": SleepConfig()}

    def cells(self, cfg):
        return [{"i": i, "seconds": cfg.seconds, "tag": cfg.tag} for i in range(cfg.n)]

    def run_cell(self, cell):
        time.sleep(cell["seconds"])
        return [{"i": cell["i"]}]
