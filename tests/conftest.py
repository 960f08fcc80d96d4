"""Shared test setup: every test starts from the same torch seed."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture
def module_by_module():
    """``module_by_module(fn)`` returns ``fn()`` run under ``depthlab.nn.fusion(False)``: every
    ``Residual``/``Branch``/stack/attention module by module (the unfused reference)."""
    import depthlab as dl

    def run(fn):
        with dl.nn.fusion(False):
            return fn()

    return run


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module's tests (their subprocesses and timings assume it)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
