"""PyTorch reference of norm_modulate: float32 LayerNorm, then the per-row affine map, one rounding."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_args(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, rows: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"norm_modulate: x must be (N, W), got {tuple(x.shape)}")
    w = x.shape[1]
    for name, t in (("a", a), ("c", c)):
        if t.dim() != 2 or t.shape[1] != w:
            raise ValueError(f"norm_modulate: {name} must be (R, {w}), got {tuple(t.shape)}")
    if a.shape != c.shape:
        raise ValueError(f"norm_modulate: a {tuple(a.shape)} and c {tuple(c.shape)} differ")
    if rows is None and a.shape[0] != 1:
        raise ValueError(f"norm_modulate: {a.shape[0]} rows of a and c need a row index per token")
    if rows is not None and (rows.dim() != 1 or rows.shape[0] != x.shape[0]):
        raise ValueError(f"norm_modulate: rows must be ({x.shape[0]},), got {tuple(rows.shape)}")
    if rows is not None and (rows.dtype.is_floating_point or rows.dtype.is_complex or rows.dtype == torch.bool):
        raise ValueError(f"norm_modulate: rows must be integer indices, got {rows.dtype}")


def norm_modulate_reference(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, rows: torch.Tensor | None = None,
                            eps: float = 1e-6) -> torch.Tensor:
    y = F.layer_norm(x.float(), x.shape[-1:], eps=eps)
    if rows is not None:
        a, c = a[rows], c[rows]
    return (y * a.float() + c.float()).to(x.dtype)
