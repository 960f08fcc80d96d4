"""``depthlab report DIR``: re-render reports (figures, claims, report.md/html) from records."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from depthlab.registry import DepthlabError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "report",
        help="re-render report.md/report.html from the records of a `depthlab run`",
        description="DIR is an experiment folder (holding config.yaml and records.csv) or a "
        "`depthlab run all` folder holding several; figures, claims and reports are redrawn "
        "from records.csv without running anything.",
    )
    p.add_argument("dir", help="output folder of `depthlab run`")
    p.add_argument(
        "--compact",
        action="store_true",
        help="print the claim table as three-column Markdown (experiment, claim, verdict)",
    )
    p.set_defaults(func=report_command)


def report_command(args: argparse.Namespace) -> int:
    from depthlab.experiments.runner import load_result
    from depthlab.report.render import claims_compact_md, claims_table_text, write_combined

    root = Path(args.dir)
    if not root.is_dir():
        raise DepthlabError(f"{root} is not a folder; pass the --out folder of `depthlab run`")
    if (root / "config.yaml").is_file():
        results = [load_result(root)]
        print(f"wrote {root / 'report.md'}")
    else:
        folders = sorted(p for p in root.iterdir() if (p / "config.yaml").is_file())
        if not folders:
            raise DepthlabError(
                f"{root} holds no experiment results (no */config.yaml); run `depthlab run` first"
            )
        results = []
        for f in folders:
            if not (f / "records.csv").is_file():
                print(f"skipping {f}: no records.csv (the run did not finish)", file=sys.stderr)
                continue
            results.append(load_result(f))
        if not results:
            raise DepthlabError(f"no experiment under {root} has finished; re-run `depthlab run`")
        md, page = write_combined(results, root)
        print(f"wrote {md} and {page}")
    print(claims_compact_md(results) if args.compact else claims_table_text(results))
    return 0
