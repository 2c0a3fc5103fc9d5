"""GroupNorm (optionally followed by SiLU): over channel-first tensors with a large spatial extent (the refiners'
dense UNets), and over the rows of packed sparse shapes (the SS-VAE's and the SSA compressors' norms).

`group_norm_act(x, groups, weight, bias, eps, silu)`: statistics in float32 whatever x's dtype, the result in
x's dtype; what the released refiners' UNets compute per norm (``GroupNorm`` then ``SiLU``). The Triton path
on CUDA tensors (or anywhere when TRITON_INTERPRET=1 and backend="triton"), the PyTorch reference otherwise.

Why a kernel: PyTorch reduces each (sample, group) in one thread block, so a 192³ patch with 4 groups is
reduced by 4 blocks on a 132-SM card, and the reference path (a float32 copy, the norm, a cast back, SiLU)
moves ~28 bytes an element. Here the statistics are split over many programs (a per-tile Welford merge, the
partial results combined by Chan's formula) and one pass normalises, scales, shifts and applies SiLU:
2 bytes read for the statistics and 2 read + 2 written for the output of a half-precision element.

`segment_group_norm_act(x, offsets, groups, weight, bias, eps, silu)`: x (N, C) with shape s on the rows
offsets[s]:offsets[s + 1], statistics per (shape, group); differentiable in x, weight and bias. The PyTorch
path sums in float64 and takes ten or more kernels a norm (float copies, two reductions per statistic, the
centring, the affine map, SiLU, the cast); at the 512 stage's 10,704 tokens a compressor's norm is a few
microseconds of data, so those launches were the cost. The Triton path (kernels/group_norm/segments.py) is
three kernels forward and three backward, with Chan-merged float32 statistics.
"""
from __future__ import annotations

import torch

from kernels.backend import use_triton
from kernels.group_norm.reference import (check_args, check_segments, group_norm_act_reference,
                                          segment_group_norm_act_reference)

__all__ = ["group_norm_act", "group_norm_act_reference", "segment_group_norm_act", "segment_group_norm_act_reference"]


def group_norm_act(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float = 1e-5, silu: bool = False, backend: str = "auto") -> torch.Tensor:
    kernel = use_triton(x, backend, "group-norm")
    check_args(x, groups, weight, bias)
    if kernel:
        from kernels.group_norm.triton_kernel import group_norm_act_triton
        return group_norm_act_triton(x, groups, weight, bias, eps, silu)
    return group_norm_act_reference(x, groups, weight, bias, eps, silu)


def segment_group_norm_act(x: torch.Tensor, offsets, groups: int, weight: torch.Tensor | None,
                           bias: torch.Tensor | None, eps: float = 1e-5, silu: bool = False,
                           backend: str = "auto") -> torch.Tensor:
    """GroupNorm (then SiLU if asked) of each shape's rows ``x[offsets[s]:offsets[s + 1]]`` (offsets: a host
    sequence from 0 to N), the result in x's dtype; differentiable in x, weight and bias."""
    offsets = tuple(int(o) for o in offsets)
    check_segments(x, offsets, groups, weight, bias)
    if use_triton(x, backend, "group-norm"):
        return _SegmentGroupNorm.apply(x, weight, bias, offsets, groups, eps, silu)
    return segment_group_norm_act_reference(x, offsets, groups, weight, bias, eps, silu)


class _SegmentGroupNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, offsets, groups, eps, silu):
        from kernels.group_norm.segments import seg_forward

        x = x if x.stride(1) == 1 else x.contiguous()
        y, mean, rstd = seg_forward(x, offsets, groups, weight, bias, eps, silu)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        ctx.offsets, ctx.groups, ctx.silu = offsets, groups, silu
        return y

    @staticmethod
    def backward(ctx, dy):
        from kernels.group_norm.segments import seg_backward

        x, weight, bias, mean, rstd = ctx.saved_tensors
        dx, dw, db = seg_backward(x, dy, ctx.offsets, ctx.groups, weight, bias, mean, rstd, ctx.silu)
        return (dx, None if dw is None else dw.to(weight.dtype), None if db is None else db.to(bias.dtype),
                None, None, None, None)
