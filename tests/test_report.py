"""Reports: the claim table first, figures embedded, and report.html rendering in headless
Chromium with every figure decoded."""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

import pytest

from depthlab.experiments import EXPERIMENTS, Claim, Experiment
from depthlab.experiments.runner import run
from depthlab.report.render import claims_table_md, render_html

CHROMIUM = next(
    (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None
)
FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--virtual-time-budget=10000",
]  # fmt: skip


@dataclass(frozen=True)
class FigConfig:
    figures: int = 2


@EXPERIMENTS.register()
class TwoFigures(Experiment):
    name = "test-two-figures"
    title = "draws figures | with a pipe <b>and markup</b>"
    columns = ("x", "y")
    Config = FigConfig
    presets = {"smoke": FigConfig()}

    def cells(self, cfg):
        return [{"x": x} for x in range(3)]

    def run_cell(self, cell):
        return [{"y": cell["x"] ** 2}]

    def figures(self, df, cfg, out_dir):
        import matplotlib.pyplot as plt

        from depthlab.report.render import save_fig

        paths = []
        for k in range(cfg.figures):
            fig, ax = plt.subplots()
            ax.plot(df["x"], df["y"] * (k + 1))
            paths.append(save_fig(fig, out_dir / f"fig{k}.png"))
        return paths

    def claims(self, df, cfg):
        return [
            Claim("y = x² | exactly", "x²", f"y(2) = {df['y'].iloc[2]}", "reproduced"),
            Claim("a claim we fail", "big", "small", "not reproduced"),
        ]


@pytest.fixture(scope="module")
def combined(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    results = run(["path-variance", "test-two-figures"], "smoke", out, log=lambda s: None)
    return out, results


def test_combined_report_opens_with_the_claim_table_and_embeds_every_figure(combined):
    out, results = combined
    md = (out / "report.md").read_text()
    assert md.index("| experiment | paper's claim |") < md.index("## path-variance")
    assert "y = x² \\| exactly" in md  # pipes escaped inside table cells
    assert "❌ not reproduced" in md and "✅ reproduced" in md
    page = (out / "report.html").read_text()
    assert page.index('<table id="claims">') < page.index("<section")
    imgs = re.findall(r'<img class="figure"[^>]*src="([^"]+)"', page)
    assert len(imgs) == sum(len(r.figures) for r in results) == 4  # path-variance: 2
    assert all(src.startswith("data:image/png;base64,iVBORw0KGgo") for src in imgs)  # PNG magic
    assert "http://" not in page and "https://" not in page  # self-contained
    assert "<b>and markup</b>" not in page and "&lt;b&gt;and markup&lt;/b&gt;" in page


def test_claims_table_md_one_row_per_claim_and_errors_shown():
    import pandas as pd

    from depthlab.experiments.runner import ExperimentResult

    empty = pd.DataFrame()
    claim = Claim("c", "p", "m", "partly", setup="ours", paper_setup="theirs", rule="why")
    ok = ExperimentResult("a", "smoke", {}, empty, [claim], [], None)
    bad = ExperimentResult("b", "smoke", {}, empty, [], [], None, error="RuntimeError: boom")
    table = claims_table_md([ok, bad])
    lines = table.strip().splitlines()
    assert len(lines) == 4
    assert lines[0].startswith("| experiment | paper's claim | paper's figure | paper's setup |")
    assert lines[2] == "| `a` | c | p | theirs | ours | m | 🟡 partly — why |"
    assert "error: RuntimeError: boom" in lines[3]
    assert 'class="error"' in render_html([ok, bad])


PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.querySelectorAll("img.figure")];
  const ok = imgs.filter((i) => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  const rows = document.querySelectorAll("#claims tbody tr").length;
  const pre = document.createElement("pre");
  pre.id = "imgcheck";
  pre.textContent = `decoded=${ok.length} total=${imgs.length} rows=${rows}`;
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="chromium not installed (.ci/run installs it)")
def test_report_html_renders_in_headless_chromium_with_every_figure(combined, tmp_path):
    out, results = combined
    page = (out / "report.html").read_text()
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", PROBE + "</body>"))
    proc = subprocess.run(
        [CHROMIUM, *FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=90,
    )
    m = re.search(r'<pre id="imgcheck">decoded=(\d+) total=(\d+) rows=(\d+)</pre>', proc.stdout)
    assert m, f"no probe output; chromium stderr: {proc.stderr[-2000:]}"
    decoded, total, rows = map(int, m.groups())
    assert total == 4 and decoded == total  # path-variance's two figures and the test's two
    assert rows == sum(len(r.claims) for r in results) == 5  # path-variance 3, the test's 2


def test_run_experiments_leaves_the_callers_figures_and_backend(tmp_path):
    """A notebook's open figures and backend survive a run (only the run's figures close)."""
    import matplotlib
    import matplotlib.pyplot as plt

    import depthlab as dl

    backend = matplotlib.get_backend()
    fig = plt.figure()
    try:
        results = dl.run_experiments(
            "path-variance", preset="smoke", out=tmp_path, log=lambda s: None,
            overrides={"measured_depths": [10], "seeds": [0, 1], "nets": ["fixed"]},
        )  # fmt: skip
        assert results[0].figures and not results[0].error
        assert plt.fignum_exists(fig.number) and plt.get_fignums() == [fig.number]
        assert matplotlib.get_backend() == backend
    finally:
        plt.close(fig)


def test_report_compact_prints_one_markdown_row_per_claim(combined, capsys):
    from depthlab.cli import main

    out, results = combined
    assert main(["report", str(out), "--compact"]) == 0
    text = capsys.readouterr().out
    table = [line for line in text.splitlines() if line.startswith("| `")]
    assert len(table) == sum(len(r.claims) for r in results)
    lines = text.splitlines()
    i = lines.index("| experiment | paper's claim | verdict |")
    assert lines[i + 1] == "|---|---|---|" and lines[i + 2 : i + 2 + len(table)] == table
    assert all(line.count(" | ") == 2 for line in table)  # three columns, pipes escaped
