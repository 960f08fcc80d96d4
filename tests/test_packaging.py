"""Packaging: building a wheel writes nothing into the source tree, and the wheel carries the
single-sourced version, the ``py.typed`` marker and the console script."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import depthlab

ROOT = Path(__file__).resolve().parents[1]


def test_pip_wheel_leaves_the_source_tree_alone(tmp_path):
    pytest.importorskip("hatchling")
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs the git checkout to list the tracked files")
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()  # fmt: skip
    src = tmp_path / "src-tree"
    for f in files:
        (src / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, src / f)
    before = sorted(p.relative_to(src) for p in src.rglob("*"))
    out = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                    "-q", str(src), "-w", str(out)], check=True, capture_output=True)  # fmt: skip
    assert sorted(p.relative_to(src) for p in src.rglob("*")) == before  # no build/, no egg-info
    (wheel,) = out.glob("depthlab-*.whl")
    assert wheel.name.startswith(f"depthlab-{depthlab.__version__}-")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        assert "depthlab/py.typed" in names and "depthlab/cli/__init__.py" in names
        meta = z.read(next(n for n in names if n.endswith("/METADATA"))).decode()
        entry = z.read(next(n for n in names if n.endswith("/entry_points.txt"))).decode()
    assert f"Version: {depthlab.__version__}" in meta and "Provides-Extra: ray" in meta
    assert "depthlab = depthlab.cli:main" in entry
