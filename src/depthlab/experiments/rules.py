"""Verdict rules over seeds: an effect counts only where it holds on every seed, strictly.

Every training experiment runs several seeds (``seeds`` in its config) and judges a claim by
these helpers, so that each rule can fail:

* :func:`every` — ``a > b + margin`` on every seed (paired by seed), never a tie;
* :func:`mean_sd` / :func:`spread` — the mean and spread shown beside each measured figure;
* :func:`contrast` — a contrast claim ("X trains, Y fails") is reproduced only if both halves
  are observed; if both arms train or both fail the verdict is "not reproduced" and says why.

A rule never counts a tie as support.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from depthlab.experiments.base import verdict

if TYPE_CHECKING:
    import pandas as pd


def _clean(values: Iterable[float]) -> list[float]:
    return [float(v) for v in values]


def mean_sd(values: Iterable[float]) -> tuple[float, float]:
    """Mean and (sample) standard deviation; NaN-free input expected (sd 0 for one value)."""
    v = _clean(values)
    if not v:
        return math.nan, math.nan
    m = sum(v) / len(v)
    if len(v) == 1:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in v) / (len(v) - 1))


def spread(values: Iterable[float], digits: int = 2, pct: bool = False) -> str:
    """``mean ± sd`` (``n/a`` when empty; infinities shown as ``never``)."""
    v = _clean(values)
    if not v:
        return "n/a"
    if any(math.isinf(x) for x in v):
        finite = [x for x in v if math.isfinite(x)]
        inner = f"{len(v) - len(finite)}/{len(v)} never"
        return inner if not finite else f"{inner}, others {spread(finite, digits, pct)}"
    m, sd = mean_sd(v)
    if pct:
        return f"{100 * m:.1f}% ± {100 * sd:.1f}"
    return f"{m:.{digits}g} ± {sd:.{digits}g}"


def every(a: Mapping[int, float], b: Mapping[int, float] | float, margin: float = 0.0) -> bool:
    """``a[seed] > b[seed] + margin`` for every seed of ``a`` (``b`` a per-seed mapping or one
    number); False when ``a`` is empty, a seed is missing from ``b``, or any value is NaN. A tie
    is not support."""
    if not a:
        return False
    for seed, x in a.items():
        y = b if isinstance(b, (int, float)) else b.get(seed, math.nan)
        if not (x > y + margin):  # NaN compares False
            return False
    return True


def count(a: Mapping[int, float], b: Mapping[int, float] | float, margin: float = 0.0) -> int:
    """On how many seeds ``a > b + margin``."""
    return sum(every({s: x}, b, margin) for s, x in a.items())


def contrast(works: bool, fails: bool, works_label: str, fails_label: str) -> tuple[str, str]:
    """The verdict of "``works_label`` trains where ``fails_label`` does not" and the reason.

    Reproduced only when both halves are observed (on every seed); if both arms train, or both
    fail, the contrast is not there: "not reproduced", with the reason."""
    if works and fails:
        return verdict(True), ""
    if not works and not fails:
        return verdict(False), (
            f"neither half observed: {works_label} did not train and {fails_label} did not fail"
        )
    if works:
        return verdict(False), f"{fails_label} trained too (both arms train)"
    return verdict(False), f"{works_label} did not train either (both arms fail)"


def per_seed(values: Sequence[tuple[int, float]]) -> dict[int, float]:
    """``{seed: value}`` from ``(seed, value)`` pairs."""
    return {int(s): float(v) for s, v in values}


def accuracy_or_zero(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with an ``acc`` column: the test accuracy, with diverged runs (and missing values)
    counted as 0 — a run that diverged did not reach chance."""
    d = df.copy()
    div = d["diverged"].astype(bool)
    d["acc"] = d["test_accuracy"].astype(float).fillna(0.0).where(~div, 0.0)
    return d
