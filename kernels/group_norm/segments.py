"""Triton GroupNorm (+ SiLU) over the rows of packed shapes, forward and backward.

x is (N, C) with the rows [offsets[s], offsets[s + 1]) belonging to shape s (a sparse tensor's voxels, grouped
by batch element). Statistics are per (shape, group) over that shape's rows and the group's C / G channels, in
float32 whatever x's dtype. A host-built table (cached per layout) cuts each shape's rows into programs of
``span`` rows (whole tiles of BLOCK_R rows, about four waves over the SMs), and every kernel runs over it:

- stats: each program reduces its tiles, merging each tile's (count, mean, M2) per group into its own by Chan's
  formula (no E[x²] − E[x]² cancellation, which is why the PyTorch path sums in float64);
- merge: one program a shape merges its programs' partials in order: mean and 1 / sqrt(var + eps);
- apply: y = (x − mean)·rstd·w + b, then SiLU, in x's dtype;
- backward: each program sums g and g·x̂ per channel over its rows (g = dy through SiLU's derivative), one
  program a shape turns those into the group sums of w·g and w·g·x̂, and a last pass writes
  dx = rstd·(w·g − mean_group(w·g) − x̂·mean_group(w·g·x̂)); dw and db are the partials' column sums.

No atomics anywhere: every sum runs in a fixed order, so results repeat bit for bit.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.group_norm.triton_kernel import _sm_count


@triton.jit
def _program(PSTART, PEND, PSEG):
    pid = tl.program_id(0)
    return pid, tl.load(PSTART + pid).to(tl.int64), tl.load(PEND + pid).to(tl.int64), tl.load(PSEG + pid).to(tl.int64)


@triton.jit
def _channel_stats(SMEAN, SRSTD, W, B, seg, C, CPG, G, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                   BLOCK_C: tl.constexpr):
    """This shape's channels: offsets, mask, mean and rstd of each channel's group, w and b in float32."""
    c = tl.arange(0, BLOCK_C)
    cok = c < C
    grp = seg * G + c // CPG
    mean = tl.load(SMEAN + grp, mask=cok, other=0.0)
    rstd = tl.load(SRSTD + grp, mask=cok, other=0.0)
    w = tl.full([BLOCK_C], 1.0, tl.float32)
    if HAS_W:
        w = tl.load(W + c, mask=cok, other=0.0).to(tl.float32)
    b = tl.zeros([BLOCK_C], tl.float32)
    if HAS_B:
        b = tl.load(B + c, mask=cok, other=0.0).to(tl.float32)
    return c, cok, mean, rstd, w, b


@triton.jit
def _seg_stats_kernel(X, CNT, MEAN, M2, PSTART, PEND, PSEG, CPG, G, sx,
                      BLOCK_R: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_J: tl.constexpr):
    pid, start, end, seg = _program(PSTART, PEND, PSEG)
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_J)
    ch = g[:, None] * CPG + j[None, :]
    chok = (g[:, None] < G) & (j[None, :] < CPG)
    n_acc = tl.full([], 0.0, tl.float32)
    mean_acc = tl.zeros([BLOCK_G], tl.float32)
    m2_acc = tl.zeros([BLOCK_G], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        rok = r < end
        ok = rok[:, None, None] & chok[None, :, :]
        v = tl.load(X + r[:, None, None] * sx + ch[None, :, :], mask=ok, other=0.0).to(tl.float32)
        nb = tl.sum(rok.to(tl.float32), 0) * CPG
        mb = tl.sum(tl.sum(v, 2), 0) / tl.maximum(nb, 1.0)
        dv = tl.where(ok, v - mb[None, :, None], 0.0)
        m2b = tl.sum(tl.sum(dv * dv, 2), 0)
        n_new = n_acc + nb
        delta = mb - mean_acc
        mean_acc = mean_acc + delta * (nb / tl.maximum(n_new, 1.0))
        m2_acc = m2_acc + m2b + delta * delta * (n_acc * nb / tl.maximum(n_new, 1.0))
        n_acc = n_new
    gok = g < G
    tl.store(CNT + pid, n_acc)
    tl.store(MEAN + pid * G + g, mean_acc, mask=gok)
    tl.store(M2 + pid * G + g, m2_acc, mask=gok)


@triton.jit
def _seg_merge_kernel(CNT, MEAN, M2, SMEAN, SRSTD, SFIRST, G, eps, BLOCK_G: tl.constexpr):
    s = tl.program_id(0)
    p0 = tl.load(SFIRST + s)
    p1 = tl.load(SFIRST + s + 1)
    g = tl.arange(0, BLOCK_G)
    gok = g < G
    n_acc = tl.full([], 0.0, tl.float32)
    mean_acc = tl.zeros([BLOCK_G], tl.float32)
    m2_acc = tl.zeros([BLOCK_G], tl.float32)
    for p in range(p0, p1):
        nb = tl.load(CNT + p)
        mb = tl.load(MEAN + p * G + g, mask=gok, other=0.0)
        m2b = tl.load(M2 + p * G + g, mask=gok, other=0.0)
        n_new = n_acc + nb
        delta = mb - mean_acc
        mean_acc = mean_acc + delta * (nb / tl.maximum(n_new, 1.0))
        m2_acc = m2_acc + m2b + delta * delta * (n_acc * nb / tl.maximum(n_new, 1.0))
        n_acc = n_new
    var = m2_acc / tl.maximum(n_acc, 1.0)
    tl.store(SMEAN + s * G + g, mean_acc, mask=gok)
    tl.store(SRSTD + s * G + g, 1.0 / tl.sqrt(var + eps), mask=gok)


@triton.jit
def _seg_apply_kernel(X, Y, SMEAN, SRSTD, W, B, PSTART, PEND, PSEG, C, CPG, G, sx, sy, HAS_W: tl.constexpr,
                      HAS_B: tl.constexpr, SILU: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, start, end, seg = _program(PSTART, PEND, PSEG)
    c, cok, mean, rstd, w, b = _channel_stats(SMEAN, SRSTD, W, B, seg, C, CPG, G, HAS_W, HAS_B, BLOCK_C)
    scale = rstd * w
    shift = b - mean * scale
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok = (r < end)[:, None] & cok[None, :]
        x = tl.load(X + r[:, None] * sx + c[None, :], mask=ok, other=0.0).to(tl.float32)
        y = x * scale[None, :] + shift[None, :]
        if SILU:
            y = y / (1.0 + tl.exp(-y))
        tl.store(Y + r[:, None] * sy + c[None, :], y.to(Y.dtype.element_ty), mask=ok)


@triton.jit
def _grad_tile(X, DY, r, end, c, cok, mean, rstd, w, b, sx, sdy, SILU: tl.constexpr):
    """x̂ and g (dy through SiLU's derivative) of rows r, zero outside the tile."""
    ok = (r < end)[:, None] & cok[None, :]
    x = tl.load(X + r[:, None] * sx + c[None, :], mask=ok, other=0.0).to(tl.float32)
    g = tl.load(DY + r[:, None] * sdy + c[None, :], mask=ok, other=0.0).to(tl.float32)
    xh = tl.where(ok, (x - mean[None, :]) * rstd[None, :], 0.0)
    if SILU:
        pre = xh * w[None, :] + b[None, :]
        sg = 1.0 / (1.0 + tl.exp(-pre))
        g = g * sg * (1.0 + pre * (1.0 - sg))
    return ok, xh, g


@triton.jit
def _seg_bwd_partial_kernel(X, DY, SMEAN, SRSTD, W, B, PA, PB, PSTART, PEND, PSEG, C, CPG, G, sx, sdy,
                            HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                            BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, start, end, seg = _program(PSTART, PEND, PSEG)
    c, cok, mean, rstd, w, b = _channel_stats(SMEAN, SRSTD, W, B, seg, C, CPG, G, HAS_W, HAS_B, BLOCK_C)
    acc_a = tl.zeros([BLOCK_C], tl.float32)
    acc_b = tl.zeros([BLOCK_C], tl.float32)
    for r0 in range(start, end, BLOCK_R):
        ok, xh, g = _grad_tile(X, DY, r0 + tl.arange(0, BLOCK_R), end, c, cok, mean, rstd, w, b, sx, sdy, SILU)
        acc_a += tl.sum(g, 0)
        acc_b += tl.sum(g * xh, 0)
    tl.store(PA + pid * C + c, acc_a, mask=cok)
    tl.store(PB + pid * C + c, acc_b, mask=cok)


@triton.jit
def _seg_bwd_merge_kernel(PA, PB, W, S1, S2, SFIRST, CPG, G, HAS_W: tl.constexpr, BLOCK_G: tl.constexpr,
                          BLOCK_J: tl.constexpr):
    s = tl.program_id(0)
    p0 = tl.load(SFIRST + s)
    p1 = tl.load(SFIRST + s + 1)
    g = tl.arange(0, BLOCK_G)
    j = tl.arange(0, BLOCK_J)
    ch = g[:, None] * CPG + j[None, :]
    chok = (g[:, None] < G) & (j[None, :] < CPG)
    C = G * CPG
    acc_a = tl.zeros([BLOCK_G, BLOCK_J], tl.float32)
    acc_b = tl.zeros([BLOCK_G, BLOCK_J], tl.float32)
    for p in range(p0, p1):
        acc_a += tl.load(PA + p * C + ch, mask=chok, other=0.0)
        acc_b += tl.load(PB + p * C + ch, mask=chok, other=0.0)
    if HAS_W:
        w = tl.load(W + ch, mask=chok, other=0.0).to(tl.float32)
        acc_a = acc_a * w
        acc_b = acc_b * w
    gok = g < G
    tl.store(S1 + s * G + g, tl.sum(acc_a, 1), mask=gok)
    tl.store(S2 + s * G + g, tl.sum(acc_b, 1), mask=gok)


@triton.jit
def _seg_bwd_dx_kernel(X, DY, SMEAN, SRSTD, W, B, S1, S2, OFFS, DX, PSTART, PEND, PSEG, C, CPG, G, sx, sdy, sdx,
                       HAS_W: tl.constexpr, HAS_B: tl.constexpr, SILU: tl.constexpr,
                       BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    pid, start, end, seg = _program(PSTART, PEND, PSEG)
    c, cok, mean, rstd, w, b = _channel_stats(SMEAN, SRSTD, W, B, seg, C, CPG, G, HAS_W, HAS_B, BLOCK_C)
    n = (tl.load(OFFS + seg + 1) - tl.load(OFFS + seg)).to(tl.float32) * CPG
    grp = seg * G + c // CPG
    m1 = tl.load(S1 + grp, mask=cok, other=0.0) / n
    m2 = tl.load(S2 + grp, mask=cok, other=0.0) / n
    for r0 in range(start, end, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        ok, xh, g = _grad_tile(X, DY, r, end, c, cok, mean, rstd, w, b, sx, sdy, SILU)
        dx = (g * w[None, :] - m1[None, :] - xh * m2[None, :]) * rstd[None, :]
        tl.store(DX + r[:, None] * sdx + c[None, :], dx.to(DX.dtype.element_ty), mask=ok)


def _blocks(c: int, groups: int) -> tuple[int, int, int, int]:
    """(BLOCK_C, BLOCK_R, BLOCK_G, BLOCK_J): a tile of about 4,096 values, 32 a thread at 4 warps."""
    block_c = triton.next_power_of_2(c)
    block_g, block_j = triton.next_power_of_2(groups), triton.next_power_of_2(c // groups)
    return block_c, max(1, 4096 // max(block_c, block_g * block_j)), block_g, block_j


_TABLES: dict = {}


def program_table(offsets: tuple[int, ...], block_r: int, device: torch.device):
    """(starts, ends, shape of each program, first program of each shape + the total, offsets) as int32 / int64
    device tensors: each shape's rows cut into spans of whole BLOCK_R tiles, about four waves of programs over
    the SMs in all. Kept for the last few layouts (every norm of a network's forward shares one)."""
    key = (offsets, block_r, str(device))
    hit = _TABLES.get(key)
    if hit is not None:
        return hit
    total = offsets[-1] - offsets[0]
    span = max(1, triton.cdiv(max(total, 1), 4 * _sm_count(device)))
    span = triton.cdiv(span, block_r) * block_r
    starts, ends, segs, first = [], [], [], []
    for s, (lo, hi) in enumerate(zip(offsets, offsets[1:])):
        first.append(len(starts))
        for m in range(lo, hi, span):
            starts.append(m)
            ends.append(min(m + span, hi))
            segs.append(s)
    first.append(len(starts))
    prog = torch.tensor([starts, ends, segs], dtype=torch.int32).reshape(3, -1).to(device, non_blocking=True)
    sfirst = torch.tensor(first, dtype=torch.int32).to(device, non_blocking=True)
    offs = torch.tensor(offsets, dtype=torch.int64).to(device, non_blocking=True)
    if len(_TABLES) >= 16:
        _TABLES.pop(next(iter(_TABLES)))
    _TABLES[key] = hit = (prog[0], prog[1], prog[2], sfirst, offs)
    return hit


def _placeholder(t: torch.Tensor | None, other: torch.Tensor) -> torch.Tensor:
    return t.contiguous() if t is not None else other  # a pointer the kernel never reads when the flag is off


def seg_forward(x: torch.Tensor, offsets: tuple[int, ...], groups: int, weight, bias, eps: float, silu: bool):
    """(y in x's dtype, mean and rstd (S, G) float32)."""
    c = x.shape[1]
    s = len(offsets) - 1
    y = torch.empty_like(x)
    smean = torch.zeros(s, groups, dtype=torch.float32, device=x.device)
    srstd = torch.zeros(s, groups, dtype=torch.float32, device=x.device)
    block_c, block_r, block_g, block_j = _blocks(c, groups)
    starts, ends, segs, sfirst, _ = program_table(offsets, block_r, x.device)
    progs = starts.numel()
    if progs == 0:
        return y, smean, srstd
    cnt = torch.empty(progs, dtype=torch.float32, device=x.device)
    pmean = torch.empty(progs, groups, dtype=torch.float32, device=x.device)
    pm2 = torch.empty(progs, groups, dtype=torch.float32, device=x.device)
    cpg = c // groups
    _seg_stats_kernel[(progs,)](x, cnt, pmean, pm2, starts, ends, segs, cpg, groups, x.stride(0),
                                BLOCK_R=block_r, BLOCK_G=block_g, BLOCK_J=block_j, num_warps=4)
    _seg_merge_kernel[(s,)](cnt, pmean, pm2, smean, srstd, sfirst, groups, eps, BLOCK_G=block_g, num_warps=1)
    _seg_apply_kernel[(progs,)](x, y, smean, srstd, _placeholder(weight, smean), _placeholder(bias, smean),
                                starts, ends, segs, c, cpg, groups, x.stride(0), y.stride(0),
                                HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu,
                                BLOCK_R=block_r, BLOCK_C=block_c, num_warps=4)
    return y, smean, srstd


def seg_backward(x, dy, offsets, groups, weight, bias, smean, srstd, silu: bool):
    """(dx in x's dtype, dw and db as float32 column sums, or None without weight / bias)."""
    c = x.shape[1]
    s = len(offsets) - 1
    dy = dy if dy.stride(1) == 1 else dy.contiguous()
    dx = torch.empty_like(x)
    block_c, block_r, block_g, block_j = _blocks(c, groups)
    starts, ends, segs, sfirst, offs = program_table(offsets, block_r, x.device)
    progs = starts.numel()
    if progs == 0:
        zero = torch.zeros(c, dtype=torch.float32, device=x.device)
        return dx, zero if weight is not None else None, zero if bias is not None else None
    cpg = c // groups
    w, b = _placeholder(weight, smean), _placeholder(bias, smean)
    flags = dict(HAS_W=weight is not None, HAS_B=bias is not None, SILU=silu)
    pa = torch.empty(progs, c, dtype=torch.float32, device=x.device)
    pb = torch.empty(progs, c, dtype=torch.float32, device=x.device)
    _seg_bwd_partial_kernel[(progs,)](x, dy, smean, srstd, w, b, pa, pb, starts, ends, segs, c, cpg, groups,
                                      x.stride(0), dy.stride(0), **flags, BLOCK_R=block_r, BLOCK_C=block_c,
                                      num_warps=4)
    s1 = torch.empty(s, groups, dtype=torch.float32, device=x.device)
    s2 = torch.empty(s, groups, dtype=torch.float32, device=x.device)
    _seg_bwd_merge_kernel[(s,)](pa, pb, w, s1, s2, sfirst, cpg, groups, HAS_W=weight is not None,
                                BLOCK_G=block_g, BLOCK_J=block_j, num_warps=4)
    _seg_bwd_dx_kernel[(progs,)](x, dy, smean, srstd, w, b, s1, s2, offs, dx, starts, ends, segs, c, cpg, groups,
                                 x.stride(0), dy.stride(0), dx.stride(0), **flags, BLOCK_R=block_r,
                                 BLOCK_C=block_c, num_warps=4)
    dw = pb.sum(0) if weight is not None else None
    db = pa.sum(0) if bias is not None else None
    return dx, dw, db
