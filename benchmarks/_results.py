"""Where the benchmark scripts write their figures: one CSV per script under
``benchmarks/results/`` (written atomically), which the documentation's tables are built from."""

from __future__ import annotations

import csv
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
