"""The ``deep`` preset's denormal default on a Ray cluster that has GPUs (marker ``ray``:
``make test-ray``; skipped without the ``ray`` extra). The head node advertises one GPU
(``ray start --num-gpus 1``), which Ray accepts on any machine; this module's cells ask for none,
so they run on its CPUs. A module of its own: ``ray stop`` stops every node of the machine, so
one head runs at a time (``tests/test_ray.py`` has the CPU-only one)."""

from __future__ import annotations

import pytest

ray = pytest.importorskip("ray")

import ray_cells  # noqa: E402,F401 - registers test-ray-env (the workers import it too)
from depthlab.experiments.runner import run  # noqa: E402
from ray_head import head  # noqa: E402

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def gpu_cluster(tmp_path_factory):
    with head(tmp_path_factory.mktemp("ray"), "--num-gpus", "1") as address:
        yield address


def test_the_deep_default_keeps_ieee_on_a_cluster_with_gpus(gpu_cluster, tmp_path, monkeypatch):
    """A CPU-only driver on a cluster with GPUs: the ``deep`` default (here the test
    experiment's ``smoke``) keeps IEEE arithmetic and says why, because ``device=auto`` cells
    would run on the GPUs; ``--set device=cpu`` flushes there, and so does an explicit flag."""
    from depthlab.experiments import runner
    from depthlab.experiments.ray_executor import cluster_gpus

    assert cluster_gpus(gpu_cluster) == 1
    monkeypatch.setattr(runner, "FLUSH_PRESETS", frozenset({"smoke"}))
    lines: list[str] = []
    (ieee,) = run("test-ray-env", "smoke", tmp_path / "ieee", executor="ray",
                  address=gpu_cluster, log=lines.append)  # fmt: skip
    assert ieee.error is None and (ieee.records["denormals"] > 0).all()
    assert runner.FLUSH_KEY not in ieee.records
    why = "the cluster has 1 GPU(s); the flush is for CPUs"
    assert f"(--preset smoke on device auto: IEEE arithmetic — {why})" in lines
    (flushed,) = run("test-ray-env", "smoke", tmp_path / "cpu", {"device": "cpu"},
                     executor="ray", address=gpu_cluster, log=lambda s: None)  # fmt: skip
    assert flushed.error is None and (flushed.records["denormals"] == 0).all()
