"""PyTorch reference of GroupNorm (+ SiLU) with float32 statistics, the result in the input's dtype."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def check_args(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None) -> None:
    if x.dim() < 2 or groups < 1 or x.shape[1] % groups:
        raise ValueError(f"group_norm_act: x (N, C, ...) with C a multiple of groups expected, got "
                         f"{tuple(x.shape)} and groups={groups}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (x.shape[1],):
            raise ValueError(f"group_norm_act: {name} of shape ({x.shape[1]},) expected, got {tuple(t.shape)}")


def group_norm_act_reference(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                             eps: float = 1e-5, silu: bool = False) -> torch.Tensor:
    """``F.group_norm`` on a float32 copy (biased variance, as ``nn.GroupNorm``), then SiLU if asked, cast back."""
    check_args(x, groups, weight, bias)
    y = F.group_norm(x.float(), groups, None if weight is None else weight.float(),
                     None if bias is None else bias.float(), eps)
    return (F.silu(y) if silu else y).to(x.dtype)
