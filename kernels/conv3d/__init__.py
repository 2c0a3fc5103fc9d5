"""Dense 3³ convolution (stride 1, zero padding 1) for few channels: the refiners' 192³ layers.

``conv3d_3x3(x, weight, bias)`` computes ``F.conv3d(x, weight, bias, padding=1)``. The released refiners
run their first UNet level and their smoothing-weight nets at 192³ with 1 to 40 input and 1 to 27 output
channels (22 convolutions a patch), where cuDNN runs at 0.5–50 TFLOP/s on an H100. The Triton kernels
(``triton_kernel.py``) read neighbours through the caches and multiply on the tensor cores in float32
accumulation, x's dtype out. For up to 8 input channels an implicit GEMM packs (tap, channel) pairs into K
chunks of 32 (16 for wider outputs), so a 1 → 8 layer is one product and an 8 → 8 layer seven, where the
per-tap kernel pads each of its 27 products to 16 channels: per layer on an H100 against cuDNN, 8 → 8
1.65× (per tap 1.09×), 8 → 1 7.5× (4.9×), 8 → 27 1.75× (1.23×), 8 → 32 at 96³ 2.2× (1.53×). From 16 input
channels the per-tap kernel loses to cuDNN (0.65–0.92×), so the refiners call the kernels for at most 8
input channels only (``model.refiner.Conv3x3``; benchmarks/RESULTS.md "The refiners"). The kernels on CUDA
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
