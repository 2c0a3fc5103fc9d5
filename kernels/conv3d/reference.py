"""PyTorch reference of the dense 3³ convolution (stride 1, zero padding 1) and its argument checks."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_conv_args(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    if x.ndim != 5:
        raise ValueError(f"conv3d_3x3: x must be (B, C, D, H, W), got {tuple(x.shape)}")
    if weight.ndim != 5 or tuple(weight.shape[2:]) != (3, 3, 3) or weight.shape[1] != x.shape[1]:
        raise ValueError(f"conv3d_3x3: weight must be (C_out, {x.shape[1]}, 3, 3, 3), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"conv3d_3x3: bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")


def conv3d_3x3_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.conv3d with a 3³ kernel, stride 1, padding 1: (B, C_in, D, H, W) -> (B, C_out, D, H, W)."""
    check_conv_args(x, weight, bias)
    return F.conv3d(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), padding=1)
