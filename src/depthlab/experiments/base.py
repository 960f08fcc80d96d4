"""The experiment abstraction: a reproduction of one published claim.

An experiment turns a *config* (a frozen dataclass; presets ``smoke``/``quick``/``full`` are
instances of it, ``--set key=value`` replaces fields) into a grid of *cells* (small dicts of
scalars), runs each cell into *records* (flat dicts, one per measured point), and turns the
records into figures and :class:`Claim` rows (paper's claim, paper's figure, our measured figure,
verdict). Cells are independent, so :mod:`depthlab.experiments.runner` runs them in parallel
processes and caches each by the hash of its config.

Add an experiment by subclassing :class:`Experiment` in its own module and registering it with
``@EXPERIMENTS.register()``.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from depthlab.registry import DepthlabError, Registry, unknown_choice

PRESETS = ("smoke", "quick", "full")
VERDICTS = ("reproduced", "partly", "not reproduced")


@dataclass(frozen=True)
class Claim:
    """One row of the claim-vs-measured table."""

    claim: str  # the paper's claim in one sentence
    paper: str  # the paper's own figure, e.g. "97% of variance from paths ≤ 15 (d=10,000)"
    measured: str  # our measured figure, same units
    verdict: str  # one of VERDICTS

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"verdict must be one of {VERDICTS}, got {self.verdict!r}")


def verdict(ok: bool, partly: bool = False) -> str:
    """``reproduced`` when ``ok``, else ``partly`` when ``partly``, else ``not reproduced``."""
    return "reproduced" if ok else ("partly" if partly else "not reproduced")


class Experiment:
    """Base class. Subclasses set the class attributes and implement :meth:`cells`,
    :meth:`run_cell`, :meth:`figures` and :meth:`claims`.

    ``run_cell`` runs in a worker process: it must depend only on its ``cell`` dict (which holds
    everything it needs, including seeds) so that its result can be cached by the cell's hash.
    """

    name: ClassVar[str] = "base"
    title: ClassVar[str] = ""  # one line: what is reproduced
    paper: ClassVar[str] = ""  # citation: authors, year, title, arXiv id, figure/table
    #: the columns every record carries (documented, tested)
    columns: ClassVar[tuple[str, ...]] = ()
    #: bump when run_cell's results change meaning, so cached cells are recomputed
    version: ClassVar[int] = 1
    Config: ClassVar[type]  # a frozen dataclass
    presets: ClassVar[dict[str, Any]] = {}

    # -- configuration ------------------------------------------------------------------
    def config(self, preset: str = "quick", overrides: dict[str, Any] | None = None) -> Any:
        """The preset's config with ``overrides`` applied; unknown preset or key → DepthlabError."""
        if preset not in self.presets:
            raise unknown_choice(f"preset of experiment '{self.name}'", preset, list(self.presets))
        cfg = self.presets[preset]
        return apply_overrides(cfg, overrides or {}, where=f"experiment '{self.name}'")

    def keys(self) -> list[str]:
        return [f.name for f in dataclasses.fields(self.Config)]

    # -- the work -----------------------------------------------------------------------
    def cells(self, cfg: Any) -> list[dict[str, Any]]:
        """The grid: one dict of JSON scalars per independent run."""
        raise NotImplementedError

    def run_cell(self, cell: dict[str, Any]) -> list[dict[str, Any]]:
        """Run one cell; return its records (the runner prefixes the cell's own fields)."""
        raise NotImplementedError

    def figures(self, df: pd.DataFrame, cfg: Any, out_dir: Path) -> list[Path]:
        """Write PNG figures into ``out_dir``; return their paths."""
        return []

    def claims(self, df: pd.DataFrame, cfg: Any) -> list[Claim]:
        """The claim-vs-measured rows computed from the records."""
        return []


EXPERIMENTS: Registry[type[Experiment]] = Registry("experiment")


def list_experiments() -> list[str]:
    """Names of every registered experiment."""
    return EXPERIMENTS.names()


def get_experiment(name: str) -> Experiment:
    return EXPERIMENTS.get(name)()


def _coerce(value: Any, default: Any, key: str, where: str) -> Any:
    """Coerce a ``--set`` value (parsed as YAML) to the type of the field's default."""
    if isinstance(default, tuple):
        items = value if isinstance(value, (list, tuple)) else [value]
        if default:
            items = [_coerce(v, default[0], key, where) for v in items]
        return tuple(items)
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
        raise DepthlabError(f"{key} in {where} must be true or false, got {value!r}")
    if isinstance(default, int) and not isinstance(default, bool):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise DepthlabError(f"{key} in {where} must be an integer, got {value!r}")
    if isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise DepthlabError(f"{key} in {where} must be a number, got {value!r}")
    if isinstance(default, str) and value is not None and not isinstance(value, str):
        return str(value)
    return value


def apply_overrides(cfg: Any, overrides: dict[str, Any], where: str = "the config") -> Any:
    """``dataclasses.replace(cfg, **overrides)`` with unknown keys refused and values coerced to
    the field types (a scalar given for a tuple field becomes a 1-tuple)."""
    valid = [f.name for f in dataclasses.fields(cfg)]
    bad = [k for k in overrides if k not in valid]
    if bad:
        raise DepthlabError(
            f"unknown key(s) {', '.join(bad)} for {where}; valid keys: {', '.join(valid)}"
        )
    fixed = {k: _coerce(v, getattr(cfg, k), k, where) for k, v in overrides.items()}
    return dataclasses.replace(cfg, **fixed)


def config_dict(cfg: Any) -> dict[str, Any]:
    """A config as plain YAML/JSON data (tuples become lists)."""
    out = {}
    for k, v in dataclasses.asdict(cfg).items():
        out[k] = list(v) if isinstance(v, tuple) else v
    return out


# -- small helpers shared by experiments --------------------------------------------------
def fmt(x: float, digits: int = 3) -> str:
    """A number for a table cell (NaN → 'n/a')."""
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "n/a"
    return f"{x:.{digits}g}"


def steps_to_target(steps: list[int], values: list[float], target: float) -> float:
    """The first logged step whose value is ≤ ``target`` (``inf`` if never reached)."""
    for s, v in zip(steps, values, strict=True):
        if v is not None and math.isfinite(v) and v <= target:
            return float(s)
    return math.inf


#: the training settings every training cell carries, passed on by :func:`train`
CELL_TRAIN_KEYS = ("steps", "batch_size", "lr", "seed")


def train(
    model: Any, data: Any, cell: dict[str, Any] | None = None, callbacks: Any = (), **train_config
) -> Any:
    """``depthlab.train(model, data, TrainConfig(...))`` on the CPU, quietly: ``steps``,
    ``batch_size``, ``lr`` and ``seed`` come from ``cell`` where it has them; ``train_config``
    adds to and overrides them."""
    from depthlab.train import TrainConfig
    from depthlab.train import train as dl_train

    config = {k: cell[k] for k in CELL_TRAIN_KEYS if cell and k in cell}
    config["device"] = "cpu"
    config.update(train_config)
    return dl_train(model, data, TrainConfig(**config), callbacks=callbacks, quiet=True)


def per_scheme(cfg: Any, *fields: str) -> list[dict[str, Any]]:
    """One cell per scheme in ``cfg.schemes``, each carrying the named ``cfg`` fields."""
    return [{"scheme": s, **{f: getattr(cfg, f) for f in fields}} for s in cfg.schemes]


def finite(x: Any) -> float:
    """``float(x)``, with None/inf mapped to NaN (for JSON/CSV records)."""
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v if math.isfinite(v) else math.nan
