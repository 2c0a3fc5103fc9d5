"""Per-voxel adaptive 3³ smoothing (the released sdf refiner's three smoothing steps).

`adaptive_smooth(x, weights, times)`: ``times`` passes of out(v) = Σ_o ŵ_o(v) · x(v + o − 1), zero padding,
ŵ the 27 weights of each voxel L1-normalised. The Triton kernel on CUDA tensors (or anywhere when
TRITON_INTERPRET=1 and backend="triton"), the PyTorch reference otherwise; float32 arithmetic, x's dtype out.
The reference takes 27 slice-multiply-adds a pass over whole (B, C, D, H, W) tensors; the kernel reads each
block of voxels' neighbours and weights once a pass.
"""
from __future__ import annotations

import torch

from kernels.backend import use_triton
from kernels.smooth.reference import adaptive_smooth_reference, check_shapes

__all__ = ["adaptive_smooth", "adaptive_smooth_reference"]


def adaptive_smooth(x: torch.Tensor, weights: torch.Tensor, times: int = 3, backend: str = "auto") -> torch.Tensor:
    kernel = use_triton(x, backend, "smoothing")
    check_shapes(x, weights)
    if kernel:
        from kernels.smooth.triton_kernel import adaptive_smooth_triton
        return adaptive_smooth_triton(x, weights, times)
    return adaptive_smooth_reference(x, weights, times)
