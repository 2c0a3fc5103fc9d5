"""Dense 3³ convolution (stride 1, zero padding 1) for few channels: the refiners' 192³ layers.

``conv3d_3x3(x, weight, bias)`` computes ``F.conv3d(x, weight, bias, padding=1)``. The released refiners
run their first UNet level and their smoothing-weight nets at 192³ with 1 to 40 input and 1 to 27 output
channels (22 convolutions a patch), where cuDNN runs at 0.5–50 TFLOP/s on an H100. The Triton kernel
(``triton_kernel.py``) treats each tap as a small matrix product on the tensor cores over a block of voxels,
reading neighbours through the caches; float32 accumulation, x's dtype out. It beats cuDNN for up to 8
input channels (1 → 8 3.7×, 8 → 1 4.9×, 8 → 8 1.09×) and loses from 16 (0.66–0.92×), so the refiners call it
for those layers only (``model.refiner.Conv3x3``; benchmarks/RESULTS.md "The refiners"). The kernel on CUDA
tensors (or with TRITON_INTERPRET=1 and backend="triton"), ``F.conv3d`` otherwise.
"""
from __future__ import annotations

import torch

from kernels.backend import use_triton
from kernels.conv3d.reference import check_conv_args, conv3d_3x3_reference

__all__ = ["conv3d_3x3", "conv3d_3x3_reference"]


def conv3d_3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
               backend: str = "auto") -> torch.Tensor:
    """(B, C_in, D, H, W) -> (B, C_out, D, H, W): F.conv3d(x, weight, bias, padding=1)."""
    check_conv_args(x, weight, bias)
    if use_triton(x, backend, "conv3d"):
        from kernels.conv3d.triton_kernel import conv3d_3x3_triton
        return conv3d_3x3_triton(x, weight, bias)
    return conv3d_3x3_reference(x, weight, bias)
