"""The experiment abstraction: a reproduction of one published claim.

An experiment turns a *config* (a frozen dataclass; presets ``smoke``/``quick``/``deep``/``full``
are instances of it, ``--set key=value`` replaces fields) into a grid of *cells* (small dicts of
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
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import pandas as pd

from depthlab.registry import DepthlabError, Registry, unknown_choice

#: the scales an experiment may offer: ``smoke`` (seconds, for tests), ``quick`` (minutes on a
#: laptop CPU), ``deep`` (the papers' depths on the data that ships, ≈ an hour for all of them on
#: 2 CPU cores; only experiments with a depth claim have it), ``full`` (the papers' setups and
#: data, for a GPU)
PRESETS = ("smoke", "quick", "deep", "full")
VERDICTS = ("reproduced", "partly", "not reproduced")


@dataclass(frozen=True)
class Claim:
    """One row of the claim-vs-measured table."""

    claim: str  # the paper's claim in one sentence
    paper: str  # the paper's own figure, e.g. "97% of variance from paths ≤ 15 (d=10,000)"
    measured: str  # our measured figure, same units (mean ± spread over seeds)
    verdict: str  # one of VERDICTS
    #: our setup: model, depth, width, data, budget, seeds; says where it is smaller than the
    #: paper's
    setup: str = ""
    #: the paper's setup for the same claim (model, depth, data, budget)
    paper_setup: str = ""
    #: the rule the verdict was computed by, and why it was not met (when it was not)
    rule: str = ""

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
    #: allowed values of string (or string-tuple) fields; ``schemes`` defaults to every scheme
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    #: numeric fields that may be 0 (every other size, budget and rate must be > 0)
    zero_ok: ClassVar[tuple[str, ...]] = ()
    #: list fields that may be empty (an optional part of the experiment left out)
    empty_ok: ClassVar[tuple[str, ...]] = ()
    #: the largest value of each kind of size field (see :data:`SIZE_LIMITS`), per experiment
    limits: ClassVar[dict[str, int]] = {}
    #: per preset, the fields a user must set (the papers' data, read from local files: a CIFAR-10
    #: folder ``data_dir``, an enwik8 file ``path``) — ``full`` is the papers' setup on their data
    needs: ClassVar[dict[str, tuple[str, ...]]] = {}

    # -- configuration ------------------------------------------------------------------
    def config(self, preset: str = "quick", overrides: dict[str, Any] | None = None) -> Any:
        """The preset's config with ``overrides`` applied; unknown preset or key → DepthlabError."""
        if preset not in self.presets:
            raise unknown_choice(f"preset of experiment '{self.name}'", preset, list(self.presets))
        cfg = self.presets[preset]
        cfg = apply_overrides(cfg, overrides or {}, where=f"experiment '{self.name}'")
        env = os.environ.get("DEPTHLAB_CIFAR10")  # where the CIFAR-10 loader looks by default
        if "data_dir" in self.needs.get(preset, ()) and not cfg.data_dir and env:
            cfg = dataclasses.replace(cfg, data_dir=env)
        missing = [k for k in self.needs.get(preset, ()) if not getattr(cfg, k)]
        if missing:
            what = {"data_dir": "a CIFAR-10 folder (cifar-10-batches-py)", "path": "an enwik8 file"}
            raise DepthlabError(
                f"preset '{preset}' of experiment '{self.name}' runs on the paper's data: set "
                + ", ".join(f"--set {k}=PATH ({what.get(k, 'a local file')})" for k in missing)
                + "; the data is read from local files, never downloaded (CIFAR-10: or set "
                "$DEPTHLAB_CIFAR10)"
            )
        self.validate(cfg)
        return cfg

    def validate(self, cfg: Any) -> None:
        """Refuse a config whose values cannot run, before anything is written: numbers finite
        and in range (sizes, budgets and rates > 0 unless in :attr:`zero_ok`; seeds < 2³²),
        sizes within :data:`SIZE_LIMITS`, lists non-empty, names among :attr:`choices`, then
        the experiment's own :meth:`check`."""
        from depthlab.resources import check_fits

        check_config(self, cfg)
        self.check(cfg)
        if hasattr(cfg, "device"):
            check_device(cfg.device, f"device in experiment '{self.name}'")
        cells = self.grid(cfg)
        if len(cells) > MAX_CELLS:
            raise DepthlabError(
                f"experiment '{self.name}': the grid has {len(cells):,} cells, more than "
                f"{MAX_CELLS:,}; use fewer values per list"
            )
        from depthlab.train.loop import resolve_device

        device = str(resolve_device(getattr(cfg, "device", "cpu")))
        for cell in cells:
            spec = self.cell_model(cell)
            if spec is not None:
                model, kw, batch, *shape = spec
                try:
                    check_fits(
                        model, kw, batch_size=batch, input_shape=shape[0] if shape else None,
                        device=device,
                    )  # fmt: skip
                except DepthlabError as e:
                    label = ", ".join(f"{k}={v}" for k, v in cell.items() if k != "seed")
                    raise DepthlabError(f"experiment '{self.name}', cell {label}: {e}") from None

    def grid(self, cfg: Any) -> list[dict[str, Any]]:
        """The cells the runner runs: :meth:`cells`, each carrying the config's ``device``
        (where the config has one) so that every training run of the cell uses it."""
        cells = self.cells(cfg)
        device = getattr(cfg, "device", None)
        if device is None:
            return cells
        return [{**c, "device": c.get("device", device)} for c in cells]

    def cell_model(self, cell: dict[str, Any]) -> tuple | None:
        """``(model name, constructor sizes, batch size[, input shape of one example])`` of the
        network a cell trains, for the memory check of :meth:`validate` (None: nothing to check;
        no input shape: 3×32×32 for an image model). The default reads the cell's
        ``depth`` with ``d_model``/``nhead``/``context`` (a Transformer LM), ``width`` and
        ``data_dir`` (a CIFAR ResNet) or ``width`` (an MLP), and its ``batch_size``."""
        if "depth" not in cell:
            return None
        batch = int(cell.get("batch_size", 64))
        if "d_model" in cell:
            keys = ("depth", "d_model", "nhead", "context")
            return "transformer-lm", {k: cell[k] for k in keys if k in cell}, batch
        if "width" not in cell:
            return None
        name = "resnet" if cell.get("data_dir") else "mlp"
        return name, {"depth": cell["depth"], "width": cell["width"]}, batch

    def cell_scheme(self, cell: dict[str, Any]) -> tuple[str, dict[str, Any]] | None:
        """``(registered scheme, scheme options)`` of the network :meth:`cell_model` names, as
        :meth:`run_cell` builds it (what :mod:`depthlab.experiments.timing` times); None where
        the cell does not say. The default reads the cell's ``scheme`` or ``variant`` where
        depthlab registers that name (no options); experiments whose arms are labels
        (``frozen``, ``postnorm+warmup``, a Fixup rule left out) map them here."""
        from depthlab.schemes import list_schemes

        names = list_schemes()
        for key in ("scheme", "variant"):
            if cell.get(key) in names:
                return cell[key], {}
        return None

    def cell_optimizer(self, cell: dict[str, Any]) -> str:
        """The optimizer a cell trains with (``TrainConfig.optimizer``): the cell's
        ``optimizer``, else SGD (the training loop's default)."""
        return str(cell.get("optimizer", "sgd"))

    def check(self, cfg: Any) -> None:
        """Experiment-specific checks (a data folder exists, a depth is valid for the model);
        raise :class:`~depthlab.DepthlabError`. Nothing by default."""

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

#: the most cells one experiment's grid may have
MAX_CELLS = 100_000
#: the largest value of a size field, by what its name contains: depth (layers or blocks),
#: width (units, channels or multiplier), batch (examples), steps. An experiment raises its own
#: in ``limits`` (path-variance's depths are analytic). Far above every paper's setting
#: (10,000 layers) and far below what would exhaust memory before failing.
SIZE_LIMITS = {"depth": 100_000, "width": 65_536, "batch": 1_000_000, "steps": 10**9}
#: fields whose names contain one of these must be > 0 unless listed in ``zero_ok``
POSITIVE = ("depth", "width", "steps", "batch", "lr", "epochs", "d_model", "nhead", "context")
POSITIVE += ("examples", "n_train", "smooth", "target", "short")


def _kind(key: str) -> str | None:
    for kind in SIZE_LIMITS:
        if kind in key:
            return kind
    return None


def check_config(exp: Experiment, cfg: Any) -> None:
    """The generic checks of :meth:`Experiment.validate` (see there)."""
    from depthlab import validate as v
    from depthlab.schemes import SCHEMES

    where = f"experiment '{exp.name}'"
    choices = {"schemes": tuple(SCHEMES.names()), **exp.choices}
    limits = {**SIZE_LIMITS, **exp.limits}
    for f in dataclasses.fields(cfg):
        key, value = f.name, getattr(cfg, f.name)
        items = value if isinstance(value, tuple) else (value,)
        if isinstance(value, tuple) and not value and key not in exp.empty_ok:
            raise DepthlabError(f"{key} in {where} must list at least one value, got []")
        for item in items:
            if isinstance(item, bool):
                continue
            if isinstance(item, (int, float)):
                positive = any(p in key for p in POSITIVE) and key not in exp.zero_ok
                v.number(key, item, 0.0, lo_open=positive, where=where)
                if "seed" in key:
                    v.seed(key, item, where)
                kind = _kind(key)
                if kind is not None and item > limits[kind]:
                    raise DepthlabError(
                        f"{key} in {where} must be ≤ {limits[kind]:,} (the largest {kind} this "
                        f"experiment accepts), got {item:,}"
                    )
            elif key in choices and not (isinstance(item, str) and item in choices[key]):
                raise unknown_choice(f"value of {key} in {where}", item, list(choices[key]))


def list_experiments() -> list[str]:
    """Names of every registered experiment."""
    return EXPERIMENTS.names()


def get_experiment(name: str) -> Experiment:
    return EXPERIMENTS.get(name)()


def _coerce(value: Any, default: Any, key: str, where: str) -> Any:
    """Coerce a ``--set`` value (parsed as YAML) to the type of the field's default."""
    if isinstance(default, tuple):
        if isinstance(value, dict):
            raise DepthlabError(f"{key} in {where} must be a list, got {value!r}")
        items = value if isinstance(value, (list, tuple)) else [value]
        if default:
            items = [_coerce(v, default[0], key, where) for v in items]
        return tuple(items)
    from depthlab import validate as v

    if isinstance(default, bool):
        return v.boolean(key, value, where)
    if isinstance(default, int) and not isinstance(default, bool):
        return v.integer(key, value, where=where)
    if isinstance(default, float):
        return v.number(key, value, where=where)
    if isinstance(default, str):
        if value is None or isinstance(value, (dict, list, tuple)):
            raise DepthlabError(f"{key} in {where} must be a string, got {value!r}")
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


def check_device(device: Any, key: str = "device") -> str:
    """Refuse a device that is not a name or is not on this machine (``cuda`` without a GPU)."""
    from depthlab.train.config import DEVICES
    from depthlab.train.loop import resolve_device

    if not isinstance(device, str) or not (device in DEVICES or device.startswith("cuda:")):
        raise unknown_choice(key, device, [*DEVICES, "cuda:N"])
    try:
        resolve_device(device)
    except DepthlabError as e:
        raise DepthlabError(f"{key}: {e}") from None
    return device


def train(
    model: Any, data: Any, cell: dict[str, Any] | None = None, callbacks: Any = (), **train_config
) -> Any:
    """``depthlab.train(model, data, TrainConfig(...))``, quietly, on the cell's ``device`` (the
    CPU when the cell has none): ``steps``, ``batch_size``, ``lr`` and ``seed`` come from
    ``cell`` where it has them; ``train_config`` adds to and overrides them."""
    from depthlab.train import TrainConfig
    from depthlab.train import train as dl_train

    config = {k: cell[k] for k in CELL_TRAIN_KEYS if cell and k in cell}
    config["device"] = (cell or {}).get("device", "cpu")
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
