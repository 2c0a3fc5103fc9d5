"""Triton kernel of the adaptive 3³ filter: one launch per pass, every tap and channel of a block of voxels
in registers, the 27 weights normalised in the kernel (no normalised copy of the 27-channel tensor)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dense_taps import tap_neighbour, voxel_block


@triton.jit
def _smooth_pass_kernel(X, Wt, Y, D, H, W, C: tl.constexpr, C_PAD: tl.constexpr, BLOCK: tl.constexpr):
    """Y[b, :, v] = Σ_o ŵ_o(v) · X[b, :, v + o − 1] for the BLOCK voxels v of program (block, b)."""
    b = tl.program_id(1).to(tl.int64)
    n = D * H * W
    v, live, vz, vy, vx = voxel_block(D, H, W, BLOCK)
    wbase = Wt + b * 27 * n
    norm = tl.zeros([BLOCK], tl.float32)
    for o in tl.static_range(27):
        norm += tl.abs(tl.load(wbase + o * n + v, mask=live, other=0.0).to(tl.float32))
    inv = 1.0 / tl.maximum(norm, 1e-12)
    ch = tl.arange(0, C_PAD)
    cmask = ch < C
    xbase = X + b * C * n + ch.to(tl.int64)[:, None] * n
    acc = tl.zeros([C_PAD, BLOCK], tl.float32)
    for o in tl.static_range(27):
        nb, ok = tap_neighbour(vz, vy, vx, live, D, H, W, o)
        wo = tl.load(wbase + o * n + v, mask=live, other=0.0).to(tl.float32) * inv
        xv = tl.load(xbase + nb[None, :], mask=cmask[:, None] & ok[None, :], other=0.0).to(tl.float32)
        acc += xv * wo[None, :]
    tl.store(Y + b * C * n + ch.to(tl.int64)[:, None] * n + v[None, :], acc, mask=cmask[:, None] & live[None, :])


def adaptive_smooth_triton(x: torch.Tensor, weights: torch.Tensor, times: int = 3, block: int = 256) -> torch.Tensor:
    b, c, d, h, w = x.shape
    n = d * h * w
    src = x.float().contiguous()
    wt = weights.contiguous()
    bufs = [torch.empty_like(src), torch.empty_like(src) if times > 1 else None]
    grid = (triton.cdiv(n, block), b)
    for t in range(times):
        dst = bufs[t % 2]
        _smooth_pass_kernel[grid](src, wt, dst, d, h, w, C=c, C_PAD=triton.next_power_of_2(c), BLOCK=block,
                                  num_warps=4)
        src = dst
    return src.to(x.dtype)
