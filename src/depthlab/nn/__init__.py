"""Building blocks: scalar gates and biases, the Residual wrapper, normalization layers."""

from depthlab.nn.norm import ReferenceBatchNorm, ReferenceLayerNorm, create_norm
from depthlab.nn.residual import Residual, residual_blocks, weight_layers
from depthlab.nn.scalars import Bias, Gate

__all__ = [
    "Bias",
    "Gate",
    "ReferenceBatchNorm",
    "ReferenceLayerNorm",
    "Residual",
    "create_norm",
    "residual_blocks",
    "weight_layers",
]
