"""Triton head_rms_norm: a program scales BLOCK_R rows of D values (one head of one token a row) in float32."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _head_rms_norm_kernel(X, G, Y, R, H, D, scale, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)
    k = tl.arange(0, BLOCK_D)
    ok = (rows < R)[:, None] & (k < D)[None, :]
    x = tl.load(X + rows[:, None] * D + k[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + (rows % H)[:, None] * D + k[None, :], mask=ok, other=0.0).to(tl.float32)
    inv = scale / tl.maximum(tl.sqrt(tl.sum(x * x, 1)), 1e-12)
    tl.store(Y + rows[:, None] * D + k[None, :], (x * inv[:, None] * g).to(Y.dtype.element_ty), mask=ok)


def head_rms_norm_triton(x: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    h, d = x.shape[-2:]
    x = x.contiguous()
    y = torch.empty_like(x)
    r = x.numel() // d
    if r == 0:
        return y
    block_d = triton.next_power_of_2(d)
    block_r = max(1, 4096 // block_d)
    _head_rms_norm_kernel[(triton.cdiv(r, block_r),)](x, gamma.contiguous(), y, r, h, d, float(d) ** 0.5,
                                                      BLOCK_R=block_r, BLOCK_D=block_d, num_warps=4)
    return y
