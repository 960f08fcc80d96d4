"""A throwaway Ray head node on this machine for the ``ray`` tests (``make test-ray``)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RAY = Path(sys.executable).with_name("ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def head(temp: Path, *extra: str) -> Iterator[str]:
    """A real head node bound to 127.0.0.1 with 2 CPUs (and ``extra`` ``ray start`` options, e.g.
    ``--num-gpus 1``, which Ray then advertises whatever the machine has); its address, and the
    node stopped afterwards, also on failure. Ray ≥ 2.59 turns token authentication on for a
    node started where ``~/.ray/auth_token`` exists; this throwaway node on the loopback runs
    without it (``RAY_AUTH_MODE=disabled`` for the node and for the drivers of the tests), so
    that the tests do not depend on what ``~/.ray`` holds. ``ray stop`` stops every Ray node of
    this machine: one head at a time (a module-scoped fixture per test module)."""
    port = free_port()
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE",)}
    os.environ["RAY_AUTH_MODE"] = "disabled"
    cmd = [str(RAY), "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(port),
           "--num-cpus", "2", "--include-dashboard", "false", "--disable-usage-stats",
           f"--temp-dir={temp}", *extra]  # fmt: skip
    try:
        subprocess.run(cmd, check=True, capture_output=True, timeout=180)
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
