"""Triton kernel of the dense 3³ convolution for few channels: a program owns BLOCK voxels of one sample
(flattened D·H·W order) and accumulates, for each of the 27 taps, (BLOCK, C_in chunk) neighbour values times
that tap's (C_in chunk, C_out) weights on the tensor cores, in float32. Neighbours come from the caches (a
voxel is read by the 27 programs' taps around it); nothing is written but the output."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dense_taps import tap_neighbour, voxel_block


@triton.jit
def _conv3_kernel(X, Wp, Bias, Y, D, H, W, CIN: tl.constexpr, COUT: tl.constexpr, CK: tl.constexpr,
                  COUT_P: tl.constexpr, HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK: tl.constexpr):
    """Y[b, :, v] = bias + Σ_tap Σ_c Wp[tap, c, :] · X[b, c, v + tap − 1] for the BLOCK voxels v of program
    (block, b); Wp is (27, C_in rounded up to CK, COUT_P) with zeros past C_in and C_out."""
    b = tl.program_id(1).to(tl.int64)
    n = D * H * W
    v, live, vz, vy, vx = voxel_block(D, H, W, BLOCK)
    ck = tl.arange(0, CK)
    co = tl.arange(0, COUT_P)
    xbase = X + b * CIN * n
    acc = tl.zeros([BLOCK, COUT_P], tl.float32)
    for tap in tl.static_range(27):
        nb, ok = tap_neighbour(vz, vy, vx, live, D, H, W, tap)
        for c0 in tl.static_range(0, CIN, CK):
            c = c0 + ck
            a = tl.load(xbase + c.to(tl.int64)[None, :] * n + nb[:, None], mask=ok[:, None] & (c < CIN)[None, :],
                        other=0.0)
            w = tl.load(Wp + (tap * ((CIN + CK - 1) // CK * CK) + c)[:, None] * COUT_P + co[None, :])
            if IEEE:
                acc += tl.dot(a, w, input_precision="ieee")
            else:
                acc += tl.dot(a, w)
    if HAS_BIAS:
        acc += tl.load(Bias + co, mask=co < COUT, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + b * COUT * n + co.to(tl.int64)[None, :] * n + v[:, None], acc.to(Y.dtype.element_ty),
             mask=live[:, None] & (co < COUT)[None, :])


def pack_weight(weight: torch.Tensor, dtype: torch.dtype, ck: int, cout_p: int) -> torch.Tensor:
    """(C_out, C_in, 3, 3, 3) -> (27, C_in rounded up to ck, cout_p) in ``dtype``, taps in (z, y, x) order."""
    cout, cin = weight.shape[:2]
    cin_p = triton.cdiv(cin, ck) * ck
    wp = torch.zeros(27, cin_p, cout_p, device=weight.device, dtype=dtype)
    wp[:, :cin, :cout] = weight.reshape(cout, cin, 27).permute(2, 1, 0).to(dtype)
    return wp


def conv3d_3x3_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      block: int = 256, num_warps: int = 4) -> torch.Tensor:
    b, cin, d, h, w = x.shape
    cout = weight.shape[0]
    ck = max(16, min(32, triton.next_power_of_2(cin)))
    cout_p = max(16, triton.next_power_of_2(cout))
    x = x.contiguous()
    wp = pack_weight(weight, x.dtype, ck, cout_p)
    y = torch.empty(b, cout, d, h, w, device=x.device, dtype=x.dtype)
    n = d * h * w
    if n == 0 or b == 0:
        return y
    grid = (triton.cdiv(n, block), b)
    _conv3_kernel[grid](x, wp, bias if bias is not None else wp, y, d, h, w, CIN=cin, COUT=cout, CK=ck,
                        COUT_P=cout_p, HAS_BIAS=bias is not None, IEEE=x.dtype == torch.float32, BLOCK=block,
                        num_warps=num_warps)
    return y
