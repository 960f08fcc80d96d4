"""The ``depthlab`` command: list, run, train, diagnose, report.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a parser
whose ``func(args) -> int`` runs it. Bad input (:class:`~depthlab.DepthlabError`) is reported in
one line on stderr with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from depthlab.registry import DepthlabError

SUBCOMMANDS = ("list", "run", "train", "diagnose", "report")


def add_set_option(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` override option, collected in ``args.overrides``."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="depthlab",
        description="Train very deep networks with and without normalization; diagnose them; "
        "reproduce the published claims.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        try:
            module = importlib.import_module(f"depthlab.cli.{name}_cmd")
        except ModuleNotFoundError as e:
            if e.name != f"depthlab.cli.{name}_cmd":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except DepthlabError as e:
        print(f"depthlab {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
