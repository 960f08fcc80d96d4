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
from depthlab.validate import check_expansion


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


def write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def write_yaml(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_text(path: Path, what: str, fix: str) -> str:
    """A UTF-8 text file; a binary, undecodable or unreadable one is a :class:`DepthlabError`
    saying it is not ``what`` and ending with ``fix``."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise DepthlabError(f"{path} is not a UTF-8 text file, not {what}; {fix}") from None
    except OSError as e:
        raise DepthlabError(f"cannot read {path} ({e.strerror or e}); {fix}") from None
    if "\x00" in text:
        raise DepthlabError(f"{path} is a binary file, not {what}; {fix}")
    return text


#: the largest config file read (a config is a few lines; anything bigger is not one)
MAX_CONFIG_BYTES = 1 << 20


def load_yaml(path: str | Path) -> dict:
    """``yaml.safe_load`` a mapping; a syntax error names the file and line. Binary files,
    huge files and alias bombs are refused with a :class:`DepthlabError`."""
    path = Path(path)
    if not path.is_file():
        raise DepthlabError(f"config file {path} does not exist (or is not a file)")
    try:
        too_big = path.stat().st_size > MAX_CONFIG_BYTES
    except OSError as e:
        raise DepthlabError(f"cannot read {path}: {e.strerror or e}") from None
    if too_big:
        raise DepthlabError(
            f"{path} is larger than {MAX_CONFIG_BYTES >> 20} MiB; a config file is a short "
            f"YAML mapping"
        )
    text = read_text(path, "a YAML config", "pass a YAML config")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise DepthlabError(f"malformed YAML in {path}{where}: {problem}") from None
    except RecursionError:
        raise DepthlabError(f"{path} nests too deeply to be a config") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise DepthlabError(f"{path} must hold a mapping of key: value, got {type(data).__name__}")
    check_expansion(data, str(path))
    return data


def parse_value(text: str, key: str | None = None) -> Any:
    """A ``--set`` value as YAML scalar/list (``0.1``, ``true``, ``[1, 2]``, ``adam``); a value
    that is not valid YAML (``[0.5,``) is refused, saying how to quote a plain string."""
    try:
        value = yaml.safe_load(text)
    except (yaml.YAMLError, RecursionError) as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        name = f" for {key}" if key else ""
        raise DepthlabError(
            f"--set value{name} {text!r} is not valid YAML ({problem}); write a number, "
            f"true/false, a list like [1, 2], or quote a string: --set '{key or 'key'}=\"...\"'"
        ) from None
    return check_expansion(value, f"--set value {text[:40]!r}")


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
        out[key] = parse_value(value, key)
    return out


LOCK_NAME = ".depthlab.lock"


class FolderLock:
    """An exclusive lock on an output folder (``DIR/.depthlab.lock``, ``flock``): a second
    ``depthlab`` command writing into the same folder is refused instead of mixing its files
    with the first one's. The operating system releases the lock when the process dies, so a
    killed run never leaves the folder locked."""

    def __init__(self, folder: str | Path, what: str = "run") -> None:
        self.folder, self.what = Path(folder), what
        self._fd: int | None = None

    def acquire(self) -> FolderLock:
        import fcntl

        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / LOCK_NAME
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                raise DepthlabError(
                    f"{self.folder} is in use by another depthlab {self.what} (it holds "
                    f"{LOCK_NAME}); wait for it to finish or choose another --out"
                ) from None
            try:  # the holder before us may have removed the file as we opened it: retry
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            import fcntl

            try:  # a finished folder holds only its results
                (self.folder / LOCK_NAME).unlink()
            except OSError:
                pass
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> FolderLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def sweep_temp_files(folder: str | Path) -> int:
    """Remove the temporary files of interrupted :func:`atomic_write` calls (``.NAME.*.tmp``)
    in ``folder``; call it while holding the folder's :class:`FolderLock`. Returns the count."""
    n = 0
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    for p in folder.glob(".*.tmp"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n
