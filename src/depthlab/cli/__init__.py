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


class ArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: ``depthlab train: error: ... (see depthlab train --help)``
    on stderr and exit code 2, without the multi-line usage block."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def add_memory_option(parser: argparse.ArgumentParser) -> None:
    """``--max-memory GB``: the memory limit sizes are checked against (default: this machine's
    memory; :mod:`depthlab.resources`)."""
    parser.add_argument(
        "--max-memory",
        type=float,
        default=None,
        metavar="GB",
        help="refuse models and batches estimated to need more than GB (default: the machine's "
        "memory, or $DEPTHLAB_MAX_MEMORY)",
    )


def add_set_option(parser: argparse.ArgumentParser, help: str) -> None:
    """The repeatable ``--set KEY=VALUE`` override option, collected in ``args.overrides``."""
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help=help
    )


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="depthlab",
        description="Train very deep networks with and without normalization; diagnose them; "
        "reproduce the published claims.",
    )
    from depthlab import __version__

    parser.add_argument("--version", action="version", version=f"depthlab {__version__}")
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
        from depthlab.heap import huge_pages_enabled, keep_freed_memory

        keep_freed_memory()  # this process is the command's own: freed memory kept for reuse
        huge_pages_enabled()  # a bad DEPTHLAB_HUGE_PAGES is refused before anything is written
        if getattr(args, "max_memory", None) is not None:
            from depthlab.resources import set_max_memory

            set_max_memory(args.max_memory)
        return int(args.func(args) or 0)
    except DepthlabError as e:
        print(f"depthlab {args.command}: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # the reader went away (`depthlab list | head`): stop quietly
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as e:  # the filesystem said no (full disk, permissions): not a bug
        from depthlab.validate import disk_error

        err = disk_error(e, e.filename or "a file", "check the folder and the disk, then re-run")
        print(f"depthlab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _one_line(text: str) -> str:
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
