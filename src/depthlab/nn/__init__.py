"""Building blocks: scalar gates and biases, the Residual wrapper, normalization layers."""

from depthlab.nn.norm import (
    DistributedBatchNorm,
    ReferenceBatchNorm,
    ReferenceLayerNorm,
    convert_distributed_batchnorm,
    create_norm,
)
from depthlab.nn.residual import Branch, Residual, residual_blocks, weight_layers
from depthlab.nn.scalars import Bias, Gate
from depthlab.nn.transformer import MultiHeadAttention, ReZeroDecoderLayer, ReZeroEncoderLayer

__all__ = [
    "Bias",
    "Branch",
    "Gate",
    "MultiHeadAttention",
    "ReferenceBatchNorm",
    "ReferenceLayerNorm",
    "ReZeroDecoderLayer",
    "ReZeroEncoderLayer",
    "Residual",
    "create_norm",
    "DistributedBatchNorm",
    "convert_distributed_batchnorm",
    "residual_blocks",
    "weight_layers",
]
