"""Plotting and Markdown/HTML rendering of experiment records (compute lives elsewhere)."""

from depthlab.report.render import (
    claims_table_md,
    claims_table_text,
    render_experiment_md,
    render_html,
    write_combined,
)

__all__ = [
    "claims_table_md",
    "claims_table_text",
    "render_experiment_md",
    "render_html",
    "write_combined",
]
