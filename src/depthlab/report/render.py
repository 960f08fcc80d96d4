"""Markdown and self-contained HTML reports of experiment results.

Both open with the claim-vs-measured table (experiment | paper's claim | paper's figure |
paper's setup | our setup | our measured figure over seeds | verdict, with the reason where it is
not "reproduced"); the HTML embeds every figure as a base64 PNG so the file stands
alone.
"""

from __future__ import annotations

import base64
import html
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from depthlab.io import atomic_write_text

if TYPE_CHECKING:
    from depthlab.experiments.runner import ExperimentResult

VERDICT_MARK = {"reproduced": "✅", "partly": "🟡", "not reproduced": "❌", "error": "⚠️"}


def save_figures(exp: Any, df: Any, cfg: Any, out_dir: Path) -> list[Path]:
    """Let the experiment draw its figures, then close the figures it opened — and only those:
    the caller's matplotlib backend and open figures (a notebook's) are left as they were.
    (Without a display matplotlib picks a non-interactive backend by itself.)"""
    import matplotlib.pyplot as plt

    if df is None or not len(df):
        return []
    before = set(plt.get_fignums())
    try:
        paths = exp.figures(df, cfg, Path(out_dir))
    finally:
        for num in set(plt.get_fignums()) - before:
            plt.close(num)
    return [Path(p) for p in paths]


def save_fig(fig: Any, path: Path) -> Path:
    """Save a matplotlib figure as PNG atomically."""
    from depthlab.io import atomic_write

    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=90))
    return path


def table_rows(results: list[ExperimentResult]) -> list[tuple[str, ...]]:
    """(experiment, claim, paper's figure, paper's setup, our setup, measured, verdict, rule)
    for every claim of every result."""
    rows = []
    for r in results:
        if r.error:
            rows.append((r.name, r.title, "", "", "", f"error: {r.error}", "error", ""))
            continue
        if not r.claims:
            rows.append((r.name, r.title, "", "", "", "no records", "not reproduced", ""))
        for c in r.claims:
            rows.append(
                (r.name, c.claim, c.paper, c.paper_setup, c.setup, c.measured, c.verdict, c.rule)
            )
    return rows


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


HEADERS = (
    "experiment", "paper's claim", "paper's figure", "paper's setup", "our setup",
    "our measured figure (over seeds)", "verdict",
)  # fmt: skip


def claims_table_md(results: list[ExperimentResult]) -> str:
    lines = ["| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for name, claim, paper, psetup, setup, measured, verdict, rule in table_rows(results):
        mark = VERDICT_MARK.get(verdict, "")
        why = f" — {rule}" if rule and verdict != "reproduced" else ""
        cells = [f"`{name}`", claim, paper, psetup, setup, measured, f"{mark} {verdict}{why}"]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def claims_compact_md(results: list[ExperimentResult]) -> str:
    """The claim table in three columns (experiment, the paper's claim, verdict with its reason)
    for a front page; ``claims_table_md`` has the setups and the measured figures."""
    lines = ["| experiment | paper's claim | verdict |", "|---|---|---|"]
    for name, claim, _paper, _psetup, _setup, _measured, verdict, rule in table_rows(results):
        mark = VERDICT_MARK.get(verdict, "")
        why = f" — {rule}" if rule and verdict != "reproduced" else ""
        cells = [f"`{name}`", claim, f"{mark} {verdict}{why}"]
        lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
    return "\n".join(lines) + "\n"


def claims_table_text(results: list[ExperimentResult], width: int = 60) -> str:
    """A plain-text table for the terminal."""

    def cut(s: str, n: int) -> str:
        s = str(s)
        return s if len(s) <= n else s[: n - 1] + "…"

    rows = [("experiment", "our setup", "measured", "verdict")]
    for name, _claim, _paper, _psetup, setup, measured, verdict, _rule in table_rows(results):
        rows.append((name, cut(setup, 40), cut(measured, width), verdict))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    out = []
    for j, r in enumerate(rows):
        out.append("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
        if j == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out) + "\n"


def _wall(r: ExperimentResult) -> str:
    return "n/a" if not math.isfinite(r.wall_time_s) else f"{r.wall_time_s:.1f} s"


def _config_md(config: dict) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in config.items())


def render_experiment_md(r: ExperimentResult, fig_prefix: str = "") -> str:
    """One experiment's report: title, citation, claims table, config, figures."""
    lines = [f"# {r.name}: {r.title}", ""]
    if r.paper:
        lines += [f"Paper: {r.paper}", ""]
    lines += [claims_table_md([r]), ""]
    lines += [
        f"Preset `{r.preset}`; {r.cells} cells ({r.cached_cells} from cache), "
        f"{len(r.records)} records, wall time {_wall(r)}.",
        "",
        f"Config: {_config_md(r.config)}",
        "",
    ]
    for p in r.figures:
        lines += [f"![{p.stem}]({fig_prefix}{p.name})", ""]
    return "\n".join(lines)


def render_combined_md(results: list[ExperimentResult]) -> str:
    preset = results[0].preset if results else ""
    total = sum(r.wall_time_s for r in results if math.isfinite(r.wall_time_s))
    lines = [
        f"# depthlab reproductions (preset `{preset}`)",
        "",
        claims_table_md(results),
        "",
        "| experiment | cells | wall time |",
        "|---|---|---|",
    ]
    for r in results:
        lines.append(f"| `{r.name}` | {r.cells} ({r.cached_cells} cached) | {_wall(r)} |")
    lines += [f"| **total** | | {total:.1f} s |", ""]
    for r in results:
        body = render_experiment_md(r, fig_prefix=f"{r.name}/")
        lines += ["#" + body, ""]  # demote headings one level
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0;font-size:14px}
th,td{border:1px solid #ccc;padding:4px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3} img{max-width:100%;border:1px solid #eee;margin:.5em 0}
.reproduced{background:#e6f6e6}.partly{background:#fff6d6}.not-reproduced{background:#fbe3e3}
.error{background:#eee} code{font-size:90%}
"""


def render_html(results: list[ExperimentResult], title: str = "depthlab reproductions") -> str:
    """A self-contained HTML page: the claim table first, then each experiment with its figures
    embedded as ``data:image/png;base64`` images."""
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        '<table id="claims"><thead><tr>'
        + "".join(f"<th>{e(h)}</th>" for h in HEADERS)
        + "</tr></thead><tbody>",
    ]
    for name, claim, paper, psetup, setup, measured, verdict, rule in table_rows(results):
        cls = verdict.replace(" ", "-")
        why = f"<br><small>{e(rule)}</small>" if rule and verdict != "reproduced" else ""
        parts.append(
            f'<tr class="{cls}"><td><a href="#{e(name)}"><code>{e(name)}</code></a></td>'
            f"<td>{e(claim)}</td><td>{e(paper)}</td><td>{e(psetup)}</td><td>{e(setup)}</td>"
            f"<td>{e(measured)}</td><td><b>{e(verdict)}</b>{why}</td></tr>"  # colour = verdict
        )
    parts.append("</tbody></table>")
    parts.append("<table><tr><th>experiment</th><th>cells</th><th>wall time</th></tr>")
    for r in results:
        parts.append(
            f"<tr><td>{e(r.name)}</td><td>{r.cells} ({r.cached_cells} cached)</td>"
            f"<td>{e(_wall(r))}</td></tr>"
        )
    parts.append("</table>")
    for r in results:
        parts.append(f'<section id="{e(r.name)}"><h2>{e(r.name)}: {e(r.title)}</h2>')
        if r.paper:
            parts.append(f"<p>Paper: {e(r.paper)}</p>")
        if r.error:
            parts.append(f"<p><b>error:</b> {e(r.error)}</p>")
        parts.append(
            f"<p>Preset <code>{e(r.preset)}</code>; {r.cells} cells, {len(r.records)} records, "
            f"wall time {e(_wall(r))}.</p><p>Config: "
            + ", ".join(f"<code>{e(str(k))}={e(str(v))}</code>" for k, v in r.config.items())
            + "</p>"
        )
        for p in r.figures:
            data = base64.b64encode(Path(p).read_bytes()).decode("ascii")
            parts.append(
                f'<figure><img class="figure" alt="{e(p.stem)}" '
                f'src="data:image/png;base64,{data}"><figcaption>{e(p.name)}</figcaption></figure>'
            )
        parts.append("</section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_combined(results: list[ExperimentResult], out: Path) -> tuple[Path, Path]:
    """Write ``out/report.md`` and ``out/report.html``."""
    out = Path(out)
    md = atomic_write_text(out / "report.md", render_combined_md(results))
    page = atomic_write_text(out / "report.html", render_html(results))
    return md, page
