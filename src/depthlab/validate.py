"""Validation at the boundary: every user-facing value is checked here, once.

CLI flags, ``--set`` overrides, config files and the Python constructors (``TrainConfig``,
experiment configs, ``create_model``, ``create_dataset``, ``get_scheme``) all go through these
helpers, so a bad value gets the same one-line :class:`~depthlab.DepthlabError` (a
``ValueError``; exit code 2 from the CLI) that says what was wrong and what to use instead.

* numbers: :func:`number` (finite unless asked otherwise, with a range), :func:`integer`,
  :func:`boolean`, :func:`choice`;
* constructor keyword arguments against their signature's annotations: :func:`check_kwargs`;
* output folders before any work starts: :func:`check_out_dir`;
* parsed YAML whose aliases would expand without bound: :func:`check_expansion`.
"""

from __future__ import annotations

import errno
import inspect
import math
import os
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from depthlab.registry import DepthlabError

#: the largest seed numpy's legacy generator accepts (``np.random.seed``)
MAX_SEED = 2**32 - 1
#: the most nodes a loaded YAML document may expand to (aliases counted every time they are used)
MAX_YAML_NODES = 1_000_000
#: longest file name component most filesystems accept
NAME_MAX = 255


def _where(key: str, where: str | None) -> str:
    return f"{key} in {where}" if where else key


def is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def number(
    key: str,
    v: Any,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    where: str | None = None,
    allow_none: bool = False,
) -> float | None:
    """``v`` as a finite ``float`` in the range ``[lo, hi]`` (open ends with ``lo_open``/
    ``hi_open``). A string that reads as a number (YAML 1.1 reads ``1e-3`` as a string) is
    accepted; NaN, ±inf, booleans and other types are refused."""
    if v is None and allow_none:
        return None
    name = _where(key, where)
    if isinstance(v, str):
        try:
            v = float(v)
        except ValueError:
            raise DepthlabError(f"{name} must be a number, got {v!r}") from None
    if not is_number(v):
        extra = " or null" if allow_none else ""
        raise DepthlabError(f"{name} must be a number{extra}, got {v!r}")
    v = float(v)
    if not math.isfinite(v):
        raise DepthlabError(f"{name} must be a finite number, got {v!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise DepthlabError(f"{name} must be {'>' if lo_open else '≥'} {lo:g}, got {v:g}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise DepthlabError(f"{name} must be {'<' if hi_open else '≤'} {hi:g}, got {v:g}")
    return v


def integer(
    key: str,
    v: Any,
    lo: int | None = None,
    hi: int | None = None,
    *,
    where: str | None = None,
    allow_none: bool = False,
) -> int | None:
    """``v`` as an ``int`` in ``[lo, hi]``; a float with an integral value (``1e3``) is accepted,
    booleans, NaN and fractions are not."""
    if v is None and allow_none:
        return None
    name = _where(key, where)
    if isinstance(v, str):  # YAML 1.1 reads 1e9 (no dot) as a string
        try:
            v = float(v) if not v.strip().lstrip("+-").isdigit() else int(v)
        except ValueError:
            raise DepthlabError(f"{name} must be an integer, got {v!r}") from None
    if isinstance(v, float) and math.isfinite(v) and v.is_integer():
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool):
        raise DepthlabError(f"{name} must be an integer, got {v!r}")
    if lo is not None and v < lo:
        raise DepthlabError(f"{name} must be an integer ≥ {lo}, got {v}")
    if hi is not None and v > hi:
        raise DepthlabError(f"{name} must be an integer ≤ {hi}, got {v}")
    return v


def boolean(key: str, v: Any, where: str | None = None) -> bool:
    """``v`` as a ``bool``: only ``true``/``false`` (YAML) or Python booleans."""
    if isinstance(v, bool):
        return v
    raise DepthlabError(f"{_where(key, where)} must be true or false, got {v!r}")


def choice(key: str, v: Any, choices: Iterable[str], where: str | None = None) -> str:
    from depthlab.registry import unknown_choice

    choices = list(choices)
    if not isinstance(v, str) or v not in choices:
        raise unknown_choice(_where(key, where), v, choices)
    return v


def seed(key: str, v: Any, where: str | None = None) -> int:
    return integer(key, v, 0, MAX_SEED, where=where)


# -- keyword arguments against a signature -------------------------------------------------
def _kinds(annotation: Any, default: Any) -> set[str] | None:
    """The accepted kinds of a parameter (``int``, ``float``, ``bool``, ``str``, ``None``, ...)
    from its annotation (a string under ``from __future__ import annotations``) or default."""
    if annotation is inspect.Parameter.empty or annotation is None:
        if default is inspect.Parameter.empty or default is None:
            return None
        annotation = type(default).__name__
    text = annotation if isinstance(annotation, str) else getattr(annotation, "__name__", "")
    kinds = {part.strip() for part in str(text).split("|")}
    known = {"int", "float", "bool", "str", "None", "dict", "list", "tuple"}
    if not kinds or not kinds <= known:
        return None  # something richer (a Scheme, a Callable): the constructor checks it
    return kinds


def check_value(key: str, v: Any, kinds: set[str], where: str | None = None) -> Any:
    """``v`` checked against ``kinds``; numbers must be finite."""
    name = _where(key, where)
    if v is None:
        if "None" in kinds:
            return None
        raise DepthlabError(f"{name} must not be null")
    if "bool" in kinds and isinstance(v, bool):
        return v
    if isinstance(v, bool):
        if "str" in kinds:
            return v  # e.g. a string option given as YAML true: the constructor decides
        raise DepthlabError(f"{name} must be {_describe(kinds)}, got {v!r}")
    if "int" in kinds and isinstance(v, int):
        return v
    if "float" in kinds and (is_number(v) or isinstance(v, str)):
        if isinstance(v, str) and "str" in kinds:
            return v
        return number(key, v, where=where)
    if "int" in kinds and isinstance(v, (float, str)) and "float" not in kinds:
        if isinstance(v, str) and "str" in kinds:
            return v
        return integer(key, v, where=where)
    if "str" in kinds and isinstance(v, str):
        return v
    for k, t in (("dict", dict), ("list", list), ("tuple", (list, tuple))):
        if k in kinds and isinstance(v, t):
            return v
    raise DepthlabError(f"{name} must be {_describe(kinds)}, got {v!r}")


def _describe(kinds: set[str]) -> str:
    words = {
        "int": "an integer",
        "float": "a number",
        "bool": "true or false",
        "str": "a string",
        "None": "null",
        "dict": "a mapping",
        "list": "a list",
        "tuple": "a list",
    }
    return " or ".join(words[k] for k in sorted(kinds))


def check_kwargs(fn: Callable, kwargs: dict[str, Any], where: str) -> dict[str, Any]:
    """Check ``kwargs`` against the annotations of ``fn``'s parameters: the right kind of value,
    finite numbers. Unknown names are left to the caller (which lists the valid ones)."""
    params = inspect.signature(fn).parameters
    out = dict(kwargs)
    for k, v in kwargs.items():
        p = params.get(k)
        if p is None:
            continue
        kinds = _kinds(p.annotation, p.default)
        if kinds is not None:
            out[k] = check_value(k, v, kinds, where)
    return out


# -- YAML ----------------------------------------------------------------------------------
def check_expansion(data: Any, source: str, limit: int = MAX_YAML_NODES) -> Any:
    """Refuse parsed YAML that would expand to more than ``limit`` nodes (an alias bomb: every
    alias is a reference, so loading is cheap but copying or serialising is not)."""
    memo: dict[int, int] = {}

    def size(node: Any, depth: int = 0) -> int:
        if depth > 200:
            raise DepthlabError(f"{source} nests deeper than 200 levels; flatten it")
        key = id(node)
        if key in memo:
            return memo[key]
        if isinstance(node, dict):
            n = 1 + sum(size(k, depth + 1) + size(v, depth + 1) for k, v in node.items())
        elif isinstance(node, (list, tuple)):
            n = 1 + sum(size(v, depth + 1) for v in node)
        else:
            n = 1
        memo[key] = n
        if n > limit:
            raise DepthlabError(
                f"{source} expands to more than {limit:,} values (YAML aliases reused many "
                f"times?); write the values out instead of through aliases"
            )
        return n

    size(data)
    return data


# -- output folders ------------------------------------------------------------------------
def check_out_dir(out: str | os.PathLike, flag: str = "--out") -> Path:
    """Refuse an output folder that cannot be created or written, before any work starts:
    an empty path, the filesystem root, a path through a file or device, a read-only or virtual
    filesystem (``/proc``, ``/sys``, ``/dev``), or a name longer than the filesystem allows."""
    text = os.fspath(out)
    if not isinstance(text, str) or not text.strip():
        raise DepthlabError(f"{flag} must name a folder, got {text!r}; e.g. {flag} runs/x")
    if "\x00" in text:
        raise DepthlabError(f"{flag} {text!r} contains a NUL byte; choose another path")
    path = Path(text).expanduser()
    resolved = Path(os.path.abspath(path))
    if resolved == Path(resolved.anchor):
        raise DepthlabError(f"{flag} {text} is the filesystem root; choose a folder, e.g. runs/x")
    for part in resolved.parts:
        if len(os.fsencode(part)) > NAME_MAX:
            raise DepthlabError(
                f"{flag}: the name {part[:40]}... is {len(os.fsencode(part))} bytes long, more "
                f"than the {NAME_MAX} a file name may have; choose a shorter name"
            )
    real = Path(os.path.realpath(resolved))
    if real.parts[:2] in (("/", "proc"), ("/", "sys"), ("/", "dev")):
        raise DepthlabError(
            f"{flag} {text} is on the virtual filesystem {'/'.join(real.parts[:2])[1:]}; "
            f"choose a folder on a disk"
        )
    probe = resolved
    while not probe.exists() and not probe.is_symlink():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        what = "a file" if probe.is_file() else "not a folder"
        raise DepthlabError(f"{flag} {text}: {probe} is {what}; choose a folder")
    try:
        read_only = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        raise DepthlabError(
            f"{flag} {text}: {probe} is on a read-only filesystem; choose a folder you can write"
        )
    if not os.access(probe, os.W_OK | os.X_OK):
        raise DepthlabError(
            f"{flag} {text}: {probe} is not writable; choose a folder you can write"
        )
    try:  # access() says yes for root on a read-only mount: try a real write
        fd, tmp = tempfile.mkstemp(dir=probe, prefix=".depthlab-probe.")
        os.close(fd)
        os.unlink(tmp)
    except OSError as e:
        why = "read-only filesystem" if e.errno == errno.EROFS else (e.strerror or str(e))
        raise DepthlabError(
            f"{flag} {text}: cannot write in {probe} ({why}); choose another folder"
        ) from None
    return path


def disk_error(e: OSError, what: str, fix: str) -> DepthlabError:
    """A one-line error for a failed write (``ENOSPC``, ``EROFS``, ``EDQUOT`` ...)."""
    reason = {
        errno.ENOSPC: "no space left on the device",
        errno.EROFS: "read-only filesystem",
        errno.EDQUOT: "disk quota exceeded",
        errno.EACCES: "permission denied",
    }.get(e.errno or -1, e.strerror or str(e))
    return DepthlabError(f"could not write {what} ({reason}); {fix}")
