"""GroupNorm (optionally followed by SiLU) over channel-first tensors with a large spatial extent.

`group_norm_act(x, groups, weight, bias, eps, silu)`: statistics in float32 whatever x's dtype, the result in
x's dtype; what the released refiners' UNets compute per norm (``GroupNorm`` then ``SiLU``). The Triton path
on CUDA tensors (or anywhere when TRITON_INTERPRET=1 and backend="triton"), the PyTorch reference otherwise.

Why a kernel: PyTorch reduces each (sample, group) in one thread block, so a 192³ patch with 4 groups is
reduced by 4 blocks on a 132-SM card, and the reference path (a float32 copy, the norm, a cast back, SiLU)
moves ~28 bytes an element. Here the statistics are split over many programs (a per-tile Welford merge, the
partial results combined by Chan's formula) and one pass normalises, scales, shifts and applies SiLU:
2 bytes read for the statistics and 2 read + 2 written for the output of a half-precision element.
"""
from __future__ import annotations

import torch

from kernels.backend import use_triton
from kernels.group_norm.reference import check_args, group_norm_act_reference

__all__ = ["group_norm_act", "group_norm_act_reference"]


def group_norm_act(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, silu: bool = False, backend: str = "auto") -> torch.Tensor:
    kernel = use_triton(x, backend, "group-norm")
    check_args(x, groups, weight, bias)
    if kernel:
        from kernels.group_norm.triton_kernel import group_norm_act_triton
        return group_norm_act_triton(x, groups, weight, bias, eps, silu)
    return group_norm_act_reference(x, groups, weight, bias, eps, silu)
