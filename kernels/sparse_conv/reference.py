"""Sparse convolution in plain PyTorch: gather, GEMM, scatter over a kernel map.

The reference for the Triton kernel and the CPU path; autograd differentiates it.
"""

from __future__ import annotations

import torch

from .kernel_map import KernelMap


def sparse_conv_reference(x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """out[o] = Σ_v x[kmap.neighbors[o, v]] @ weight[v]; x (N, Cin), weight (V, Cin, Cout) -> (M, Cout)."""
    nbr = kmap.neighbors.to(torch.int64)
    # half-precision inputs sum their offsets in float32, as the Triton kernel does
    acc = torch.promote_types(x.dtype, torch.float32)
    out = x.new_zeros((kmap.num_outputs, weight.shape[2]), dtype=acc)
    for v in range(kmap.volume):
        rows = torch.nonzero(nbr[:, v] >= 0).squeeze(1)
        if rows.numel():
            out = out.index_add(0, rows, (x[nbr[rows, v]] @ weight[v]).to(acc))
    return out.to(x.dtype)
