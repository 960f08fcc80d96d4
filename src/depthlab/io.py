"""Small I/O helpers shared by training, experiments and the CLI: atomic writes, safe YAML,
``--set key=value`` overrides."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from depthlab.registry import DepthlabError


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file in the same folder, then rename it onto
    ``path``: readers never see a half-written file, and a crash leaves the old file intact."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    umask = os.umask(0)
    os.umask(umask)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    return atomic_write(path, lambda p: p.write_bytes(data))


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_yaml(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def load_yaml(path: str | Path) -> dict:
    """``yaml.safe_load`` a mapping; a syntax error names the file and line."""
    path = Path(path)
    if not path.is_file():
        raise DepthlabError(f"config file {path} does not exist")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise DepthlabError(f"malformed YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DepthlabError(f"{path} must hold a mapping of key: value, got {type(data).__name__}")
    return data


def parse_value(text: str) -> Any:
    """A ``--set`` value as YAML scalar/list (``0.1``, ``true``, ``[1, 2]``, ``adam``)."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_overrides(items: Iterable[str], valid: Iterable[str] | None = None) -> dict[str, Any]:
    """Parse ``key=value`` strings; with ``valid`` given, unknown keys are refused and listed."""
    valid_keys = sorted(valid) if valid is not None else None
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise DepthlabError(f"--set expects key=value, got {item!r}")
        key, _, value = item.partition("=")
        key = key.strip()
        if valid_keys is not None and key not in valid_keys:
            raise DepthlabError(
                f"unknown key '{key}' in --set; valid keys: {', '.join(valid_keys)}"
            )
        out[key] = parse_value(value)
    return out
