"""``depthlab diagnose``: run the diagnostics on one model at initialisation.

    depthlab diagnose --model mlp --depth 1000 --scheme batchnorm \\
        --what paths,signal,jacobian,gradients,degeneracy --out DIR [--data digits] [--batch 64] \\
        [--set model.width=128] [--set scheme_options.alpha_init=0.1] [--set data.flat=true]

Prints a compact table per diagnostic and, with ``--out``, writes ``DIR/<what>.csv``, figures
(``signal.png``, ``jacobian_hist.png``, ``paths_cdf.png``, ``gradients.png``) and
``summary.json``. Everything is validated before the output folder is created.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from depthlab import validate as v
from depthlab.cli import add_memory_option, add_set_option
from depthlab.diagnostics import (
    degeneracy,
    gradient_norms,
    jacobian_spectrum,
    path_summary,
    path_variance,
    signal_propagation,
    spectrum_summary,
)
from depthlab.diagnostics.gradients import block_gradient_summary
from depthlab.diagnostics.jacobian import calibrate_batchnorm
from depthlab.io import atomic_write_text, parse_overrides, write_json
from depthlab.models import MODELS, create_model, model_options
from depthlab.registry import DepthlabError
from depthlab.resources import check_fits
from depthlab.schemes import SCHEMES
from depthlab.validate import check_out_dir

WHAT = ("paths", "signal", "jacobian", "gradients", "degeneracy")
MAX_BATCH = 1_000_000
SECTIONS = ("model", "scheme_options", "data")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "diagnose",
        help="diagnose a model at init: path variance, signal propagation, Jacobian spectrum, "
        "gradient norms, degeneracy",
        description="Run diagnostics on one freshly built model; print tables, write CSVs and "
        "figures to --out.",
    )
    p.add_argument("--model", default="mlp", help="model name (depthlab list models)")
    p.add_argument("--depth", type=int, help="model depth")
    p.add_argument("--scheme", help="residual scheme (default: the model's)")
    p.add_argument(
        "--what",
        default="paths,signal,jacobian,gradients",
        help=f"comma-separated diagnostics from: {','.join(WHAT)}",
    )
    p.add_argument("--out", help="output folder for CSVs and figures")
    p.add_argument("--data", help="data set for the input batch (default: random inputs)")
    p.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--k", type=int, default=None, help="Jacobian: top/bottom k (matrix-free)")
    p.add_argument(
        "--method", default="auto", help="Jacobian method: auto, dense, lanczos, hutchinson"
    )
    p.add_argument("--examples", type=int, default=2, help="Jacobian: examples analysed")
    p.add_argument(
        "--which",
        default="both",
        choices=("both", "top", "bottom"),
        help="Jacobian (matrix-free): which end of the spectrum (default both)",
    )
    p.add_argument(
        "--rtol",
        type=float,
        default=None,
        help="Jacobian (matrix-free): also stop when the wanted singular values move by less "
        "than this (relative) between checks; e.g. 1e-3 for a clustered bottom end",
    )
    p.add_argument(
        "--max-dim",
        type=int,
        default=None,
        help="Jacobian (matrix-free): Krylov basis limit (default max(600, 20·k))",
    )
    add_set_option(p, "model.KEY, scheme_options.KEY or data.KEY, e.g. --set model.width=128")
    add_memory_option(p)
    p.set_defaults(func=run)


def parse_what(text: str) -> list[str]:
    items = [w.strip() for w in text.split(",") if w.strip()]
    bad = [w for w in items if w not in WHAT]
    if bad or not items:
        raise DepthlabError(
            f"unknown --what item(s) {bad or [text]}; valid items: {', '.join(WHAT)}"
        )
    return list(dict.fromkeys(items))


def _sections(overrides: list[str]) -> dict[str, dict[str, Any]]:
    cfg: dict[str, dict[str, Any]] = {s: {} for s in SECTIONS}
    for key, value in parse_overrides(overrides).items():
        section, _, name = key.partition(".")
        if section not in SECTIONS or not name:
            raise DepthlabError(
                f"--set key '{key}' must be SECTION.KEY with SECTION one of: {', '.join(SECTIONS)}"
            )
        cfg[section][name] = value
    return cfg


def _random_input(model_name: str, kw: dict[str, Any], batch: int, gen: torch.Generator):
    """Random inputs of the model's input shape and random class labels."""
    num_classes = int(kw.get("num_classes", 10))
    if model_name in ("mlp",):
        shape: tuple[int, ...] = (int(kw.get("in_dim", 64)),)
    elif model_name == "linear":
        shape = (int(kw.get("width", 64)),)
    elif "in_channels" in model_options(model_name):
        size = 64 if kw.get("stem", "imagenet") == "imagenet" and "bottleneck" in model_name else 32
        shape = (int(kw.get("in_channels", 3)), size, size)
    else:
        raise DepthlabError(f"no random input is known for model '{model_name}'; pass --data NAME")
    x = torch.randn((batch, *shape), generator=gen)
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    if model_name == "linear":
        y = torch.randn((batch, *shape), generator=gen)  # regression targets
    return x, y


def build(args: argparse.Namespace):
    """Validate everything and build (model, x, y, model_kw)."""
    what = parse_what(args.what)
    MODELS.get(args.model)
    if args.scheme is not None:
        SCHEMES.get(args.scheme)
    v.integer("--batch", args.batch, 2, MAX_BATCH)
    v.seed("--seed", args.seed)
    v.integer("--examples", args.examples, 1, 10_000)
    v.integer("--k", args.k, 1, None, allow_none=True)
    v.integer("--max-dim", args.max_dim, 1, None, allow_none=True)
    v.number("--rtol", args.rtol, 0.0, lo_open=True, allow_none=True)
    if args.method not in ("auto", "dense", "lanczos", "hutchinson"):
        raise DepthlabError(
            f"unknown --method '{args.method}'; choose one of: auto, dense, lanczos, hutchinson"
        )
    if args.out is not None:
        check_out_dir(args.out)
    cfg = _sections(args.overrides)
    kw = dict(cfg["model"])
    if args.depth is not None:
        kw["depth"] = args.depth
    if args.scheme is not None:
        kw["scheme"] = args.scheme
    if cfg["scheme_options"]:
        kw["scheme_options"] = dict(cfg["scheme_options"])
    gen = torch.Generator().manual_seed(args.seed)
    dataset = None
    if args.data is not None or cfg["data"]:
        from depthlab.data import create_dataset

        dataset = create_dataset(args.data or "digits", **cfg["data"])
        options = model_options(args.model)
        for key, value in dataset.model_hints().items():
            if key in options and key not in kw and not (key == "width" and "in_dim" in options):
                kw[key] = value
    check_fits(
        args.model,
        {k: val for k, val in kw.items() if k in model_options(args.model)},
        batch_size=args.batch,
        input_shape=tuple(dataset.input_shape) if dataset is not None else None,
        copies=2,
    )
    torch.manual_seed(args.seed)
    model = create_model(args.model, **kw)
    if dataset is not None:
        x, y = dataset.train_batch(0, args.batch, args.seed)
    else:
        x, y = _random_input(args.model, kw, args.batch, gen)
    try:
        with torch.no_grad():
            model(x[:2])
    except (RuntimeError, ValueError, IndexError) as e:
        raise DepthlabError(
            f"model '{args.model}' does not accept inputs of shape {tuple(x.shape[1:])}: "
            f"{str(e).splitlines()[0][:200]}"
        ) from None
    return what, model, x, y, kw


def _blocks_input(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The input of ``model.blocks`` on the batch ``x`` (captured with a pre-hook)."""
    blocks = getattr(model, "blocks", None)
    if blocks is None:
        return None
    seen: list[torch.Tensor] = []
    h = blocks.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
    try:
        with torch.no_grad():
            model(x)
    finally:
        h.remove()
    return seen[0] if seen else None


def _paths_scheme(model: torch.nn.Module) -> tuple[Any, None] | None:
    """The model's scheme for the analytic path model (its own options decide the law, e.g.
    its α), or None when the scheme has none."""
    scheme = model.scheme
    return None if scheme.path_law() is None else (scheme, None)


def run(args: argparse.Namespace) -> int:
    what, model, x, y, kw = build(args)
    depth = len(getattr(model, "blocks", [])) or int(kw.get("depth", 1))
    frames: dict[str, pd.DataFrame] = {}
    summary: dict[str, Any] = {"model": args.model, "options": {k: str(v) for k, v in kw.items()}}
    if "paths" in what:
        ps = _paths_scheme(model)
        if ps is None:
            print(f"paths: no path-variance model for scheme '{model.scheme.name}' (skipped)")
        else:
            df = path_variance(depth, ps[0], ps[1])
            frames["paths"] = df
            summary["paths"] = s = path_summary(df)
            print(f"paths ({ps[0].name}, {depth} blocks): " + _fmt(s))
    if "signal" in what:
        df = signal_propagation(model, x)
        frames["signal"] = df
        print("signal propagation (selected blocks):")
        print(_select(df).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if "jacobian" in what:
        df = _jacobian(model, x, args)
        frames["jacobian"] = df
        if (df["kind"] != "rms").any():
            summary["jacobian"] = s = spectrum_summary(df)
            print(
                f"jacobian ({df['method'].iloc[0]}, {df['example'].nunique()} examples): " + _fmt(s)
            )
        else:
            print(f"jacobian RMS singular values: {df['singular_value'].round(4).tolist()}")
    if "gradients" in what:
        df = gradient_norms(model, x, y)
        frames["gradients"] = df
        per_block = block_gradient_summary(df)
        summary["gradients"] = {"loss": df.attrs["loss"]}
        print(f"gradient norms (loss {df.attrs['loss']:.4g}), selected blocks:")
        if len(per_block):
            print(_select(per_block).to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    if "degeneracy" in what:
        df = degeneracy(model, x)
        frames["degeneracy"] = df
        table = df.groupby("quantity")["value"].agg(["min", "median", "max"])
        print("degeneracy (over layers):")
        print(table.to_string(float_format=lambda v: f"{v:.4g}"))
    if args.out:
        _write(Path(args.out), frames, summary, args)
    return 0


def _jacobian(model, x, args) -> pd.DataFrame:
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        calibrate_batchnorm(model, [x])  # eval-mode Jacobian with running stats of this batch
    target, inp = model, x
    h = _blocks_input(model, x)
    if h is not None:
        target, inp = model.blocks, h  # the residual stack, without stem and classifier
    return jacobian_spectrum(
        target,
        inp,
        method=args.method,
        k=args.k,
        num_examples=args.examples,
        seed=args.seed,
        which=args.which,
        rtol=args.rtol,
        max_dim=args.max_dim,
    )


def _select(df: pd.DataFrame, rows: int = 8) -> pd.DataFrame:
    if len(df) <= rows:
        return df
    idx = sorted(set(int(round(i)) for i in _linspace(0, len(df) - 1, rows)))
    return df.iloc[idx]


def _linspace(a: float, b: float, n: int) -> list[float]:
    return [a + (b - a) * i / (n - 1) for i in range(n)]


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(
        f"{k}={v:.4g}" if isinstance(v, float) and math.isfinite(v) else f"{k}={v}"
        for k, v in d.items()
    )


def _write(out: Path, frames: dict[str, pd.DataFrame], summary: dict, args) -> None:
    from depthlab.report import plots

    out.mkdir(parents=True, exist_ok=True)
    for name, df in frames.items():
        atomic_write_text(out / f"{name}.csv", df.to_csv(index=False))
    title = f"{args.model} depth={args.depth} scheme={args.scheme or 'default'}"
    if "signal" in frames:
        plots.plot_signal_propagation(frames["signal"], out / "signal.png", title)
    if "jacobian" in frames:
        plots.plot_singular_values(frames["jacobian"], out / "jacobian_hist.png", title)
    if "paths" in frames:
        plots.plot_path_cdf(frames["paths"], out / "paths_cdf.png", title)
    if "gradients" in frames:
        plots.plot_gradient_norms(frames["gradients"], out / "gradients.png", title)
    write_json(out / "summary.json", summary)
    print(f"wrote {', '.join(sorted(p.name for p in out.iterdir()))} to {out}")
