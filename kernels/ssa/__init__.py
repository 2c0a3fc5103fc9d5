"""Spatial Sparse Attention (Direct3D-S2 Sec. 3.3) in Triton, with a plain PyTorch reference."""
from .ops import (attention_reuse, compression_attention, select_blocks, selection_attention, selection_reuse,
                  spatial_sparse_attention, window_attention)
from .reference import ssa_reference
from .structure import SSAStructure, block_order

__all__ = ["SSAStructure", "block_order", "compression_attention", "select_blocks", "selection_attention",
           "window_attention", "spatial_sparse_attention", "ssa_reference", "selection_reuse",
           "attention_reuse"]
