"""Figures of the diagnostics frames (matplotlib). Each function takes the DataFrame a
:mod:`depthlab.diagnostics` function returned, writes one PNG atomically, closes its figure and
returns its path; the caller's backend and other figures are left alone."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from depthlab.io import atomic_write


def _save(fig, path: str | Path) -> Path:
    try:
        return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))
    finally:
        plt.close(fig)


def plot_signal_propagation(df: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Per-block variances (skip, branch before/after gate, output) and the output's average
    squared channel mean, log scale — the signal propagation plot of Brock et al. 2021
    (arXiv 2101.08692) and De & Smith 2020 Fig. 4 (arXiv 2002.10444)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    x = df["block"].to_numpy() + 1
    for col, label in [
        ("skip_var", "skip variance"),
        ("branch_var", "branch variance"),
        ("gated_var", "gated branch variance"),
        ("out_var", "block output variance"),
        ("out_mean_sq", "output channel mean²"),
        ("bn_running_var", "BN running var"),
    ]:
        y = df[col].to_numpy(dtype=float)
        if np.isfinite(y).any() and (y[np.isfinite(y)] > 0).any():
            ax.plot(x, np.where(y > 0, y, np.nan), label=label, lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("residual block i")
    ax.set_ylabel("value (channel average)")
    ax.set_title(title or "signal propagation")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_singular_values(df: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Histogram of log10 Jacobian singular values (ReZero Fig. 5, arXiv 2003.04887); Hutchinson
    RMS rows are left out."""
    s = df.loc[df["kind"] != "rms", "singular_value"].to_numpy(dtype=float)
    s = s[s > 0]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    if s.size:
        ax.hist(np.log10(s), bins=min(60, max(10, s.size // 4)), color="C0", alpha=0.8)
    ax.axvline(0.0, color="k", lw=0.8, ls="--")
    ax.set_xlabel("log10 singular value of the input-output Jacobian")
    ax.set_ylabel("count")
    ax.set_title(title or "Jacobian spectrum")
    return _save(fig, path)


def plot_path_cdf(
    frames: pd.DataFrame | Mapping[str, pd.DataFrame], path: str | Path, title: str = ""
) -> Path:
    """CDF of the output variance over path length (SkipInit Fig. 3, arXiv 2002.10444); one
    curve per labelled frame from :func:`~depthlab.diagnostics.path_variance`."""
    if isinstance(frames, pd.DataFrame):
        frames = {"": frames}
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for label, df in frames.items():
        ax.step(df["path_length"], df["cdf"], where="post", label=label or None)
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlabel("path length (residual branches taken)")
    ax.set_ylabel("share of output variance (CDF)")
    ax.set_ylim(0, 1.02)
    ax.set_title(title or "variance by path length")
    if any(frames):
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_gradient_norms(df: pd.DataFrame, path: str | Path, title: str = "") -> Path:
    """Activation-gradient norm per residual block (log scale)."""
    act = df[df["kind"] == "activation"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.plot(act["block"].to_numpy() + 1, act["norm"].to_numpy(), lw=1.2)
    ax.set_yscale("log")
    ax.set_xlabel("residual block i")
    ax.set_ylabel("‖∂L/∂h_i‖")
    ax.set_title(title or "gradient norms")
    ax.grid(alpha=0.3)
    return _save(fig, path)
