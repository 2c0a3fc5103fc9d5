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


@triton.jit
def _head_rms_norm_bwd_kernel(X, G, DY, DX, DG, T, H, D, scale, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program takes BLOCK_T tokens of one head: dx for its rows and one partial row of dgamma (no atomics)."""
    pt, h = tl.program_id(0), tl.program_id(1)
    tok = pt.to(tl.int64) * BLOCK_T + tl.arange(0, BLOCK_T)
    k = tl.arange(0, BLOCK_D)
    ok = (tok < T)[:, None] & (k < D)[None, :]
    off = (tok * H + h)[:, None] * D + k[None, :]
    x = tl.load(X + off, mask=ok, other=0.0).to(tl.float32)
    dy = tl.load(DY + off, mask=ok, other=0.0).to(tl.float32)
    g = tl.load(G + h * D + k, mask=k < D, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, 1))
    inv = 1.0 / tl.maximum(norm, 1e-12)
    a = dy * g[None, :]
    # d/dx of x / max(|x|, eps): the projection term only where the norm is above the floor
    proj = tl.where(norm > 1e-12, tl.sum(a * x, 1) * inv * inv, 0.0)
    dx = (a - x * proj[:, None]) * (inv * scale)[:, None]
    tl.store(DX + off, dx.to(DX.dtype.element_ty), mask=ok)
    tl.store(DG + (pt * H + h) * D + k, tl.sum(dy * x * (inv * scale)[:, None], 0), mask=k < D)


def head_rms_norm_backward_triton(x: torch.Tensor, gamma: torch.Tensor, dy: torch.Tensor):
    """(dx in x's dtype, dgamma in float32) of head_rms_norm for the upstream gradient dy."""
    h, d = x.shape[-2:]
    t = x.numel() // (h * d)
    dy = dy.contiguous()
    dx = torch.empty_like(x)
    if t == 0:
        return dx, torch.zeros(h, d, device=x.device, dtype=torch.float32)
    block_d = triton.next_power_of_2(d)
    block_t = max(1, min(128, 4096 // block_d))
    nt = triton.cdiv(t, block_t)
    part = torch.empty(nt, h, d, device=x.device, dtype=torch.float32)
    _head_rms_norm_bwd_kernel[(nt, h)](x, gamma.contiguous(), dy, dx, part, t, h, d, float(d) ** 0.5,
                                       BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4)
    return dx, part.sum(0)
