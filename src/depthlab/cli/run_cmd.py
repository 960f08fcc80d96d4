"""``depthlab run NAME|all --preset P --out DIR [--set k=v] [--jobs N]``: run reproductions."""

from __future__ import annotations

import argparse
import sys
import time

from depthlab.cli import add_memory_option, add_set_option
from depthlab.io import parse_overrides
from depthlab.registry import DepthlabError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "run",
        help="run a reproduction (or all of them) and write its report",
        description="Run experiment NAME (or 'all') at a preset scale. Writes OUT/NAME/"
        "{config.yaml,records.csv,summary.json,*.png,report.md}; 'all' also writes "
        "OUT/report.md and OUT/report.html. Finished cells are cached in OUT/NAME/cells/, so "
        "an interrupted run resumes. `depthlab list` shows the experiments.",
    )
    p.add_argument("name", help="experiment name, or 'all'")
    p.add_argument(
        "--preset",
        default="quick",
        help="smoke | quick | deep | full (default: quick); deep: the papers' depths on a CPU, "
        "only for the experiments with a depth claim ('all' runs those)",
    )
    p.add_argument("--out", default=None, help="output folder (default: runs/PRESET)")
    add_set_option(p, "override a config field, e.g. --set steps=200 --set 'depths=[10,100]'")
    p.add_argument("--jobs", type=int, default=1, help="parallel worker processes (default: 1)")
    p.add_argument(
        "--executor",
        default="local",
        help="local (worker processes, --jobs) or ray (every cell a Ray task; needs the ray "
        "extra: pip install 'depthlab[ray]')",
    )
    p.add_argument(
        "--address",
        default=None,
        help="with --executor ray: the cluster's address (e.g. 127.0.0.1:6379 or auto); "
        "default: start a local Ray for this sweep",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="print each experiment's cells (those cached in OUT) and what the rest should "
        "take at one CPU core's rate per --jobs worker; run nothing, write nothing",
    )
    p.add_argument(
        "--measure",
        action="store_true",
        help="with --dry-run: estimate from training steps timed on the cells' device (a few "
        "steps of each distinct network, on random inputs) instead of the CPU rate",
    )
    p.add_argument(
        "--flush-denormal",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="flush denormal floats to zero in every worker (faster where signals underflow, "
        "but not IEEE arithmetic: records can differ, and each claim's setup says so; cells "
        "cached apart from an IEEE run's; local or Ray workers). Default: on for --preset "
        "deep where its cells run on a CPU that can, off otherwise; --no-flush-denormal keeps "
        "IEEE arithmetic",
    )
    add_memory_option(p)
    p.set_defaults(func=run_command)


def run_command(args: argparse.Namespace) -> int:
    from depthlab.experiments import runner
    from depthlab.report.render import claims_table_text

    overrides = parse_overrides(args.overrides)
    out = args.out if args.out is not None else f"runs/{args.preset}"
    if args.measure and not args.dry_run:
        raise DepthlabError("--measure goes with --dry-run (it times steps instead of running)")
    if args.dry_run:
        runner.plan(args.name, args.preset, overrides, jobs=args.jobs, out=out,
                    log=lambda s: print(s, flush=True), measure=args.measure,
                    flush_denormal=args.flush_denormal)  # fmt: skip
        return 0
    t0 = time.perf_counter()
    results = runner.run(
        args.name,
        preset=args.preset,
        out=out,
        overrides=overrides,
        jobs=args.jobs,
        log=lambda s: print(s, flush=True),
        executor=args.executor,
        address=args.address,
        flush_denormal=args.flush_denormal,
    )
    wall = time.perf_counter() - t0
    print()
    print(
        "per-experiment wall time: " + ", ".join(f"{r.name} {r.wall_time_s:.1f}s" for r in results)
    )
    print(f"total wall time: {wall:.1f}s")
    print()
    print(claims_table_text(results))
    where = (
        f"{out}/report.md and {out}/report.html"
        if len(results) > 1
        else (f"{out}/{results[0].name}/report.md")
    )
    print(f"report: {where}")
    failed = [r for r in results if r.error]
    if failed:
        for r in failed:
            print(f"{r.name} failed: {r.error}", file=sys.stderr)
        print(f"failed experiments: {', '.join(r.name for r in failed)}", file=sys.stderr)
        return 1
    return 0
