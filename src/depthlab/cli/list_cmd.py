"""``depthlab list``: the registered models, schemes, data sets and experiments."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("list", help="list models, schemes, data sets and experiments")
    p.add_argument(
        "what",
        nargs="?",
        default="all",
        choices=["all", "models", "schemes", "datasets", "experiments"],
        help="what to list (default: all)",
    )
    p.set_defaults(func=list_command)


def _first_line(obj: object) -> str:
    doc = (getattr(obj, "__doc__", None) or "").strip()
    return doc.splitlines()[0] if doc else ""


def list_command(args: argparse.Namespace) -> int:
    import depthlab as dl
    from depthlab.experiments import EXPERIMENTS

    what = args.what
    if what in ("all", "models"):
        print("models:")
        for name in dl.list_models():
            print(f"  {name:20s} {_first_line(dl.MODELS.get(name))}")
    if what in ("all", "schemes"):
        print("schemes:")
        for name in dl.list_schemes():
            print(f"  {name:20s} {_first_line(dl.SCHEMES.get(name))}")
    if what in ("all", "datasets"):
        try:
            from depthlab.data import list_datasets
        except ImportError:
            list_datasets = None
        if list_datasets is not None:
            print("datasets:")
            for name in list_datasets():
                print(f"  {name}")
    if what in ("all", "experiments"):
        print("experiments (depthlab run NAME --preset smoke|quick|full):")
        for name in EXPERIMENTS.names():
            exp = EXPERIMENTS.get(name)
            print(f"  {name:24s} {exp.title}")
    return 0
