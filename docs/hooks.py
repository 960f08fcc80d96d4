"""mkdocs hooks: tables produced by the benchmark scripts, not typed by hand.

A line ``{{ csv_table("NAME.csv", "col1,col2,...") }}`` in a page becomes a Markdown table of
those columns of ``benchmarks/results/NAME.csv`` (the CSV a benchmark script writes); a missing
file is an error, so ``mkdocs build --strict`` fails rather than publish an empty table.
``{{ changelog }}`` includes CHANGELOG.md.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
PATTERN = re.compile(r'\{\{ csv_table\("([^"]+)"(?:, "([^"]*)")?\) \}\}')


def csv_table(name: str, columns: str | None = None) -> str:
    path = RESULTS / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: run the benchmark script that writes it")
    with path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    cols = [c.strip() for c in columns.split(",")] if columns else list(rows[0])
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(r.get(c, "") for c in cols) + " |" for r in rows]
    return "\n".join(lines) + f"\n\n*Source: `benchmarks/results/{name}`.*\n"


def on_page_markdown(markdown: str, **_: object) -> str:
    markdown = PATTERN.sub(lambda m: csv_table(m.group(1), m.group(2)), markdown)
    if "{{ changelog }}" in markdown:
        text = (ROOT / "CHANGELOG.md").read_text()
        markdown = markdown.replace("{{ changelog }}", text.split("\n", 1)[1])
    return markdown
