"""Diagnostics: pure functions from a model (and a batch) to tidy records (pandas DataFrames).

* :func:`path_variance` — variance share by path length (De & Smith 2020, arXiv 2002.10444);
* :func:`path_decomposition` — the same measured on a real network: the exact sums over paths
  through k branches, their cross terms (Veit et al. 2016, arXiv 1605.06431);
* :func:`signal_propagation` — per-block skip/branch/output variances, channel mean², BN stats
  (Brock et al. 2021, arXiv 2101.08692);
* :func:`jacobian_spectrum` — input-output Jacobian singular values, dense or matrix-free
  (Bachlechner et al. 2020, arXiv 2003.04887);
* :func:`gradient_norms` — per-parameter and per-block activation gradient norms
  (Zhang et al. 2019, arXiv 1901.09321);
* :func:`loss_landscape` — loss and gradient change along the gradient, effective β-smoothness
  (Santurkar et al. 2018, arXiv 1805.11604);
* :func:`critical_point` / :func:`jjt_moments` — the mean-field critical point (σ_w, σ_b) of a
  unit and the spread of a Jacobian spectrum (Pennington et al. 2017, arXiv 1711.04735);
* :func:`degeneracy` — effective/stable rank of weight products, participation ratio, dead ReLUs
  (Orhan & Pitkow 2018, arXiv 1701.09175).

Nothing here plots; :mod:`depthlab.report.plots` draws these frames.
"""

from depthlab.diagnostics.criticality import critical_point, jjt_moments
from depthlab.diagnostics.degeneracy import (
    degeneracy,
    effective_rank,
    layer_maps,
    participation_ratio,
    product_singular_values,
    product_spectrum,
    stable_rank,
)
from depthlab.diagnostics.gradients import block_gradient_summary, gradient_norms
from depthlab.diagnostics.jacobian import (
    calibrate_batchnorm,
    jacobian_spectrum,
    spectrum_summary,
)
from depthlab.diagnostics.landscape import loss_landscape
from depthlab.diagnostics.path_decomposition import path_decomposition
from depthlab.diagnostics.paths import (
    path_summary,
    path_variance,
    path_variance_monte_carlo,
    poisson_binomial_pmf,
)
from depthlab.diagnostics.signal import channel_stats, signal_callback, signal_propagation

__all__ = [
    "block_gradient_summary",
    "calibrate_batchnorm",
    "channel_stats",
    "critical_point",
    "degeneracy",
    "effective_rank",
    "gradient_norms",
    "jacobian_spectrum",
    "jjt_moments",
    "layer_maps",
    "loss_landscape",
    "participation_ratio",
    "path_decomposition",
    "path_summary",
    "path_variance",
    "path_variance_monte_carlo",
    "poisson_binomial_pmf",
    "product_singular_values",
    "product_spectrum",
    "signal_callback",
    "signal_propagation",
    "spectrum_summary",
    "stable_rank",
]
