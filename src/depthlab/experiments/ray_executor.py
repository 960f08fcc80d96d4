"""Run a sweep's cells as Ray tasks (``depthlab run ... --executor ray [--address ADDR]``).

Every cell becomes one Ray task (Moritz et al. 2018, "Ray: A Distributed Framework for Emerging
AI Applications", arXiv 1712.05889) declaring its resources — ``num_cpus`` (``cpus_per_cell``,
default 1; the cell's torch threads) and ``num_gpus=1`` for a cell whose device is ``cuda`` (or
``auto`` on a cluster with GPUs) — so cells run wherever the cluster has room. A task whose
worker process dies is retried (``max_retries``); a cell that raises is reported with its config
and the other cells go on. Each result travels back through Ray and the driver writes it into
the same cell cache as the local executor (``OUT/NAME/cells/<hash>.json``), so the workers need
not see the output folder, and an interrupted driver re-run recomputes only the missing cells.

Without ``address`` a local Ray instance is started and stopped with the sweep. With one
(``127.0.0.1:6379``, ``auto``, ``ray://head:10001``) the driver joins that cluster. The driver's
``sys.path`` is passed to the workers (``PYTHONPATH`` in the job's runtime environment), which is
what a laptop or a cluster with a shared filesystem needs to import depthlab and any module that
registers an experiment; elsewhere install depthlab on every node.

The job's workers start as the local executor's do: with glibc's huge-page tunable for
``malloc`` (:func:`depthlab.heap.worker_environment`, in the runtime environment's
``env_vars``) and, for a sweep that flushes denormals (``flush=True``), with FTZ/DAZ set by the
runtime environment's ``worker_process_setup_hook`` before the worker's first torch operation
(:func:`flush_worker`); each task checks that its thread flushes before it runs the cell.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from depthlab.experiments.base import Experiment
from depthlab.heap import TUNABLES_VAR, worker_environment
from depthlab.registry import DepthlabError

INSTALL = "pip install 'depthlab[ray]'"
#: retries of a task whose worker process died (a raising cell is not retried)
MAX_RETRIES = 3


def require_ray() -> Any:
    """The ``ray`` module, or a :class:`DepthlabError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise DepthlabError(
            f"--executor ray needs Ray, an optional extra: {INSTALL} (or pip install ray)"
        ) from None
    return ray


def flush_worker() -> None:
    """The ``worker_process_setup_hook`` of a sweep that flushes denormals: FTZ/DAZ on the
    worker's main thread (which runs its tasks) before any torch operation starts the threads
    that inherit it (:func:`depthlab.experiments.runner.flush_denormals`)."""
    from depthlab.experiments.runner import flush_denormals

    flush_denormals()


def _connect(ray: Any, address: str | None, runtime_env: dict[str, Any]) -> None:
    """``ray.init`` for this sweep's driver, or a :class:`DepthlabError` that says what to do."""
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=False,
            runtime_env=runtime_env,
            configure_logging=False,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray"
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise DepthlabError(
            f"could not connect to {where}: {first}; start one with `ray start --head` "
            "and pass its address with --address (a cluster with token authentication also "
            "needs its token in RAY_AUTH_TOKEN), or omit --address to start a local one"
        ) from None


def cluster_gpus(address: str) -> float:
    """The GPUs of the Ray cluster at ``address`` (a short connection of its own, before the
    sweep's, whose workers' setup depends on the answer: the ``deep`` preset flushes denormals
    by default only where its cells run on CPUs,
    :func:`depthlab.experiments.runner.resolve_flush`)."""
    ray = require_ray()
    _connect(ray, address, {})
    try:
        return float(ray.cluster_resources().get("GPU", 0.0))
    finally:
        ray.shutdown()


def _ray_cell(module: str, name: str, cell: dict[str, Any], threads: int):
    """The task: import the experiment's module (registers it), run one cell on this node."""
    import importlib
    import time

    import torch

    from depthlab.experiments.base import EXPERIMENTS
    from depthlab.experiments.runner import FLUSH_KEY, flushing, stamp_node
    from depthlab.heap import keep_freed_memory, release_freed_memory

    if cell.get(FLUSH_KEY) and not flushing():
        raise DepthlabError(
            "this Ray worker does not flush denormals (its setup hook did not run, or its CPU "
            "cannot): run with --no-flush-denormal"
        )
    torch.set_num_threads(max(1, threads))
    keep_freed_memory()  # a Ray worker process runs tasks only; released after the cell
    importlib.import_module(module)
    exp = EXPERIMENTS.get(name)()
    t0 = time.perf_counter()
    try:
        records = exp.run_cell(dict(cell))
    finally:
        release_freed_memory()
    return stamp_node(records), time.perf_counter() - t0


class RayBackend:
    """Cells as Ray tasks (see the module docstring); a context manager that connects to (or
    starts) Ray on entry and disconnects on exit."""

    name = "ray"

    def __init__(
        self, address: str | None = None, cpus_per_cell: int = 1, flush: bool = False
    ) -> None:
        self.ray = require_ray()
        if isinstance(cpus_per_cell, bool) or not isinstance(cpus_per_cell, int):
            raise DepthlabError(f"cpus_per_cell must be a positive integer, got {cpus_per_cell!r}")
        if cpus_per_cell < 1:
            raise DepthlabError(f"cpus_per_cell must be a positive integer, got {cpus_per_cell}")
        self.address = address
        self.flush = flush
        self.cpus = cpus_per_cell
        self.gpus = 0.0
        self.workers = 0
        self._task = None

    def __enter__(self) -> RayBackend:
        ray = self.ray
        paths = [p for p in sys.path if p and Path(p).is_dir()]
        env = {"PYTHONPATH": os.pathsep.join(paths)}
        tunables = worker_environment().get(TUNABLES_VAR)
        if tunables:
            env[TUNABLES_VAR] = tunables
        runtime_env: dict[str, Any] = {"env_vars": env}
        if self.flush:
            runtime_env["worker_process_setup_hook"] = f"{__name__}.{flush_worker.__name__}"
        _connect(ray, self.address, runtime_env)
        resources = ray.cluster_resources()
        self.gpus = float(resources.get("GPU", 0.0))
        # cells that can run at once, for the sweep's ETA (the cluster as it is now)
        self.workers = max(1, int(float(resources.get("CPU", 1.0)) // self.cpus))
        self._task = ray.remote(max_retries=MAX_RETRIES)(_ray_cell)
        return self

    def __exit__(self, *exc: object) -> None:
        self.ray.shutdown()

    def submit(self, exp: Experiment, cell: dict[str, Any]) -> Any:
        device = str(cell.get("device", "cpu"))
        gpu = device.startswith("cuda") or (device == "auto" and self.gpus > 0)
        if gpu and self.gpus == 0:
            raise DepthlabError(
                f"experiment '{exp.name}' asks for device {device}, but the Ray cluster has no "
                "GPU; use --set device=cpu or a cluster with GPUs"
            )
        opts = {"num_cpus": self.cpus, "num_gpus": 1 if gpu else 0}
        return self._task.options(**opts).remote(type(exp).__module__, exp.name, cell, self.cpus)

    def ready(self, handles: list[Any]) -> list[Any]:
        ready, rest = self.ray.wait(handles, num_returns=1)
        if rest:  # everything else already finished, without waiting
            more, _ = self.ray.wait(rest, num_returns=len(rest), timeout=0)
            ready += more
        return ready

    def result(self, handle: Any) -> tuple[list[dict], float]:
        try:
            return self.ray.get(handle)
        except self.ray.exceptions.RayTaskError as e:
            cause = e.as_instanceof_cause() if hasattr(e, "as_instanceof_cause") else e
            raise (cause if isinstance(cause, Exception) else RuntimeError(str(e))) from None

    def cancel(self, handle: Any) -> None:
        try:
            self.ray.cancel(handle, force=True)
        except Exception:  # noqa: BLE001 - finished or already gone
            pass
