"""Building blocks: a convolution with a fast path on 2×2 maps, scalar gates, biases and skip
scales, the Residual wrapper, normalization layers, weight-standardized layers."""

from depthlab.nn import fusion
from depthlab.nn.conv import Conv2d, conv3x3_2x2
from depthlab.nn.norm import (
    DistributedBatchNorm,
    ReferenceBatchNorm,
    ReferenceLayerNorm,
    convert_distributed_batchnorm,
    create_norm,
)
from depthlab.nn.residual import Branch, Residual, residual_blocks, weight_layers
from depthlab.nn.scalars import Bias, FeatureScale, Gate, Scale
from depthlab.nn.transformer import MultiHeadAttention, ReZeroDecoderLayer, ReZeroEncoderLayer
from depthlab.nn.ws import WSConv2d, WSLinear, activation_gain

__all__ = [
    "Bias",
    "Branch",
    "Conv2d",
    "conv3x3_2x2",
    "fusion",
    "FeatureScale",
    "Scale",
    "WSConv2d",
    "WSLinear",
    "activation_gain",
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
