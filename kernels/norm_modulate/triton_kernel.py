"""Triton norm_modulate by shape segments: programs own up to CHUNK consecutive rows of one shape (a
host-built table) and normalise BLOCK_M rows of W values at a time (W ≤ BLOCK_W, one tile a row) in float32:
y = (x − mean)·rstd·a[s] + c[s]. The backward writes dx and each program's partial rows of da and dc."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


# A program loads its shape's row of a and c once, and the backward sums dy·x̂ and dy over its rows into one
# partial row of da and dc: no atomics, the partials summed per shape afterwards in a fixed order.

CHUNK = 64


@triton.jit
def _program_rows(PSTART, PEND, PROW, A, W, sa, BLOCK_W: tl.constexpr):
    """This program's rows [start, end), its row r of a and c, the channel offsets, and a[r] in float32."""
    pid = tl.program_id(0)
    start = tl.load(PSTART + pid).to(tl.int64)
    end = tl.load(PEND + pid).to(tl.int64)
    r = tl.load(PROW + pid).to(tl.int64)
    k = tl.arange(0, BLOCK_W)
    kok = k < W
    a = tl.load(A + r * sa + k, mask=kok, other=0.0).to(tl.float32)
    return pid, start, end, r, k, kok, a


@triton.jit
def _nm_seg_fwd_kernel(X, A, C, Y, MEAN, RSTD, PSTART, PEND, PROW, W, sx, sy, sa, eps,
                       BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
    pid, start, end, r, k, kok, a = _program_rows(PSTART, PEND, PROW, A, W, sa, BLOCK_W)
    c = tl.load(C + r * sa + k, mask=kok, other=0.0).to(tl.float32)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        mok = m < end
        ok = mok[:, None] & kok[None, :]
        x = tl.load(X + m[:, None] * sx + k[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.sum(x, 1) / W
        d = tl.where(ok, x - mean[:, None], 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / W + eps)
        tl.store(MEAN + m, mean, mask=mok)
        tl.store(RSTD + m, rstd, mask=mok)
        y = d * rstd[:, None] * a[None, :] + c[None, :]
        tl.store(Y + m[:, None] * sy + k[None, :], y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _nm_seg_bwd_kernel(X, DY, A, MEAN, RSTD, DX, PA, PC, PSTART, PEND, PROW, W, sx, sdy, sdx, sa,
                       BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
    pid, start, end, r, k, kok, a = _program_rows(PSTART, PEND, PROW, A, W, sa, BLOCK_W)
    acc_a = tl.zeros([BLOCK_W], dtype=tl.float32)
    acc_c = tl.zeros([BLOCK_W], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        mok = m < end
        ok = mok[:, None] & kok[None, :]
        x = tl.load(X + m[:, None] * sx + k[None, :], mask=ok, other=0.0).to(tl.float32)
        dy = tl.load(DY + m[:, None] * sdy + k[None, :], mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(MEAN + m, mask=mok, other=0.0)
        rstd = tl.load(RSTD + m, mask=mok, other=0.0)
        xh = tl.where(ok, (x - mean[:, None]) * rstd[:, None], 0.0)
        acc_a += tl.sum(dy * xh, 0)
        acc_c += tl.sum(dy, 0)
        g = dy * a[None, :]
        c1 = tl.sum(g * xh, 1) / W
        c2 = tl.sum(g, 1) / W
        dx = (g - c2[:, None] - xh * c1[:, None]) * rstd[:, None]
        tl.store(DX + m[:, None] * sdx + k[None, :], dx.to(DX.dtype.element_ty), mask=ok)
    tl.store(PA + pid * W + k, acc_a, mask=kok)
    tl.store(PC + pid * W + k, acc_c, mask=kok)


_TABLES: dict = {}


def chunk_table(offsets, rows_of_a: int, device: torch.device):
    """(starts, ends, row of a per program) as int32 device tensors, and the programs per row of a: each
    shape's rows cut into CHUNK-row programs (empty shapes get none). Kept for the last few offsets (a
    training step's blocks share one)."""
    key = (tuple(offsets), rows_of_a, str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    starts, ends, prow = [], [], []
    per_row = [0] * rows_of_a
    for s, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        r = s if rows_of_a > 1 else 0
        for m in range(lo, hi, CHUNK):
            starts.append(m)
            ends.append(min(m + CHUNK, hi))
            prow.append(r)
            per_row[r] += 1
    table = torch.tensor([starts, ends, prow], dtype=torch.int32).to(device, non_blocking=True)
    if len(_TABLES) >= 8:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = hit = (table[0], table[1], table[2], per_row)
    return hit


def _launch_shape(w: int):
    # about 16 float32 values a thread for each of the tiles live at once: no spills
    block_w = triton.next_power_of_2(w)
    return block_w, max(1, min(16, 4096 // block_w)), 4 if block_w < 1024 else 8


def seg_forward(x, a, c, offsets, eps, out_dtype):
    n, w = x.shape
    y = torch.empty((n, w), dtype=out_dtype, device=x.device)
    mean = torch.empty(n, dtype=torch.float32, device=x.device)
    rstd = torch.empty(n, dtype=torch.float32, device=x.device)
    starts, ends, prow, _ = chunk_table(offsets, a.shape[0], x.device)
    if starts.numel():
        block_w, block_m, warps = _launch_shape(w)
        _nm_seg_fwd_kernel[(starts.numel(),)](x, a, c, y, mean, rstd, starts, ends, prow, w, x.stride(0),
                                              y.stride(0), a.stride(0), eps, BLOCK_M=block_m, BLOCK_W=block_w,
                                              num_warps=warps)
    return y, mean, rstd


def seg_backward(x, dy, a, mean, rstd, offsets):
    """(dx in x's dtype, da and dc in float32 with a's rows)."""
    n, w = x.shape
    dy = dy if dy.stride(1) == 1 else dy.contiguous()
    dx = torch.empty_like(x, memory_format=torch.contiguous_format)
    starts, ends, prow, per_row = chunk_table(offsets, a.shape[0], x.device)
    p = starts.numel()
    part = torch.empty((2, p, w), dtype=torch.float32, device=x.device)
    if p:
        block_w, block_m, warps = _launch_shape(w)
        _nm_seg_bwd_kernel[(p,)](x, dy, a, mean, rstd, dx, part[0], part[1], starts, ends, prow, w, x.stride(0),
                                 dy.stride(0), dx.stride(0), a.stride(0), BLOCK_M=block_m, BLOCK_W=block_w,
                                 num_warps=warps)
    sums = _shape_sums(part, per_row, a.shape[0])
    return dx, sums[0], sums[1]


@triton.jit
def _gr_seg_fwd_kernel(X, H, G, Y, PSTART, PEND, PROW, W, sx, sh, sy, sg,
                       BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
    pid, start, end, r, k, kok, g = _program_rows(PSTART, PEND, PROW, G, W, sg, BLOCK_W)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        ok = (m < end)[:, None] & kok[None, :]
        x = tl.load(X + m[:, None] * sx + k[None, :], mask=ok, other=0.0).to(tl.float32)
        h = tl.load(H + m[:, None] * sh + k[None, :], mask=ok, other=0.0).to(tl.float32)
        tl.store(Y + m[:, None] * sy + k[None, :], (x + h * g[None, :]).to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _gr_seg_bwd_kernel(DY, H, G, DH, PG, PSTART, PEND, PROW, W, sdy, sh, sdh, sg,
                       BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
    pid, start, end, r, k, kok, g = _program_rows(PSTART, PEND, PROW, G, W, sg, BLOCK_W)
    acc = tl.zeros([BLOCK_W], dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        ok = (m < end)[:, None] & kok[None, :]
        dy = tl.load(DY + m[:, None] * sdy + k[None, :], mask=ok, other=0.0).to(tl.float32)
        h = tl.load(H + m[:, None] * sh + k[None, :], mask=ok, other=0.0).to(tl.float32)
        acc += tl.sum(dy * h, 0)
        tl.store(DH + m[:, None] * sdh + k[None, :], (dy * g[None, :]).to(DH.dtype.element_ty), mask=ok)
    tl.store(PG + pid * W + k, acc, mask=kok)


def _shape_sums(part: torch.Tensor, per_row: list[int], rows: int) -> torch.Tensor:
    """Each shape's partial rows summed in a fixed order (programs come in shape order)."""
    sums = torch.zeros((*part.shape[:-2], rows, part.shape[-1]), dtype=torch.float32, device=part.device)
    lo = 0
    for r, cnt in enumerate(per_row):
        if cnt:
            sums[..., r, :] = part[..., lo:lo + cnt, :].sum(-2)
        lo += cnt
    return sums


def gr_forward(x, h, g, offsets, out_dtype):
    n, w = x.shape
    y = torch.empty((n, w), dtype=out_dtype, device=x.device)
    starts, ends, prow, _ = chunk_table(offsets, g.shape[0], x.device)
    if starts.numel():
        block_w, block_m, warps = _launch_shape(w)
        _gr_seg_fwd_kernel[(starts.numel(),)](x, h, g, y, starts, ends, prow, w, x.stride(0), h.stride(0),
                                              y.stride(0), g.stride(0), BLOCK_M=block_m, BLOCK_W=block_w,
                                              num_warps=warps)
    return y


def gr_backward(dy, h, g, offsets):
    """(dh in h's dtype, dg in float32 with g's rows); dx is dy itself."""
    n, w = h.shape
    dy = dy if dy.stride(1) == 1 else dy.contiguous()
    dh = torch.empty((n, w), dtype=h.dtype, device=h.device)
    starts, ends, prow, per_row = chunk_table(offsets, g.shape[0], h.device)
    p = starts.numel()
    part = torch.empty((p, w), dtype=torch.float32, device=h.device)
    if p:
        block_w, block_m, warps = _launch_shape(w)
        _gr_seg_bwd_kernel[(p,)](dy, h, g, dh, part, starts, ends, prow, w, dy.stride(0), h.stride(0),
                                 dh.stride(0), g.stride(0), BLOCK_M=block_m, BLOCK_W=block_w, num_warps=warps)
    return dh, _shape_sums(part, per_row, g.shape[0])
