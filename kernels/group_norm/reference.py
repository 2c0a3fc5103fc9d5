"""PyTorch reference of GroupNorm (+ SiLU) with float32 statistics, the result in the input's dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_args(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
               fn: str = "group_norm_act") -> None:
    if x.dim() < 2 or groups < 1 or x.shape[1] % groups:
        raise ValueError(f"{fn}: x (N, C, ...) with C a multiple of groups expected, got "
                         f"{tuple(x.shape)} and groups={groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (x.shape[1],):
            raise ValueError(f"{fn}: {name} of shape ({x.shape[1]},) expected, got {tuple(t.shape)}")


def group_norm_act_reference(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                             eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """``F.group_norm`` on a float32 copy (biased variance, as ``nn.GroupNorm``), then SiLU if asked, cast back."""
    check_args(x, groups, weight, bias)
    y = F.group_norm(x.float(), groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return (F.silu(y) if silu else y).to(x.dtype)


def check_segments(x: torch.Tensor, offsets, groups: int, weight: torch.Tensor | None,
                   bias: torch.Tensor | None) -> None:
    if x.dim() != 2:
        raise ValueError(f"segment_group_norm_act: x (N, C) expected, got {tuple(x.shape)}")
    check_args(x, groups, weight, bias, "segment_group_norm_act")
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != x.shape[0] or any(
            b < a for a, b in zip(offsets, offsets[1:])):
        raise ValueError(f"segment_group_norm_act: offsets must rise from 0 to {x.shape[0]} rows, got "
                         f"{list(offsets)[:8]}{'...' if len(offsets) > 8 else ''}")


def segment_group_norm_act_reference(x: torch.Tensor, offsets, groups: int, weight: torch.Tensor | None,
                                     bias: torch.Tensor | None, eps: float = 1e-5,
                                     silu: bool = False) -> torch.Tensor:
    """GroupNorm of each shape's rows x[offsets[s]:offsets[s + 1]] (N, C) over its rows and each group's
    channels, statistics summed in float64 (float32 sums over millions of voxels drift by 1e-3), the affine
    map and SiLU in float32 for half-precision input, the result in x's dtype."""
    check_segments(x, offsets, groups, weight, bias)
    f = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    f = f.reshape(x.shape[0], groups, -1)
    # The sums run over the rows first (one column per channel: a reduction with C outputs, where reducing
    # rows and a group's channels at once left only G outputs to spread over the device), and the centred
    # rows are formed once, for the variance and the output. Each shape is normalised on its own rows and the
    # parts joined (indexing (S, G) statistics by a per-row shape index made the backward an index_put over
    # millions of duplicate indices).
    parts = []
    for lo, hi in zip(offsets, offsets[1:]):
        part = f[lo:hi]
        if part.shape[0] == 0:
            parts.append(part)
            continue
        count = part.shape[0] * part.shape[2]
        m = part.sum(0, dtype=torch.float64).sum(1) / count
        d = part - m.to(f.dtype)[None, :, None]
        var = d.square().sum(0, dtype=torch.float64).sum(1) / count
        parts.append(d * torch.rsqrt(var.to(f.dtype) + eps)[None, :, None])
    out = (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(x.shape[0], -1)
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return (F.silu(out) if silu else out).to(x.dtype)
