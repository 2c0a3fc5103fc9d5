"""Sparse voxel tensors and the layers that run on them."""

from .attention import SparseTransformerBlock, SparseWindowAttention, sinusoidal_positions, window_partition
from .layers import (
    SparseConv3d,
    SparseConvDown,
    SparseDownsample,
    SparseGroupNorm,
    SparseLayerNorm,
    SparseLinear,
    SparseSiLU,
    SparseSubdivide,
    subdivide_structure,
)
from .tensor import SparseTensor

__all__ = [
    "SparseTensor", "SparseLinear", "SparseGroupNorm", "SparseLayerNorm", "SparseSiLU", "SparseConv3d",
    "SparseConvDown", "SparseDownsample", "SparseSubdivide", "subdivide_structure",
    "SparseWindowAttention", "SparseTransformerBlock", "sinusoidal_positions", "window_partition",
]
