"""Triton kernel of the dense 3³ convolution for few channels: a program owns BLOCK voxels of one sample
(flattened D·H·W order) and accumulates, for each of the 27 taps, (BLOCK, C_in chunk) neighbour values times
that tap's (C_in chunk, C_out) weights on the tensor cores, in float32. Neighbours come from the caches (a
voxel is read by the 27 programs' taps around it); nothing is written but the output. For up to 8 input
channels a second kernel (``_conv3_packed_kernel``) runs the same sum as an implicit GEMM whose K chunks span
several taps' channels, so no product is padded from C_in to 16."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.dense_taps import tap_neighbour, voxel_block


@triton.jit
def _mma(acc, a, w, IEEE: tl.constexpr):
    """acc + a · w on the tensor cores; float32 inputs in full precision (the interpreter tests' dtype)."""
    if IEEE:
        return acc + tl.dot(a, w, input_precision="ieee")
    return acc + tl.dot(a, w)


@triton.jit
def _store(acc, Bias, Y, b, n, v, live, co, COUT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """Y[b, co, v] = acc (+ bias), in Y's dtype, for the live voxels and the real output channels."""
    if HAS_BIAS:
        acc += tl.load(Bias + co, mask=co < COUT, other=0.0).to(tl.float32)[None, :]
    tl.store(Y + b * COUT * n + co.to(tl.int64)[None, :] * n + v[:, None], acc.to(Y.dtype.element_ty),
             mask=live[:, None] & (co < COUT)[None, :])


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
            acc = _mma(acc, a, w, IEEE)
    _store(acc, Bias, Y, b, n, v, live, co, COUT, HAS_BIAS)


@triton.jit
def _conv3_packed_kernel(X, Wp, Bias, Y, D, H, W, CIN: tl.constexpr, CIN_P: tl.constexpr, COUT: tl.constexpr,
                         COUT_P: tl.constexpr, KC: tl.constexpr, K_PAD: tl.constexpr, HAS_BIAS: tl.constexpr,
                         IEEE: tl.constexpr, BLOCK: tl.constexpr):
    """The same convolution for C_in <= 8 as an implicit GEMM over k = tap · CIN_P + c: each (BLOCK, KC) chunk
    of neighbour values spans several taps, so no product is padded to 16 channels (1 -> 8: one chunk of 32
    instead of 27 products); Wp is (K_PAD, COUT_P), rows k, zeros past 27 · CIN_P, C_in and C_out."""
    b = tl.program_id(1).to(tl.int64)
    n = D * H * W
    v, live, vz, vy, vx = voxel_block(D, H, W, BLOCK)
    co = tl.arange(0, COUT_P)
    xbase = X + b * CIN * n
    acc = tl.zeros([BLOCK, COUT_P], tl.float32)
    for k0 in tl.static_range(0, K_PAD, KC):
        k = k0 + tl.arange(0, KC)
        tap = k // CIN_P
        c = k % CIN_P
        zz = vz[:, None] + (tap // 9 - 1)[None, :]
        yy = vy[:, None] + (tap // 3 % 3 - 1)[None, :]
        xx = vx[:, None] + (tap % 3 - 1)[None, :]
        ok = (live[:, None] & ((tap < 27) & (c < CIN))[None, :] & (zz >= 0) & (zz < D) & (yy >= 0) & (yy < H)
              & (xx >= 0) & (xx < W))
        a = tl.load(xbase + c.to(tl.int64)[None, :] * n + (zz * H + yy) * W + xx, mask=ok, other=0.0)
        w = tl.load(Wp + k[:, None] * COUT_P + co[None, :])
        acc = _mma(acc, a, w, IEEE)
    _store(acc, Bias, Y, b, n, v, live, co, COUT, HAS_BIAS)


def pack_weight_k(weight: torch.Tensor, dtype: torch.dtype, cin_p: int, k_pad: int, cout_p: int) -> torch.Tensor:
    """(C_out, C_in, 3, 3, 3) -> (k_pad, cout_p): row tap · cin_p + c, zeros elsewhere."""
    cout, cin = weight.shape[:2]
    wp = torch.zeros(27, cin_p, cout_p, device=weight.device, dtype=dtype)
    wp[:, :cin, :cout] = weight.reshape(cout, cin, 27).permute(2, 1, 0).to(dtype)
    out = torch.zeros(k_pad, cout_p, device=weight.device, dtype=dtype)
    out[:27 * cin_p] = wp.reshape(27 * cin_p, cout_p)
    return out


def pack_weight(weight: torch.Tensor, dtype: torch.dtype, ck: int, cout_p: int) -> torch.Tensor:
    """(C_out, C_in, 3, 3, 3) -> (27, C_in rounded up to ck, cout_p) in ``dtype``, taps in (z, y, x) order."""
    cout, cin = weight.shape[:2]
    cin_p = triton.cdiv(cin, ck) * ck
    wp = torch.zeros(27, cin_p, cout_p, device=weight.device, dtype=dtype)
    wp[:, :cin, :cout] = weight.reshape(cout, cin, 27).permute(2, 1, 0).to(dtype)
    return wp


# Inputs of at most this many channels take the packed kernel by default (0: the per-tap kernel for every call).
PACKED_MAX_CIN = 8


def conv3d_3x3_triton(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      block: int | None = None, num_warps: int = 4, packed: bool | None = None,
                      kc: int | None = None) -> torch.Tensor:
    """``packed`` (default: C_in <= PACKED_MAX_CIN) picks the implicit-GEMM kernel over (tap, channel) chunks
    of ``kc`` (default 32 for up to 16 padded output channels, 16 above) with ``block`` voxels a program
    (default 128; 256 for the per-tap kernel): the fastest of each on an H100 (benchmarks/refiner.py --convs)."""
    b, cin, d, h, w = x.shape
    cout = weight.shape[0]
    cout_p = max(16, triton.next_power_of_2(cout))
    packed = cin <= PACKED_MAX_CIN if packed is None else packed
    x = x.contiguous()
    y = torch.empty(b, cout, d, h, w, device=x.device, dtype=x.dtype)
    n = d * h * w
    if n == 0 or b == 0:
        return y
    block = block or (128 if packed else 256)
    grid = (triton.cdiv(n, block), b)
    ieee = x.dtype == torch.float32
    if packed:
        kc = kc or (32 if cout_p <= 16 else 16)
        cin_p = triton.next_power_of_2(cin)
        k_pad = triton.cdiv(27 * cin_p, kc) * kc
        wp = pack_weight_k(weight, x.dtype, cin_p, k_pad, cout_p)
        _conv3_packed_kernel[grid](x, wp, bias if bias is not None else wp, y, d, h, w, CIN=cin, CIN_P=cin_p,
                                   COUT=cout, COUT_P=cout_p, KC=kc, K_PAD=k_pad, HAS_BIAS=bias is not None,
                                   IEEE=ieee, BLOCK=block, num_warps=num_warps)
        return y
    ck = max(16, min(32, triton.next_power_of_2(cin)))
    wp = pack_weight(weight, x.dtype, ck, cout_p)
    _conv3_kernel[grid](x, wp, bias if bias is not None else wp, y, d, h, w, CIN=cin, COUT=cout, CK=ck,
                        COUT_P=cout_p, HAS_BIAS=bias is not None, IEEE=ieee, BLOCK=block, num_warps=num_warps)
    return y
