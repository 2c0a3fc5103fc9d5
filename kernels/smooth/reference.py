"""PyTorch reference of the per-voxel adaptive 3³ filter (the released sdf refiner's smoothing)."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_shapes(x: torch.Tensor, weights: torch.Tensor) -> None:
    if x.dim() != 5 or weights.dim() != 5 or weights.shape[1] != 27 or weights.shape[0] != x.shape[0] \
            or weights.shape[2:] != x.shape[2:]:
        raise ValueError(f"adaptive_smooth: x (B, C, D, H, W) and weights (B, 27, D, H, W) expected, "
                         f"got {tuple(x.shape)} and {tuple(weights.shape)}")


def adaptive_smooth_reference(x: torch.Tensor, weights: torch.Tensor, times: int = 3) -> torch.Tensor:
    """``times`` passes of out(v) = Σ_o ŵ_o(v) · x(v + o − 1) with zero padding, ŵ the weights L1-normalised
    over their 27 taps (``F.normalize(p=1)``: divided by max(Σ|w|, 1e-12)). Tap o = 9·i + 3·j + k is the
    offset (i, j, k) ∈ {0, 1, 2}³; the taps are shared by every channel of x.

    x (B, C, D, H, W); weights (B, 27, D, H, W), not yet normalised. Computed in float32, returned in x's dtype."""
    check_shapes(x, weights)
    d, h, w = x.shape[-3:]
    wn = F.normalize(weights.float(), p=1, dim=1)
    y = x.float()
    for _ in range(times):
        yp = F.pad(y, (1, 1, 1, 1, 1, 1))
        out = torch.zeros_like(y)
        for o in range(27):
            i, j, k = o // 9, o // 3 % 3, o % 3
            out = out + yp[:, :, i:i + d, j:j + h, k:k + w] * wn[:, o:o + 1]
        y = out
    return y.to(x.dtype)
