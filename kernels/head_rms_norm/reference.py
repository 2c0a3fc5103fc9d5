"""PyTorch reference of head_rms_norm: each head's vector scaled to length sqrt(D), times its gamma."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_args(x: torch.Tensor, gamma: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"head_rms_norm: x must be (..., H, D), got {tuple(x.shape)}")
    if gamma.shape != x.shape[-2:]:
        raise ValueError(f"head_rms_norm: gamma must be (H, D) = {tuple(x.shape[-2:])}, got {tuple(gamma.shape)}")


def head_rms_norm_reference(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """x / max(‖x‖, 1e-12) · sqrt(D) · gamma over the last dimension, in float32, returned in x's dtype."""
    return (F.normalize(x.float(), dim=-1) * gamma.float() * x.shape[-1] ** 0.5).to(x.dtype)
