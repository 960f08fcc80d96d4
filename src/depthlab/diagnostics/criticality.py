"""Mean-field criticality of deep random networks (the edge of chaos).

For a fully connected net ``h_{l+1} = W_l φ(h_l) + b_l`` with ``W_l`` entries of variance
``σ_w²/n`` (Gaussian, or ``σ_w`` times an orthogonal matrix) and biases ``N(0, σ_b²)``, the
pre-activation variance follows ``q_{l+1} = σ_w² E[φ(√q_l z)²] + σ_b²`` (z ~ N(0, 1)) to a fixed
point ``q*``, and the mean squared singular value of one layer's Jacobian ``W D(h)`` is
``χ = σ_w² E[φ'(√q* z)²]``. The network is *critical* when ``χ = 1``: gradients neither explode
nor vanish on average (Poole et al. 2016, arXiv 1606.05340; Schoenholz et al. 2017,
arXiv 1611.01232). Pennington, Schoenholz & Ganguli 2017, "Resurrecting the sigmoid in deep
learning through dynamical isometry" (arXiv 1711.04735) show that at criticality the whole
*spectrum* of ``J Jᵀ`` matters: with orthogonal weights and a hard-tanh (or erf) at small ``q*``
its variance stays near 0 at any depth (dynamical isometry), while ReLU nets and Gaussian
weights have a variance that grows linearly with depth.

:func:`critical_point` solves the two equations for ``(σ_w, σ_b)`` given ``q*``;
:func:`jjt_moments` gives the mean and variance of the eigenvalues of ``J Jᵀ`` from singular
values, the paper's measure of the spread.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import numpy as np
import torch

from depthlab.registry import DepthlabError, unknown_choice

#: φ and φ' (NumPy) of the activations with a mean-field critical point
_PHI: dict[str, tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]] = {
    "linear": (lambda h: h, np.ones_like),
    "relu": (lambda h: np.maximum(h, 0.0), lambda h: (h > 0).astype(float)),
    "tanh": (np.tanh, lambda h: 1.0 - np.tanh(h) ** 2),
    "hardtanh": (lambda h: np.clip(h, -1.0, 1.0), lambda h: (np.abs(h) < 1).astype(float)),
    "sigmoid": (
        lambda h: 1.0 / (1.0 + np.exp(-h)),
        lambda h: np.exp(-h) / (1.0 + np.exp(-h)) ** 2,
    ),
}

_NODES, _WEIGHTS = np.polynomial.hermite_e.hermegauss(201)  # ∫ f(z) N(z; 0, 1) dz
_WEIGHTS = _WEIGHTS / math.sqrt(2 * math.pi)


def gaussian_expectation(f: Callable[[np.ndarray], np.ndarray], q: float) -> float:
    """``E[f(√q z)]`` for z ~ N(0, 1), by 201-point Gauss–Hermite quadrature."""
    return float(np.sum(_WEIGHTS * f(math.sqrt(q) * _NODES)))


def _moments(activation: str, q: float) -> tuple[float, float]:
    """``(E[φ'(√q z)²], E[φ(√q z)²])``: closed forms for the piecewise-linear units (whose kinks
    quadrature would miss), Gauss–Hermite quadrature for the smooth ones."""
    if activation == "linear":
        return 1.0, q
    if activation == "relu":
        return 0.5, q / 2
    if activation == "hardtanh":  # a = 1/√q: P(|z| < a), q E[z² 1{|z|<a}] + P(|z| ≥ a)
        a = 1 / math.sqrt(q)
        inside = math.erf(a / math.sqrt(2))
        pdf = math.exp(-a * a / 2) / math.sqrt(2 * math.pi)
        return inside, q * (inside - 2 * a * pdf) + (1 - inside)
    phi, dphi = _PHI[activation]
    return (
        gaussian_expectation(lambda h: dphi(h) ** 2, q),
        gaussian_expectation(lambda h: phi(h) ** 2, q),
    )


def critical_point(activation: str, q_star: float = 1 / 64) -> tuple[float, float]:
    """``(σ_w, σ_b)`` on the critical line ``χ = 1`` whose variance fixed point is ``q_star``.

    ``σ_w² = 1 / E[φ'(√q* z)²]`` and ``σ_b² = q* − σ_w² E[φ(√q* z)²]``. ReLU and linear units
    are critical at σ_w = √2 and 1 with σ_b = 0 for every q*. Raises :class:`DepthlabError` when
    no σ_b ≥ 0 reaches ``q_star`` (e.g. the sigmoid, whose mean is not 0).
    """
    if activation not in _PHI:
        raise unknown_choice("activation with a critical point", activation, sorted(_PHI))
    if not (isinstance(q_star, (int, float)) and math.isfinite(q_star) and q_star > 0):
        raise DepthlabError(f"q_star must be a finite number > 0, got {q_star!r}")
    slope, second = _moments(activation, q_star)
    if slope <= 0:
        raise DepthlabError(f"{activation} has no critical point at q*={q_star:g} (φ' = 0 there)")
    sw2 = 1.0 / slope
    sb2 = q_star - sw2 * second
    if sb2 < -1e-12 * q_star:
        raise DepthlabError(
            f"{activation} has no critical point with variance q*={q_star:g}: it would need "
            f"σ_b² = {sb2:.3g} < 0; choose another q_star or activation"
        )
    return math.sqrt(sw2), math.sqrt(max(sb2, 0.0))


def jjt_moments(
    singular_values: Iterable[float] | torch.Tensor | np.ndarray,
) -> tuple[float, float]:
    """Mean and variance of the eigenvalues ``λ = s²`` of ``J Jᵀ`` (zeros included): the
    paper's measure of the spread of the spectrum (Pennington et al. 2017, Eq. 5: at criticality
    the mean is 1 and the variance grows linearly with depth unless the net is isometric)."""
    s = np.asarray(
        singular_values.detach().cpu() if isinstance(singular_values, torch.Tensor)
        else list(singular_values) if not isinstance(singular_values, np.ndarray)
        else singular_values,
        dtype=np.float64,
    )  # fmt: skip
    if s.size == 0:
        raise DepthlabError("jjt_moments needs at least one singular value")
    lam = s.ravel() ** 2
    return float(lam.mean()), float(lam.var())
