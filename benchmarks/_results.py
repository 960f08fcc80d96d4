"""Where the benchmark scripts write their figures: one CSV per script under
``benchmarks/results/`` (written atomically), which the documentation's tables are built from."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def write_csv(name: str, rows: list[dict], path: str | None = None) -> Path:
    """Write ``rows`` (dicts with the same keys) to ``benchmarks/results/<name>`` (or ``path``)
    through a temporary file; returns the path."""
    out = Path(path) if path else RESULTS / name
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(out.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        fields = list(dict.fromkeys(k for row in rows for k in row))  # every column, in order
        w = csv.DictWriter(f, fieldnames=fields, restval="")
        w.writeheader()
        w.writerows(rows)
    tmp.replace(out)
    print(f"\nwrote {out}")
    return out


def child_result(script: str, *args: str, env: dict[str, str] | None = None) -> dict:
    """Run ``script`` in a fresh Python process (a measurement that must not share the caller's
    process state) with ``args`` (and ``env``, default this process's); the JSON object printed
    on its last output line."""
    out = subprocess.run(
        [sys.executable, str(Path(script).resolve()), *args],
        check=True, capture_output=True, text=True, env=env,
    )  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


def in_turn(modes: tuple[str, ...], pairs: int, measure, show) -> dict[str, list[dict]]:
    """``measure(mode)`` for every mode, ``pairs`` times, the order reversed every other pair so
    that drift in the machine's load falls on all modes alike; ``show(pair, mode, result)``
    after each. The results per mode, in pair order."""
    got: dict[str, list[dict]] = {m: [] for m in modes}
    for p in range(pairs):
        for mode in modes if p % 2 == 0 else modes[::-1]:
            r = measure(mode)
            got[mode].append(r)
            show(p + 1, mode, r)
    return got


def print_table(rows: list[dict], columns: list[tuple[str, str]]) -> None:
    """``rows`` as a fixed-width table on stdout: ``columns`` = (key, width) pairs, each value
    right-aligned in its column (floats to 3 significant digits), after a blank line."""

    def cell(v: object) -> str:
        return f"{v:.3g}" if isinstance(v, float) else str(v)

    widths = [max(int(w), len(k)) for k, w in columns]
    print("\n" + " ".join(k.rjust(w) for (k, _), w in zip(columns, widths, strict=True)))
    for r in rows:
        print(" ".join(cell(r[k]).rjust(w) for (k, _), w in zip(columns, widths, strict=True)))


def chosen(parser: object, text: str, choices: dict) -> list[str]:
    """The names in the comma list ``text``, each one of ``choices`` (else ``parser.error``)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    bad = [n for n in names if n not in choices]
    if bad:
        parser.error(f"unknown names {bad}; choose from {', '.join(choices)}")
    return names
