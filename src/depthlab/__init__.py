"""depthlab: training very deep networks with and without normalization.

>>> import depthlab as dl
>>> m = dl.create_model("resnet", depth=110, scheme="fixup", num_classes=10)
>>> m = dl.create_model("mlp", depth=10_000, width=256, scheme="rezero")
"""

from depthlab.convert import convert
from depthlab.data import DATASETS, create_dataset, list_datasets
from depthlab.diagnostics import (
    critical_point,
    degeneracy,
    gradient_norms,
    jacobian_spectrum,
    jjt_moments,
    loss_landscape,
    path_decomposition,
    path_variance,
    product_spectrum,
    signal_callback,
    signal_propagation,
    spectrum_summary,
)
from depthlab.experiments import EXPERIMENTS, list_experiments, run_experiments
from depthlab.models import MODELS, TransformerSeq2Seq, create_model, list_models
from depthlab.models.grow import grow
from depthlab.nn import Bias, Gate, Residual, residual_blocks
from depthlab.registry import DepthlabError
from depthlab.schemes import SCHEMES, Scheme, get_scheme, list_schemes
from depthlab.train import History, TrainConfig, train

__version__ = "0.1.0"

__all__ = [
    "critical_point",
    "degeneracy",
    "gradient_norms",
    "jacobian_spectrum",
    "jjt_moments",
    "loss_landscape",
    "path_decomposition",
    "path_variance",
    "product_spectrum",
    "signal_callback",
    "signal_propagation",
    "spectrum_summary",
    "DATASETS",
    "EXPERIMENTS",
    "list_experiments",
    "run_experiments",
    "History",
    "TrainConfig",
    "create_dataset",
    "list_datasets",
    "train",
    "MODELS",
    "SCHEMES",
    "Bias",
    "DepthlabError",
    "Gate",
    "Residual",
    "Scheme",
    "TransformerSeq2Seq",
    "convert",
    "create_model",
    "grow",
    "get_scheme",
    "list_models",
    "list_schemes",
    "residual_blocks",
]
