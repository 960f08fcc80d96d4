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
    p.add_argument("--json", action="store_true", help="machine-readable output (one JSON object)")
    p.set_defaults(func=list_command)


def summary(obj: object) -> str:
    """The first sentence of ``obj``'s docstring as plain text: its first paragraph joined, cut
    at the first full stop, RST roles and literals (``:class:`X```, ````x````) unwrapped."""
    import re

    doc = (getattr(obj, "__doc__", None) or "").strip()
    if not doc:
        return ""
    para = " ".join(line.strip() for line in doc.split("\n\n")[0].splitlines())
    para = re.sub(r":[a-z]+:`~?([^`]+)`", lambda m: m.group(1).split(".")[-1], para)
    para = para.replace("``", "")
    m = re.search(r"(?<!e\.g)(?<!i\.e)(?<!et al)\.(\s|$)", para)
    return para[: m.start() + 1] if m else para


def list_command(args: argparse.Namespace) -> int:
    import depthlab as dl
    from depthlab.experiments import EXPERIMENTS

    what = args.what
    if args.json:
        import json

        from depthlab.data import DATASETS

        out: dict[str, list[dict[str, str]]] = {}
        if what in ("all", "models"):
            out["models"] = [{"name": n, "summary": summary(dl.MODELS.get(n))}
                             for n in dl.list_models()]  # fmt: skip
        if what in ("all", "schemes"):
            out["schemes"] = [{"name": n, "summary": summary(dl.SCHEMES.get(n))}
                              for n in dl.list_schemes()]  # fmt: skip
        if what in ("all", "datasets"):
            out["datasets"] = [{"name": n, "summary": summary(DATASETS.get(n))}
                               for n in DATASETS.names()]  # fmt: skip
        if what in ("all", "experiments"):
            out["experiments"] = [
                {"name": n, "summary": EXPERIMENTS.get(n).title, "paper": EXPERIMENTS.get(n).paper,
                 "presets": list(EXPERIMENTS.get(n).presets)}
                for n in EXPERIMENTS.names()
            ]  # fmt: skip
        print(json.dumps(out, indent=1, ensure_ascii=False))
        return 0
    if what in ("all", "models"):
        print("models:")
        for name in dl.list_models():
            print(f"  {name:20s} {summary(dl.MODELS.get(name))}")
    if what in ("all", "schemes"):
        print("schemes:")
        for name in dl.list_schemes():
            print(f"  {name:20s} {summary(dl.SCHEMES.get(name))}")
    if what in ("all", "datasets"):
        from depthlab.data import DATASETS

        print("datasets:")
        for name in DATASETS.names():
            print(f"  {name:20s} {summary(DATASETS.get(name))}")
    if what in ("all", "experiments"):
        print("experiments (depthlab run NAME --preset smoke|quick|deep|full):")
        for name in EXPERIMENTS.names():
            exp = EXPERIMENTS.get(name)
            print(f"  {name:24s} {exp.title}")
    return 0
