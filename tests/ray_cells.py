"""A fake experiment for the Ray executor's fault tests (imported by the Ray workers through the
driver's ``sys.path``): each cell leaves a marker file per run, one cell can wait to be killed,
one can raise. Markers are ``<i>.<pid>.<ns>.run``."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from denormal_cells import DenormalConfig, denormal_products
from depthlab.experiments import EXPERIMENTS, Claim, Experiment


@dataclass(frozen=True)
class FaultConfig:
    n: int = 6
    log: str = ""  # folder for markers
    sleep: float = 0.0  # seconds each cell takes
    victim: int = 999_999  # this cell waits (its pid in victim.pid) until killed, on its first run
    fails: int = 999_999  # this cell raises


@EXPERIMENTS.register()
class RayFaults(Experiment):
    name = "test-ray-faults"
    title = "markers, a victim and a failure"
    columns = ("i", "value")
    Config = FaultConfig
    presets = {"smoke": FaultConfig()}
    zero_ok = ("sleep",)

    def check(self, cfg):
        pass

    def cells(self, cfg):
        return [
            {"i": i, "log": cfg.log, "sleep": cfg.sleep, "victim": cfg.victim, "fails": cfg.fails}
            for i in range(cfg.n)
        ]

    def run_cell(self, cell):
        log = Path(cell["log"])
        (log / f"{cell['i']}.{os.getpid()}.{time.time_ns()}.run").write_text("")
        if cell["i"] == cell["victim"] and not (log / "victim.pid").exists():
            (log / "victim.pid").write_text(str(os.getpid()))
            time.sleep(120)  # killed by the test long before
        if cell["i"] == cell["fails"]:
            raise ValueError(f"cell {cell['i']} breaks on purpose")
        time.sleep(cell["sleep"])
        return [{"value": float(cell["i"])}]

    def claims(self, df, cfg):
        return [
            Claim("values", "i", f"{len(df)} records", "reproduced", setup="-", paper_setup="-")
        ]


@EXPERIMENTS.register()
class RayWorkerEnv(Experiment):
    """What a Ray worker's arithmetic and environment are: the denormal products that come out
    non-zero on two torch threads, and the glibc tunables it started with."""

    name = "test-ray-env"
    title = "a Ray worker's denormals and tunables"
    columns = ("i", "denormals", "tunables")
    Config = DenormalConfig
    presets = {"smoke": DenormalConfig()}

    def cells(self, cfg):
        return [{"i": i, "size": cfg.size} for i in range(cfg.n)]

    def run_cell(self, cell):
        import torch

        torch.set_num_threads(2)  # threads started from the task's thread, after its setup
        products = denormal_products(cell["size"])
        return [{"denormals": products["denormals"],
                 "tunables": os.environ.get("GLIBC_TUNABLES", "")}]  # fmt: skip

    def claims(self, df, cfg):
        return [Claim("env", "-", f"{len(df)} records", "reproduced", setup="-", paper_setup="-")]
