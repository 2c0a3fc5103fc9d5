"""Sparse voxel tensors and the layers that run on them."""

from .attention import SparseTransformerBlock, SparseWindowAttention, window_partition
from .layers import (
    SparseConv3d,
    SparseConvDown,
    SparseDownsample,
    SparseGroupNorm,
    SparseLayerNorm,
    SparseLinear,
    SparseSiLU,
    SparseSubdivide,
    kernel_from_torchsparse,
    kernel_to_torchsparse,
    run_layers,
    subdivide_structure,
)
from .tensor import SparseTensor

__all__ = [
    "SparseTensor", "SparseLinear", "SparseGroupNorm", "SparseLayerNorm", "SparseSiLU", "SparseConv3d",
    "SparseConvDown", "SparseDownsample", "SparseSubdivide", "subdivide_structure",
    "kernel_from_torchsparse", "kernel_to_torchsparse", "run_layers",
    "SparseWindowAttention", "SparseTransformerBlock", "window_partition",
]
