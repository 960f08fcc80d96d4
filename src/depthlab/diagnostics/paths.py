"""The ensemble-of-paths view of a residual network at initialisation.

De & Smith 2020, "Batch Normalization Biases Residual Blocks Towards the Identity Function in
Deep Networks" (arXiv 2002.10444), Section 3 and Fig. 3; after Veit et al. 2016 (arXiv
1605.06431).

Model. A stack of d residual blocks ``x_{i+1} = x_i + f_i(x_i)`` expands, at initialisation and
to first order, into a sum over the 2^d paths ``S ⊆ {1..d}`` that take the residual branch of the
blocks in S and the skip connection elsewhere. Branches with independent random weights make the
paths uncorrelated, so the output variance is the sum of the paths' variances, and a path's
variance is the product of the weights ``w_i = Var(branch_i) / Var(skip_i)`` of the branches it
takes (relative to the skip, which carries weight 1):

    Var(x_{d+1}) ∝ Σ_S Π_{i∈S} w_i = Π_i (1 + w_i).

The share of the output variance carried by paths through exactly k branches is therefore
``e_k(w) / Π(1+w_i)`` (e_k the elementary symmetric polynomial), i.e. the probability that a sum
of independent Bernoulli(p_i), ``p_i = w_i / (1 + w_i)``, equals k: a Poisson-binomial law.

Branch weights per scheme (``α`` the gate on the branch, ``alpha``):

* ``batchnorm`` / ``layernorm`` / ``prenorm`` (pre-activation norm in the branch): the skip
  variance before block i is i (it grows by one per block) and the normalised branch outputs unit
  variance, so ``w_i = α²/i`` and ``p_i = α²/(i + α²)``; with α = 1, ``p_i = 1/(i+1)``.
* ``plain`` (``x + α f(x)``, variance-preserving f, α = 1 by default), ``skipinit`` (α default
  1/√d), ``rezero`` (α default 0), ``fixup`` (zero last layer: α = 0): ``w_i = α²``, so the path
  length is Binomial(d, α²/(1+α²)); plain has mean path length d/2, SkipInit with α = 1/√d has
  mean ≈ 1.
* ``scaled`` (``(x + f(x))/√2``) and ``postnorm`` (``LN(x + f(x))``): skip and branch are scaled
  alike, ``w_i = 1`` — the mean path length is still d/2 (why 1/√2 rescaling is not enough,
  De & Smith Table 2).
* ``noskip``: every path goes through all d branches.

Which figure. For d = 10,000 and ``batchnorm`` this model gives a mean path length of 8.79 and
P(K ≤ 14) = 0.970, P(K ≤ 15) = 0.985. The paper's "97% of the variance comes from paths through
15 or fewer residual branches" matches P(K ≤ 14) = 0.970, i.e. the paper counts one more layer per
path (e.g. the input layer) than the number of residual branches it takes; in branch counts, paths
through ≤ 15 branches carry 98.5%.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from depthlab.registry import DepthlabError, unknown_choice

NORMALIZED = ("batchnorm", "layernorm", "prenorm")
GATED_DEFAULTS: dict[str, float | str] = {
    "plain": 1.0,
    "skipinit": "1/sqrt(d)",
    "rezero": 0.0,
    "fixup": 0.0,
}
EQUAL = ("scaled", "postnorm")
PATH_SCHEMES = (*NORMALIZED, *GATED_DEFAULTS, *EQUAL, "noskip")
MAX_WORK = 2 * 10**8  # depth·K limit of the column DP (about 10 s)


def _alpha(alpha: float | str | None, default: float | str, depth: int) -> float:
    a = default if alpha is None else alpha
    if isinstance(a, str):
        if a.replace(" ", "") in ("1/sqrt(d)", "1/sqrt(depth)"):
            return 1.0 / math.sqrt(depth)
        try:
            return float(a)
        except ValueError:
            raise DepthlabError(f"alpha must be a number or '1/sqrt(d)', got {a!r}") from None
    a = float(a)
    if not math.isfinite(a):
        raise DepthlabError(f"alpha must be finite, got {a}")
    return a


def path_law(scheme: Any) -> tuple[str, float | str | None]:
    """``(kind, default α)`` of a scheme for the path model, from the scheme itself
    (:meth:`depthlab.schemes.Scheme.path_law`) — so ``layernorm`` with ``placement="post"`` and
    ``postnorm`` get the same law. A name builds the scheme with its defaults, except that a
    gated scheme named without an ``alpha`` takes the module's default (``skipinit``:
    ``1/sqrt(d)``, the interesting case; at its init α = 0 every path is the skip)."""
    from depthlab.schemes import SCHEMES, Scheme, get_scheme

    if isinstance(scheme, Scheme):
        law, name = scheme.path_law(), scheme.name
    elif isinstance(scheme, str) and scheme in SCHEMES.names():
        law, name = get_scheme(scheme).path_law(), scheme
        if law is not None and law[0] == "gated" and scheme in GATED_DEFAULTS:
            law = ("gated", GATED_DEFAULTS[scheme])
    else:
        raise unknown_choice("path-variance scheme", str(scheme), sorted(PATH_SCHEMES))
    if law is None:
        raise DepthlabError(
            f"scheme '{name}' has no analytic path model; choose one of {', '.join(PATH_SCHEMES)}"
        )
    return law


def branch_weights(depth: int, scheme: Any = "batchnorm", alpha: float | str | None = None):
    """``w_i = Var(branch_i)/Var(skip_i)`` for blocks i = 1..depth (see the module docstring);
    ``inf`` for ``noskip``. ``scheme``: a name or a :class:`~depthlab.schemes.Scheme` (its
    :meth:`~depthlab.schemes.Scheme.path_law`). Returns a float64 array of length ``depth``."""
    if not isinstance(depth, (int, np.integer)) or isinstance(depth, bool) or depth < 1:
        raise DepthlabError(f"depth must be a positive integer, got {depth!r}")
    kind, default = path_law(scheme)
    i = np.arange(1, depth + 1, dtype=np.float64)
    if kind == "normalized":
        return _alpha(alpha, default, depth) ** 2 / i
    if kind == "gated":
        return np.full(depth, _alpha(alpha, default, depth) ** 2)
    if alpha is not None:
        raise DepthlabError(f"scheme '{scheme}' takes no alpha (it has no gate on the branch)")
    if kind == "equal":
        return np.ones(depth)
    return np.full(depth, np.inf)  # noskip


def _tail_cutoff(p: np.ndarray) -> int:
    """A K with P(K_total > K) < 1e-18 by Bernstein's inequality (so truncating there changes no
    share by more than float64 rounding)."""
    mean = float(p.sum())
    var = float((p * (1 - p)).sum())
    c = math.log(1e18)
    t = (2 * c / 3 + math.sqrt((2 * c / 3) ** 2 + 8 * c * var)) / 2
    return min(len(p), int(math.ceil(mean + t)) + 2)


def poisson_binomial_pmf(p: np.ndarray, kmax: int | None = None) -> np.ndarray:
    """Exact PMF ``P(Σ Bernoulli(p_i) = k)`` for k = 0..kmax (default: where the tail < 1e-18).

    Column-wise dynamic programme, O(d·kmax) with every step vectorised over the d blocks. With
    ``Q_i = Π_{l≤i}(1-p_l)`` and ``P_i[k]`` the PMF after i blocks, the recurrence
    ``P_i[k] = (1-p_i) P_{i-1}[k] + p_i P_{i-1}[k-1]`` solves to

        P_i[k] = Q_i · Σ_{j≤i} p_j P_{j-1}[k-1] / Q_j,

    a cumulative sum of non-negative terms (no cancellation, so it is exact to rounding). When
    Q_d would underflow the same sums run in log space (``logaddexp.accumulate``). Constant p is
    the binomial law and uses scipy's binomial PMF instead.
    """
    p = np.asarray(p, dtype=np.float64)
    d = len(p)
    if kmax is None:
        kmax = _tail_cutoff(p)
    kmax = min(kmax, d)
    if np.all(p == p[0]):
        from scipy import stats  # imported here: scipy.stats costs 0.5 s at import

        return stats.binom.pmf(np.arange(kmax + 1), d, p[0])
    if d * kmax > MAX_WORK:
        raise DepthlabError(
            f"the exact path distribution needs depth·K = {d}·{kmax} steps (mean path length "
            f"{p.sum():.0f}); that is too slow — use a smaller depth or a smaller alpha"
        )
    out = np.zeros(kmax + 1)
    log1m = np.log1p(-p)
    logq = np.concatenate([[0.0], np.cumsum(log1m)])  # log Q_i, i = 0..d
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        if logq[-1] > -600:  # Q_i stays representable: linear space
            q = np.exp(logq)
            col = q.copy()  # P_i[0] = Q_i
            out[0] = col[-1]
            ratio = p / q[1:]  # p_j / Q_j
            for k in range(1, kmax + 1):
                s = np.cumsum(ratio * col[:-1])
                col = np.concatenate([[0.0], q[1:] * s])
                out[k] = col[-1]
        else:
            logp = np.log(p)
            col = logq.copy()
            out[0] = math.exp(col[-1])
            for k in range(1, kmax + 1):
                terms = logp + col[:-1] - logq[1:]
                s = np.logaddexp.accumulate(terms)
                col = np.concatenate([[-np.inf], logq[1:] + s])
                out[k] = math.exp(col[-1])
    return out


def path_variance(
    depth: int, scheme: Any = "batchnorm", alpha: float | str | None = None
) -> pd.DataFrame:
    """Share of the output variance carried by paths through k residual branches, k = 0..K.

    Returns columns ``path_length`` (k), ``share`` (the Poisson-binomial PMF with
    ``p_i = w_i/(1+w_i)``, see the module docstring) and ``cdf``. Rows stop where the remaining
    tail is below 1e-18 (``noskip``: the single row k = depth). Exact, and fast enough for
    depth 10^6 (< 1 s for ``batchnorm``; binomial schemes are a single scipy call).

    ``scheme`` is a name or a :class:`~depthlab.schemes.Scheme` (its options decide the law:
    ``get_scheme("layernorm", placement="post")`` is ``postnorm``'s).

    >>> df = path_variance(10_000, "batchnorm")
    >>> float(df.loc[df.path_length <= 15, "share"].sum())   # 0.985 (paper: "97%", see above)
    """
    w = branch_weights(depth, scheme, alpha)
    if np.isinf(w).all():
        share = np.zeros(depth + 1)
        share[depth] = 1.0
    else:
        share = poisson_binomial_pmf(w / (1.0 + w))
    share = np.clip(share, 0.0, None)
    return pd.DataFrame(
        {"path_length": np.arange(len(share)), "share": share, "cdf": np.cumsum(share)}
    )


def path_variance_monte_carlo(
    depth: int,
    scheme: Any = "batchnorm",
    alpha: float | str | None = None,
    samples: int = 20_000,
    seed: int = 0,
) -> pd.DataFrame:
    """Monte-Carlo estimate of :func:`path_variance`: sample ``samples`` paths, each taking
    branch i independently with probability ``p_i = w_i/(1+w_i)``, and histogram their lengths.
    Cost O(samples·depth); standard error of a share s is √(s(1-s)/samples)."""
    w = branch_weights(depth, scheme, alpha)
    rng = np.random.default_rng(seed)
    if np.isinf(w).all():
        lengths = np.full(samples, depth)
    else:
        p = (w / (1.0 + w)).astype(np.float32)
        lengths = np.zeros(samples, dtype=np.int64)
        chunk = max(1, 2**24 // depth)
        for start in range(0, samples, chunk):
            n = min(chunk, samples - start)
            lengths[start : start + n] = (rng.random((n, depth), dtype=np.float32) < p).sum(1)
    counts = np.bincount(lengths, minlength=int(lengths.max()) + 1) / samples
    return pd.DataFrame(
        {"path_length": np.arange(len(counts)), "share": counts, "cdf": np.cumsum(counts)}
    )


def path_summary(df: pd.DataFrame, threshold: int = 15) -> dict[str, float]:
    """Mean and std of the path length, its median, and the share through ≤ ``threshold``
    branches, from a :func:`path_variance` frame."""
    k = df["path_length"].to_numpy(dtype=np.float64)
    s = df["share"].to_numpy()
    mean = float((k * s).sum())
    return {
        "mean_path_length": mean,
        "std_path_length": float(math.sqrt(max(((k - mean) ** 2 * s).sum(), 0.0))),
        "median_path_length": float(k[np.searchsorted(df["cdf"].to_numpy(), 0.5)]),
        f"share_le_{threshold}": float(s[k <= threshold].sum()),
    }
