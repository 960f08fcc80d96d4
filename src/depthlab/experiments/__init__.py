"""Reproductions of the published claims, one module per experiment, registered by name.

>>> import depthlab as dl
>>> dl.list_experiments()
>>> dl.run_experiments("path-variance", preset="smoke", out="runs/smoke")
"""

from depthlab.experiments import (  # noqa: F401 - importing registers the experiments
    batch_size,
    bn_signal,
    bn_smoothness,
    deep_fc,
    degeneracy,
    depth_sweep,
    fc_convergence,
    fixup_ablation,
    grow,
    nonlinear_degeneracy,
    path_variance,
    skipinit_depth,
    transformer_convergence,
    transformer_jacobian,
)
from depthlab.experiments.base import (
    EXPERIMENTS,
    Claim,
    Experiment,
    get_experiment,
    list_experiments,
)
from depthlab.experiments.runner import ExperimentResult
from depthlab.experiments.runner import run as run_experiments

__all__ = [
    "EXPERIMENTS",
    "Claim",
    "Experiment",
    "ExperimentResult",
    "get_experiment",
    "list_experiments",
    "run_experiments",
]
