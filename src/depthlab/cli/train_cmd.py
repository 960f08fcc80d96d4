"""``depthlab train``: train one model on one data set and write the run folder.

    depthlab train --model resnet --depth 56 --scheme fixup --data digits --steps 500 --out runs/x
    depthlab train --config f.yaml --set lr=0.05 --set model.width=512
    depthlab train --scheme skipinit --set scheme_options.alpha_init=0.1 --out runs/y
    depthlab train --out runs/x --resume            # continue from runs/x/checkpoint.pt
    depthlab train --out runs/x --resume --grow 24 --grow-where even --set steps=2000
                                                    # add 24 identity blocks, keep training

The resolved configuration has four sections, the same in ``--config`` files, in the written
``config.yaml`` and in ``--set section.key=value``: ``model`` (name and constructor options),
``scheme_options`` (options of the scheme), ``data`` (name and data set options) and ``train``
(:class:`~depthlab.TrainConfig` fields, also settable as bare keys: ``--set lr=0.1``).
Precedence: defaults < saved config (``--resume``) < ``--config`` < flags < ``--set``.
Everything is validated before the output folder is touched.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

import torch

from depthlab.cli import add_memory_option, add_set_option
from depthlab.data import DATASETS, create_dataset, dataset_options
from depthlab.io import LOCK_NAME, FolderLock, load_yaml, parse_value, sweep_temp_files, write_yaml
from depthlab.models import MODELS, create_model, model_options
from depthlab.registry import DepthlabError
from depthlab.resources import allocation_error, check_fits
from depthlab.schemes import SCHEMES
from depthlab.train import checkpoint as ckpt
from depthlab.train.config import TrainConfig
from depthlab.train.loop import seed_everything, train
from depthlab.train.optim import make_optimizer
from depthlab.validate import check_out_dir, disk_error

SECTIONS = ("model", "scheme_options", "data", "train")
RUN_FILES = ("config.yaml", "metrics.jsonl", "summary.json", ckpt.FILENAME, "tb")

# flag dest -> (section, key)
FLAG_KEYS = {
    "model": ("model", "name"),
    "depth": ("model", "depth"),
    "width": ("model", "width"),
    "scheme": ("model", "scheme"),
    "data": ("data", "name"),
    "data_dir": ("data", "data_dir"),
    "steps": ("train", "steps"),
    "epochs": ("train", "epochs"),
    "batch_size": ("train", "batch_size"),
    "lr": ("train", "lr"),
    "optimizer": ("train", "optimizer"),
    "schedule": ("train", "schedule"),
    "seed": ("train", "seed"),
    "device": ("train", "device"),
    "eval_every": ("train", "eval_every"),
}


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model on a data set; writes config.yaml, metrics.jsonl, checkpoint, summary",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help="model name (depthlab list models); default mlp")
    p.add_argument("--depth", type=int, help="model depth")
    p.add_argument(
        "--width", type=int, help="model width (mlp/linear: units; resnet: multiplier k)"
    )
    p.add_argument("--scheme", help="residual scheme (depthlab list schemes)")
    p.add_argument(
        "--data",
        help="data set: digits (default), cifar10, synthetic, bytes, or your own .npz/.pt file "
        "(arrays x_train, y_train, x_test, y_test, or x, y split 80/20)",
    )
    p.add_argument("--data-dir", help="data folder (cifar10: holds cifar-10-batches-py)")
    p.add_argument("--steps", type=int)
    p.add_argument("--epochs", type=float)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--optimizer", help="sgd | adam | adamw | adagrad")
    p.add_argument("--schedule", help="constant | step | cosine | linear")
    p.add_argument("--seed", type=int)
    p.add_argument("--device", help="auto | cpu | cuda")
    p.add_argument("--eval-every", type=int)
    p.add_argument("--config", help="YAML file with sections model, scheme_options, data, train")
    add_set_option(
        p,
        "override: train field (lr=0.1), model.width=512, scheme_options.alpha_init=0.1, "
        "data.flat=true",
    )
    p.add_argument("--out", help="run folder (default runs/<model>-<scheme>-<data>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument(
        "--grow",
        type=int,
        metavar="N",
        help="with --resume: insert N new identity blocks (Transformer: layers) into the trained "
        "model before continuing (depthlab.grow; rezero/skipinit/plain/BN/LN/Fixup models)",
    )
    p.add_argument(
        "--grow-where",
        default="end",
        help="where --grow puts the new blocks: end (default), even, or a block index",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar, no summary table")
    add_memory_option(p)
    p.set_defaults(func=run)


def _split_key(key: str) -> tuple[str, str]:
    if "." in key:
        section, _, name = key.partition(".")
        return section, name
    return "train", key


def _valid_keys(cfg: dict[str, dict[str, Any]]) -> list[str]:
    model, data = cfg["model"].get("name", "mlp"), cfg["data"].get("name", "digits")
    scheme_name = cfg["model"].get("scheme")
    keys = [f"model.{k}" for k in ["name", *model_options(model)] if k != "scheme_options"]
    if scheme_name is None:
        scheme_name = _default_scheme(model)
    if isinstance(scheme_name, str) and scheme_name in SCHEMES:
        keys += [f"scheme_options.{f.name}" for f in dataclasses.fields(SCHEMES.get(scheme_name))]
    keys += [f"data.{k}" for k in ["name", *dataset_options(data)]]
    keys += [*TrainConfig.field_names(), *[f"train.{k}" for k in TrainConfig.field_names()]]
    return keys


def _default_scheme(model: str) -> str:
    import inspect

    from depthlab.models import MODELS

    default = inspect.signature(MODELS.get(model).__init__).parameters.get("scheme")
    return default.default if default is not None else "plain"


def _merge(cfg: dict[str, dict[str, Any]], more: dict[str, Any], source: str) -> None:
    for section, values in more.items():
        if section not in SECTIONS:
            raise DepthlabError(
                f"unknown section '{section}' in {source}; valid sections: {', '.join(SECTIONS)}"
            )
        if values is None:
            continue
        if not isinstance(values, dict):
            raise DepthlabError(f"section '{section}' in {source} must be a mapping of key: value")
        cfg[section].update(values)


def resolve(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """The merged configuration (not yet validated against the registries)."""
    cfg: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    if args.resume:
        if not args.out:
            raise DepthlabError("--resume needs --out, the run folder to continue")
        saved = Path(args.out) / "config.yaml"
        if not saved.is_file():
            raise DepthlabError(f"--resume: {saved} does not exist; is {args.out} a run folder?")
        _merge(cfg, load_yaml(saved), str(saved))
    if args.config:
        _merge(cfg, load_yaml(args.config), args.config)
    for dest, (section, key) in FLAG_KEYS.items():
        value = getattr(args, dest, None)
        if value is not None:
            cfg[section][key] = value
    overrides = []
    for item in args.overrides:
        if "=" not in item:
            raise DepthlabError(f"--set expects key=value, got {item!r}")
        key, _, text = item.partition("=")
        overrides.append((key.strip(), parse_value(text, key.strip())))
    for key, value in overrides:  # names first: they decide which other keys are valid
        if key in ("model.name", "model.scheme", "data.name"):
            section, name = _split_key(key)
            cfg[section][name] = value
    cfg["model"].setdefault("name", "mlp")
    cfg["data"].setdefault("name", "digits")
    name = cfg["data"]["name"]
    if isinstance(name, str) and name.endswith((".npz", ".pt")):  # --data my.npz: your own file
        cfg["data"]["name"], cfg["data"]["path"] = "file", name
    valid = _valid_keys(cfg)
    for key, value in overrides:
        if key not in valid:
            shown = [k for k in valid if not k.startswith("train.")]
            raise DepthlabError(
                f"unknown key '{key}' in --set; valid keys: {', '.join(shown)} "
                f"(training fields may also be written train.KEY)"
            )
        section, name = _split_key(key)
        cfg[section][name] = value
    return cfg


def build(cfg: dict[str, dict[str, Any]]):
    """Data set, model and TrainConfig from a resolved configuration (all validation here)."""
    tcfg = TrainConfig.from_dict(dict(cfg["train"]))
    seed_everything(tcfg.seed)  # before anything random is drawn: data, model, dropout
    data_opts = dict(cfg["data"])
    data_name = data_opts.pop("name")
    if not isinstance(data_name, str):
        raise DepthlabError(f"data.name must be a data set name, got {data_name!r}")
    model_kw = dict(cfg["model"])
    model_name = model_kw.pop("name")
    if not isinstance(model_name, str):
        raise DepthlabError(f"model.name must be a model name, got {model_name!r}")
    options = model_options(model_name)
    # sizes against memory before anything is loaded or built
    shape = DATASETS.get(data_name).shape_hint(**data_opts)
    sizes = {k: v for k, v in model_kw.items() if k in options}
    if shape:
        sizes.setdefault("in_dim", math.prod(shape))
        sizes.setdefault("context", shape[0])
        if len(shape) == 3:
            sizes.setdefault("in_channels", shape[0])
    check_fits(
        model_name,
        sizes,
        batch_size=max(tcfg.batch_size, tcfg.eval_batch_size // 4),
        input_shape=shape or None,
        device=str(tcfg.device),
        copies=4 if tcfg.optimizer in ("adam", "adamw") else 3,
    )
    dataset = create_dataset(data_name, **data_opts)
    hints = dataset.model_hints()
    if "in_dim" in options or "in_channels" in options:
        hints.pop("width", None)  # "width" is a hint only for square models without input size
    for key, value in hints.items():
        if key in options and key not in model_kw:
            model_kw[key] = value
    if cfg["scheme_options"]:
        model_kw["scheme_options"] = dict(cfg["scheme_options"])
    model = create_model(model_name, **model_kw)
    x, _ = next(iter(dataset.test_batches(2)))
    try:
        with torch.no_grad():
            was = model.training
            model.eval()
            model(x[:2])
            model.train(was)
    except (RuntimeError, ValueError, IndexError) as e:
        first = str(e).splitlines()[0][:200]
        raise DepthlabError(
            f"model '{model_name}' does not accept inputs of data set '{data_name}' "
            f"(shape {tuple(x.shape[1:])}): {first}; check the model options"
        ) from None
    return dataset, model_name, model, tcfg


def resolved_config(cfg, model_name, model, dataset, tcfg) -> dict[str, Any]:
    data = dict(cfg["data"])
    return {
        "model": {"name": model_name, "scheme": model.scheme.name, **model.config},
        "scheme_options": dict(model.scheme.options),
        "data": data,
        "train": tcfg.to_dict(),
    }


class Terminated(KeyboardInterrupt):
    """SIGTERM, handled like Ctrl-C: the run folder and its checkpoint are kept."""


class _Signals:
    """SIGINT and SIGTERM during training: the first one asks the loop to stop at the next step
    boundary (so it never lands inside a checkpoint write or the TensorBoard writer's shutdown);
    a second one stops at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        if _main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.getsignal(sig)
                signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: Any) -> None:
        if self.received is not None:
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
        self.received = signum

    def stop(self) -> BaseException | None:
        if self.received is None:
            return None
        return Terminated() if self.received == signal.SIGTERM else KeyboardInterrupt()


def _default_out(cfg: dict[str, dict[str, Any]]) -> str:
    model = cfg["model"].get("name", "mlp")
    scheme = cfg["model"].get("scheme") or (
        _default_scheme(model) if isinstance(model, str) and model in MODELS else "default"
    )
    return f"runs/{model}-{scheme}-{cfg['data'].get('name', 'digits')}"


def _grow_args(args: argparse.Namespace) -> tuple[int, str | int] | None:
    """``(n, where)`` from ``--grow``/``--grow-where``, checked before anything is touched."""
    n = getattr(args, "grow", None)
    if n is None:
        return None
    if not args.resume:
        raise DepthlabError("--grow continues a trained run: pass --resume --out RUN")
    if n < 1:
        raise DepthlabError(f"--grow must be a positive number of blocks, got {n}")
    where: str | int = args.grow_where
    if isinstance(where, str) and where.lstrip("-").isdigit():
        where = int(where)
    if where not in ("end", "even") and not (isinstance(where, int) and where >= 0):
        raise DepthlabError(f"--grow-where must be end, even or a block index ≥ 0, got {where!r}")
    return n, where


def run(args: argparse.Namespace) -> int:
    growth = _grow_args(args)
    cfg = resolve(args)
    out = check_out_dir(args.out if args.out is not None else _default_out(cfg))
    dataset, model_name, model, tcfg = build(cfg)
    is_main = int(os.environ.get("RANK", "0")) == 0  # under torchrun only rank 0 writes
    path = out / ckpt.FILENAME
    resume = _check_resume(out, bool(args.resume), growth, model, tcfg, is_main)
    if growth is not None:  # refuse a model that cannot grow before anything is written
        from depthlab.models.grow import check as check_growth

        check_growth(model, *growth)
    if not is_main:
        train(model, dataset, tcfg, out_dir=out, quiet=True, resume=resume, grow=growth)
        return 0
    created = not out.exists()
    resolved = resolved_config(cfg, model_name, model, dataset, tcfg)
    if growth is not None:
        resolved["model"]["grow"] = [*model.config.get("grow", []), [growth[0], growth[1]]]
    how = f"depthlab train --out {shlex.quote(str(out))} --resume"
    lock = FolderLock(out, "train").acquire()
    had_checkpoint = path.is_file()
    signals = _Signals().__enter__()
    try:
        sweep_temp_files(out)
        write_yaml(out / "config.yaml", resolved)
        hist = train(
            model, dataset, tcfg, out_dir=out, quiet=args.quiet, resume=resume,
            should_stop=signals.stop, grow=growth,
        )  # fmt: skip
    except KeyboardInterrupt as e:
        step = _checkpoint_step(path)
        kept = f"the checkpoint of step {step} is kept" if step is not None else "no checkpoint yet"
        what = "terminated" if isinstance(e, Terminated) else "interrupted"
        print(f"{what}: {kept}; continue with: {how}", file=sys.stderr)
        return 143 if isinstance(e, Terminated) else 130
    except (RuntimeError, MemoryError) as e:
        err = allocation_error(e, "training", None)
        if err is None:
            if not had_checkpoint and not path.is_file():
                _cleanup(out, created)
            raise
        step = _checkpoint_step(path)
        kept = f"the checkpoint of step {step} is kept" if step is not None else "no checkpoint yet"
        raise DepthlabError(f"{err}; {kept}") from None
    except OSError as e:
        step = _checkpoint_step(path)
        kept = f"the checkpoint of step {step} is kept" if step is not None else "no checkpoint yet"
        raise disk_error(e, f"the run folder {out}", f"{kept}; free space and run: {how}") from None
    except BaseException:
        if not had_checkpoint and not path.is_file():
            _cleanup(out, created)  # nothing worth keeping: leave no partial output
        raise
    finally:
        signals.__exit__()
        lock.release()
    if not args.quiet:
        print(summary_table(hist.summary, out))
    return 0


def _check_resume(out: Path, resume: bool, growth, model, tcfg, is_main: bool) -> bool:
    """Whether the run resumes: a checkpoint in ``out`` is checked against the model and its
    optimizer before anything runs; ``--resume`` without one starts again from step 0 (refused
    with ``--grow``: nothing to grow); a finished or started run without ``--resume`` is
    refused."""
    path = out / ckpt.FILENAME
    if resume and path.is_file():
        payload = ckpt.load_checkpoint(path)
        ckpt.validate(payload, model, path)
        ckpt.validate_optimizer(payload["optimizer"], make_optimizer(model, tcfg), path)
        return True
    if resume and growth is not None:
        raise DepthlabError(
            f"--grow: {out} has no checkpoint yet, so there is no trained model to grow"
        )
    if resume:  # killed before its first checkpoint: start it again from step 0
        print(
            f"{out} has no checkpoint yet (the run stopped before its first one); starting it "
            f"again from step 0",
            file=sys.stderr,
        )
        return False
    if is_main and out.exists() and any((out / f).exists() for f in RUN_FILES):
        how = "continue it" if path.is_file() else "start it again (it has no checkpoint yet)"
        raise DepthlabError(
            f"{out} already holds a run; pass --resume to {how}, or choose another --out"
        )
    return False


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _checkpoint_step(path: Path) -> int | None:
    """The step of the checkpoint at ``path`` (None if there is none or it is unreadable)."""
    if not path.is_file():
        return None
    try:
        return int(ckpt.load_checkpoint(path)["metadata"]["step"])
    except (DepthlabError, KeyError, TypeError, ValueError):
        return None


def _cleanup(out: Path, created: bool) -> None:
    """Remove what this command wrote (the whole folder if it created it)."""
    if created:
        shutil.rmtree(out, ignore_errors=True)
        return
    for name in (*RUN_FILES, LOCK_NAME):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def summary_table(summary: dict[str, Any], out: Path) -> str:
    """The run summary as a two-column text table."""
    rows = [("run", str(out))]
    keys = ("final_train_loss", "test_loss", "test_accuracy", "test_bpb", "steps", "epochs")
    for key in keys:
        if summary.get(key) is not None:
            v = summary[key]
            rows.append((key, f"{v:.4g}" if isinstance(v, float) else str(v)))
    div = summary.get("diverged")
    rows.append(("diverged", f"yes, at step {summary.get('diverged_step')}" if div else "no"))
    for key, fmt in (
        ("wall_time_s", "{:.1f}"),
        ("steps_per_s", "{:.2f}"),
        ("examples_per_s", "{:.0f}"),
    ):
        if summary.get(key) is not None:
            rows.append((key, fmt.format(summary[key])))
    width = max(len(k) for k, _ in rows)
    line = "-" * (width + 2 + max(len(v) for _, v in rows))
    return "\n".join([line, *(f"{k:<{width}}  {v}" for k, v in rows), line])
