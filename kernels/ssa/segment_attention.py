"""Triton attention over lists of key segments: the one engine behind all three SSA branches.

A *tile* is up to BLOCK_T consecutive query tokens; its rows are the tokens × the G
query heads of one key/value head (GQA), so one K/V load serves G heads. Each
(tile, kv head) attends to S contiguous key ranges ("segments"):
compression = the shape's pooled tokens, selection = the top-k blocks,
window = the tile's window. The forward and dQ kernels walk the concatenation of a
tile's segments in dense key chunks (gathering rows), so a short block costs no padded
chunk of its own. The dK/dV kernel runs per key chunk over the list of
tiles that attended to it, so nothing is written twice and no atomics are needed
(except where a plan splits a chunk's list over several programs). A plan with
``dkv_in_dq`` (selection and window, by default) has no dK/dV kernel: its dQ kernel adds each
(tile, key chunk)'s dK, dV into float32 sums with atomics.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .gate import row_dot

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
POISON = False  # tests set this: outputs start as NaN so an unwritten element fails
LEAN = True  # exponent scale folded into one FMA, unmasked whole key chunks, row masks through lse = +inf
DKV_KEYS_M = True  # dK/dV computed transposed (keys as M): no tile transposed through shared memory
DKV_STEP_ROWS = 0  # rows per step of the dK/dV kernel walking long tiles (0: the tile rows, 128)
# rows past a tile read lse = +inf and rowsum(O·dO) = 0 from a two-element pad in the dK/dV kernel instead of masked
# loads (whose fill value costs a select and the row mask in the accumulators' column layout; spills 16 -> 8 bytes
# on triton 3.6): whole backward 12.65-12.83 -> 12.25-12.43 ms at 131k, H100, rows alternated (ssa.py --ab-dkv)
DKV_PAD = True
_PADS = {}
DELTA_IN_DQ = True  # the dQ kernel computes rowsum(O·dO) for itself and dK/dV (no row_dot pass): -0.29 ms backward at 131k on an H200


def _new(shape, like, dtype=None):
    dtype = dtype or like.dtype
    if POISON:
        fill = float("nan") if dtype.is_floating_point else -(2 ** 31)
        return torch.full(shape, fill, dtype=dtype, device=like.device)
    return torch.empty(shape, dtype=dtype, device=like.device)


@triton.jit
def _rows(TILE_START, TILE_END, tile, h, G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr):
    t0 = tl.load(TILE_START + tile)
    t1 = tl.load(TILE_END + tile)
    r = tl.arange(0, BLOCK_R)
    tok = t0 + r // G
    head = h * G + r % G
    valid = (r < BLOCK_T * G) & (tok < t1)
    return tok, head, valid


@triton.jit
def _segment_table(SEG_START, SEG_END, SEG_CUM, base, S: tl.constexpr, SP: tl.constexpr):
    """Segments of one (tile, kv head) laid end to end: (shift, lo, hi) per segment and the total length.

    Key position p of the concatenation with lo[s] <= p < hi[s] is key row p + shift[s]."""
    s = tl.arange(0, SP)
    sm = s < S
    a = tl.load(SEG_START + base + s, mask=sm, other=0)
    e = tl.load(SEG_END + base + s, mask=sm, other=0)
    lo = tl.load(SEG_CUM + base + s, mask=sm, other=0)
    hi = lo + (e - a)
    return a - lo, lo, hi, tl.sum(e - a, 0)


@triton.jit
def _gathered_keys(n0, cols, shift, lo, hi, total):
    p = n0 + cols
    inside = (p[:, None] >= lo[None, :]) & (p[:, None] < hi[None, :])
    return p + tl.sum(tl.where(inside, shift[None, :], 0), 1), p < total


@triton.jit
def _chunk_kv(K, V, n, nm, h, skt, skh, d, MASK: tl.constexpr):
    """K and V rows n of kv head h; a whole chunk (MASK=False) loads without masks."""
    if MASK:
        k = tl.load(K + n[:, None] * skt + h * skh + d[None, :], mask=nm[:, None], other=0.0)
        v = tl.load(V + n[:, None] * skt + h * skh + d[None, :], mask=nm[:, None], other=0.0)
    else:
        k = tl.load(K + n[:, None] * skt + h * skh + d[None, :])
        v = tl.load(V + n[:, None] * skt + h * skh + d[None, :])
    return k, v


@triton.jit
def _fwd_step(q, K, V, n, nm, h, skt, skh, d, qk_scale, m_i, l_i, acc, MASK: tl.constexpr = True,
              LEAN: tl.constexpr = False):
    """One key chunk of the online softmax. LEAN: the scale rides in the exponent's FMA (max taken on the
    raw dot), and chunks with every key present (MASK=False) skip the masked loads and the -inf select."""
    k, v = _chunk_kv(K, V, n, nm, h, skt, skh, d, MASK)
    if LEAN:
        qk = tl.dot(q, tl.trans(k))
        if MASK:
            qk = tl.where(nm[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0: the max commutes with it
        p = tl.exp2(qk * qk_scale - m_new[:, None])
    else:
        qk = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
        qk = tl.where(nm[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _score_pass(q, lse2, K, SCORE, TILE_UNIT, CMP_TO_SLC, tile, h, c0, c1, d, skt, skh, sct, sch, qk_scale,
                BLOCK_N: tl.constexpr, POOL: tl.constexpr):
    """Selection-block scores of one compression tile (Direct3D-S2 Sec. 3.3): a second pass over the pooled keys
    with the final log-sum-exp, Pᵀ summed along each accumulator row (over the tile's tokens and G heads) in
    float32 and added into the row of the tile's selection unit, as scoring._score_kernel does."""
    row = SCORE + tl.load(TILE_UNIT + tile).to(tl.int64) * sct + h * sch
    cols = tl.arange(0, BLOCK_N)
    for n0 in range(c0, c1, BLOCK_N):
        n = n0 + cols
        nm = n < c1
        k = tl.load(K + n[:, None] * skt + h * skh + d[None, :], mask=nm[:, None], other=0.0)
        s = tl.sum(tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :]), 1)
        if POOL:
            col = tl.load(CMP_TO_SLC + n, mask=nm, other=0)
        else:  # compression blocks are the selection blocks
            col = n - c0
        tl.atomic_add(row + col, s, mask=nm, sem="relaxed")


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, TILE_START, TILE_END, SEG_START, SEG_END, SEG_CUM,
                sqt, sqh, skt, skh, sot, soh, slt, slh, sst, ssh, qk_scale,
                S: tl.constexpr, SP: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, LEAN: tl.constexpr = False,
                SCORE=None, TILE_UNIT=None, CMP_TO_SLC=None, sct=0, sch=0, SCORE_N: tl.constexpr = 64,
                POOL: tl.constexpr = False, SCORES: tl.constexpr = False, O0=None, O1=None, GATE=None, OUT=None,
                MIX: tl.constexpr = False):
    """SCORES (compression, one segment per tile): also the selection-block scores (_score_pass). MIX (the last
    branch, rows in token order): also out = g0·O0 + g1·O1 + g2·O (Direct3D-S2 Sec. 3.3), as gate._gate_fwd_kernel
    computes it from O as stored, without reading O back."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    tok, head, valid = _rows(TILE_START, TILE_END, tile, h, G, BLOCK_T, BLOCK_R)
    d = tl.arange(0, D)
    q = tl.load(Q + tok[:, None] * sqt + head[:, None] * sqh + d[None, :], mask=valid[:, None], other=0.0)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    base = tile * sst + h * ssh
    shift, lo, hi, total = _segment_table(SEG_START, SEG_END, SEG_CUM, base, S, SP)
    if LEAN:  # whole chunks unmasked, then the partial one
        full = total - total % BLOCK_N
        for n0 in range(0, full, BLOCK_N):
            n, nm = _gathered_keys(n0, cols, shift, lo, hi, total)
            m_i, l_i, acc = _fwd_step(q, K, V, n, nm, h, skt, skh, d, qk_scale, m_i, l_i, acc, False, True)
        if full < total:
            n, nm = _gathered_keys(full, cols, shift, lo, hi, total)
            m_i, l_i, acc = _fwd_step(q, K, V, n, nm, h, skt, skh, d, qk_scale, m_i, l_i, acc, True, True)
    else:
        for n0 in range(0, total, BLOCK_N):
            n, nm = _gathered_keys(n0, cols, shift, lo, hi, total)
            m_i, l_i, acc = _fwd_step(q, K, V, n, nm, h, skt, skh, d, qk_scale, m_i, l_i, acc)
    has = l_i > 0
    acc = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(O + tok[:, None] * sot + head[:, None] * soh + d[None, :], acc.to(O.dtype.element_ty), mask=valid[:, None])
    tl.store(LSE + tok * slt + head * slh, lse, mask=valid)
    if MIX:  # O0, O1, OUT share O's strides; GATE is (N, Hq, 3) contiguous
        ooff = tok[:, None] * sot + head[:, None] * soh + d[None, :]
        grow = GATE + (tok * (sot // D) + head) * 3
        mix = tl.load(grow + 2, mask=valid, other=0.0).to(tl.float32)[:, None] * acc.to(O.dtype.element_ty).to(
            tl.float32)
        mix += tl.load(grow, mask=valid, other=0.0).to(tl.float32)[:, None] * tl.load(
            O0 + ooff, mask=valid[:, None], other=0.0).to(tl.float32)
        mix += tl.load(grow + 1, mask=valid, other=0.0).to(tl.float32)[:, None] * tl.load(
            O1 + ooff, mask=valid[:, None], other=0.0).to(tl.float32)
        tl.store(OUT + ooff, mix.to(OUT.dtype.element_ty), mask=valid[:, None])
    if SCORES:  # rows past the tile: +inf, so their P is 0 (as the stored lse read back by the scoring kernel)
        lse2 = tl.where(valid, lse, float("inf")) * 1.4426950408889634
        c0 = tl.load(SEG_START + base)
        _score_pass(q, lse2, K, SCORE, TILE_UNIT, CMP_TO_SLC, tile, h, c0, tl.load(SEG_END + base), d, skt, skh,
                    sct, sch, qk_scale, SCORE_N, POOL)


@triton.jit
def _lse2(LSE, GATE, tok, head, valid, slt, slh, sgt, sgh, GATE_B: tl.constexpr):
    """log2-sum-exp of the rows (+inf past the tile); minus log2 of the gate when GATE_B >= 0."""
    lse2 = tl.load(LSE + tok * slt + head * slh, mask=valid, other=float("inf")) * 1.4426950408889634
    if GATE_B >= 0:  # a zero gate gives +inf: P = 0
        lse2 -= tl.log2(tl.load(GATE + tok * sgt + head * sgh + GATE_B, mask=valid, other=1.0).to(tl.float32))
    return lse2


@triton.jit
def _dq_step(q, do, lse2, delta, valid, K, V, n, nm, h, skt, skh, d, qk_scale, dq, MASK: tl.constexpr = True,
             LEAN: tl.constexpr = False):
    """LEAN: rows past the tile carry lse = +inf (so P = 0 there without a select) and whole chunks skip masks."""
    k, v = _chunk_kv(K, V, n, nm, h, skt, skh, d, MASK)
    if LEAN:
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        if MASK:
            p = tl.where(nm[None, :], p, 0.0)
    else:
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(valid[:, None] & nm[None, :], tl.exp2(qk - lse2[:, None]), 0.0)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k)


@triton.jit
def _dq_dkv_step(q, do, lse2, delta, K, V, DK, DV, n, nm, h, skt, skh, d, qk_scale, sm_scale, dq,
                 MASK: tl.constexpr, KEYS_M: tl.constexpr):
    """One key chunk of dQ that also adds the chunk's dK = dSᵀQ and dV = PᵀdO over this tile's rows (all G query
    heads of the kv head) into float32 DK, DV with atomics: no dK/dV kernel re-reading q and dO per key chunk.
    Rows past the tile carry lse = +inf (P = 0); keys past the chunk are masked (dQ sums over them).
    KEYS_M: Sᵀ with the keys as M (Pᵀ, dSᵀ straight into dV, dK; dS transposed once for dQ), else S with the
    queries as M (P, dS transposed for dV, dK)."""
    k, v = _chunk_kv(K, V, n, nm, h, skt, skh, d, MASK)
    if KEYS_M:
        pt = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
        if MASK:
            pt = tl.where(nm[:, None], pt, 0.0)
        dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dst16 = dst.to(k.dtype)
        dv_c = tl.dot(pt.to(do.dtype), do)
        dk_c = tl.dot(dst16, q)
        dq += tl.dot(tl.trans(dst16), k)
    else:
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        if MASK:
            p = tl.where(nm[None, :], p, 0.0)
        ds16 = (p * (tl.dot(do, tl.trans(v)) - delta[:, None])).to(k.dtype)
        dq += tl.dot(ds16, k)
        dv_c = tl.dot(tl.trans(p.to(do.dtype)), do)
        dk_c = tl.dot(tl.trans(ds16), q)
    koff = n[:, None] * skt + h * skh + d[None, :]
    if MASK:
        tl.atomic_add(DK + koff, dk_c * sm_scale, mask=nm[:, None], sem="relaxed")
        tl.atomic_add(DV + koff, dv_c, mask=nm[:, None], sem="relaxed")
    else:
        tl.atomic_add(DK + koff, dk_c * sm_scale, sem="relaxed")
        tl.atomic_add(DV + koff, dv_c, sem="relaxed")
    return dq


@triton.jit
def _bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, TILE_START, TILE_END, SEG_START, SEG_END, SEG_CUM, GATE, LSE_OUT,
                   sqt, sqh, skt, skh, slt, slh, sst, ssh, sgt, sgh, qk_scale, sm_scale,
                   S: tl.constexpr, SP: tl.constexpr, G: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                   LEAN: tl.constexpr = False, DELTA_HERE: tl.constexpr = False, ACC: tl.constexpr = False,
                   GATE_B: tl.constexpr = -1, DK=None, DV=None, DKV: tl.constexpr = 0):
    """ACC: dQ is added to DQ (written by the branches before). GATE_B >= 0: the log-sum-exp is lse − ln g
    with g = GATE[..., GATE_B] (the gated branch's P, see ops._WholeSSA), stored into LSE_OUT for the dK/dV
    kernel (reading the gate there costs its registers: 13.1 -> 18.8 ms backward at 131k, H100).
    DKV > 0: also dK, dV of every (tile, key chunk) pair added into float32 DK, DV (_dq_dkv_step; 1: keys as M,
    2: queries as M), so the branch needs no dK/dV kernel and no lse − ln g for one."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    tok, head, valid = _rows(TILE_START, TILE_END, tile, h, G, BLOCK_T, BLOCK_R)
    d = tl.arange(0, D)
    qoff = tok[:, None] * sqt + head[:, None] * sqh + d[None, :]
    q = tl.load(Q + qoff, mask=valid[:, None], other=0.0)
    do = tl.load(DO + qoff, mask=valid[:, None], other=0.0)
    lse2 = _lse2(LSE, GATE, tok, head, valid, slt, slh, sgt, sgh, GATE_B)
    if GATE_B >= 0 and DKV == 0:
        tl.store(LSE_OUT + tok * slt + head * slh, lse2 * 0.6931471805599453, mask=valid)
    if DELTA_HERE:  # rowsum(O·dO) for this kernel and the dK/dV kernel after it (no separate pass over O, dO)
        o = tl.load(O + qoff, mask=valid[:, None], other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + tok * slt + head * slh, delta, mask=valid)
    else:
        delta = tl.load(DELTA + tok * slt + head * slh, mask=valid, other=0.0)
    dq = tl.zeros([BLOCK_R, D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    base = tile * sst + h * ssh
    shift, lo, hi, total = _segment_table(SEG_START, SEG_END, SEG_CUM, base, S, SP)
    if DKV > 0:  # whole chunks unmasked, then the partial one (rows past the tile have lse = +inf either way)
        full = total - total % BLOCK_N
        for n0 in range(0, full, BLOCK_N):
            n, nm = _gathered_keys(n0, cols, shift, lo, hi, total)
            dq = _dq_dkv_step(q, do, lse2, delta, K, V, DK, DV, n, nm, h, skt, skh, d, qk_scale, sm_scale, dq,
                              False, DKV == 1)
        if full < total:
            n, nm = _gathered_keys(full, cols, shift, lo, hi, total)
            dq = _dq_dkv_step(q, do, lse2, delta, K, V, DK, DV, n, nm, h, skt, skh, d, qk_scale, sm_scale, dq,
                              True, DKV == 1)
    elif LEAN:
        full = total - total % BLOCK_N
        for n0 in range(0, full, BLOCK_N):
            n, nm = _gathered_keys(n0, cols, shift, lo, hi, total)
            dq = _dq_step(q, do, lse2, delta, valid, K, V, n, nm, h, skt, skh, d, qk_scale, dq, False, True)
        if full < total:
            n, nm = _gathered_keys(full, cols, shift, lo, hi, total)
            dq = _dq_step(q, do, lse2, delta, valid, K, V, n, nm, h, skt, skh, d, qk_scale, dq, True, True)
    else:
        for n0 in range(0, total, BLOCK_N):
            n, nm = _gathered_keys(n0, cols, shift, lo, hi, total)
            dq = _dq_step(q, do, lse2, delta, valid, K, V, n, nm, h, skt, skh, d, qk_scale, dq)
    dq = dq * sm_scale
    if ACC:  # the branches before this one wrote DQ; each program owns its rows
        dq += tl.load(DQ + qoff, mask=valid[:, None], other=0.0).to(tl.float32)
    tl.store(DQ + qoff, dq.to(DQ.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _dkv_step(Q, DO, LSE, DELTA, DQ, tok, head, valid, k, v, nm, d, sqt, sqh, slt, slh, qk_scale, sm_scale, dk, dv,
              FUSED_DQ: tl.constexpr, LEAN: tl.constexpr = False, KEYS_M: tl.constexpr = False, PAD=None):
    """One row step of dK/dV. KEYS_M: computed transposed (keys as the matmuls' M, Pᵀ and dSᵀ straight from the
    accumulators as A operands), so no tile is transposed through shared memory. PAD: float32 (+inf, 0) that rows
    past the tile read as lse and rowsum(O·dO), so those loads need no mask (a masked load's fill value costs a
    select and the row mask in the accumulators' column layout: registers the dK/dV kernel does not have)."""
    qoff = tok[:, None] * sqt + head[:, None] * sqh + d[None, :]
    q = tl.load(Q + qoff, mask=valid[:, None], other=0.0)
    do = tl.load(DO + qoff, mask=valid[:, None], other=0.0)
    if PAD is not None:  # q = dO = 0 and lse = +inf on those rows: Pᵀ = dSᵀ = 0 there
        loff = tok * slt + head * slh
        lse2 = tl.load(tl.where(valid, LSE + loff, PAD)) * 1.4426950408889634
        delta = tl.load(tl.where(valid, DELTA + loff, PAD + 1))
    else:
        lse2 = tl.load(LSE + tok * slt + head * slh, mask=valid, other=float("inf")) * 1.4426950408889634
        delta = tl.load(DELTA + tok * slt + head * slh, mask=valid, other=0.0)
    if KEYS_M:
        # rows past the tile have lse = +inf (Pᵀ = 0); keys past the chunk only fill dK/dV rows never stored
        pt = tl.exp2(tl.dot(k, tl.trans(q)) * qk_scale - lse2[None, :])
        dv += tl.dot(pt.to(do.dtype), do)
        dst = pt * (tl.dot(v, tl.trans(do)) - delta[None, :])
        dk += tl.dot(dst.to(q.dtype), q)
        return dk, dv
    if LEAN:
        # rows past the tile have lse = +inf (P = 0); columns past the chunk give garbage only in the dK/dV
        # rows of those keys, which are never stored
        p = tl.exp2(tl.dot(q, tl.trans(k)) * qk_scale - lse2[:, None])
        if FUSED_DQ:  # except through dQ, which sums over the columns
            p = tl.where(nm[None, :], p, 0.0)
    else:
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(valid[:, None] & nm[None, :], tl.exp2(qk - lse2[:, None]), 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do)
    dp = tl.dot(do, tl.trans(v))
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    if FUSED_DQ:  # this chunk's share of dQ from the same P: 5 matmuls per pair instead of 7, one exp instead of 2
        dq = tl.dot(ds.to(k.dtype), k) * sm_scale
        tl.atomic_add(DQ + qoff, dq, mask=valid[:, None], sem="relaxed")
    return dk, dv


@triton.jit
def _bwd_dkv_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, TILE_START, TILE_END, CHUNK_START, CHUNK_END, CHUNK_SEG,
                    QPTR, TIDX, ITEMS, sqt, sqh, skt, skh, slt, slh, sph, qk_scale, sm_scale,
                    G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, TPI: tl.constexpr,
                    BLOCK_N: tl.constexpr, D: tl.constexpr, ATOMIC: tl.constexpr, LONG_TILES: tl.constexpr,
                    BALANCED: tl.constexpr, FUSED_DQ: tl.constexpr, LEAN: tl.constexpr = False,
                    KEYS_M: tl.constexpr = False, STEP_R: tl.constexpr = 128, PAD=None):
    if BALANCED:  # one work item (chunk, kv head, range of its tile list) per program
        it = tl.program_id(0)
        c = tl.load(ITEMS + it * 4)
        h = tl.load(ITEMS + it * 4 + 1)
        a = tl.load(ITEMS + it * 4 + 2)
        b = tl.load(ITEMS + it * 4 + 3)
    else:
        c = tl.program_id(0)
        h = tl.program_id(1)
        seg = tl.load(CHUNK_SEG + c)
        p0 = tl.load(QPTR + h * sph + seg)
        p1 = tl.load(QPTR + h * sph + seg + 1)
        # this program's share of the tiles that attended to the chunk (splits keep the GPU busy when chunks are few)
        split = tl.program_id(2)
        n_split = tl.num_programs(2)
        per = (p1 - p0 + n_split - 1) // n_split
        a = p0 + split * per
        b = tl.minimum(a + per, p1)
    n0 = tl.load(CHUNK_START + c)
    n1 = tl.load(CHUNK_END + c)
    n = n0 + tl.arange(0, BLOCK_N)
    nm = n < n1
    d = tl.arange(0, D)
    koff = n[:, None] * skt + h * skh + d[None, :]
    k = tl.load(K + koff, mask=nm[:, None], other=0.0)
    v = tl.load(V + koff, mask=nm[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    if LONG_TILES:  # tiles of more than BLOCK_R rows (tile-level selection): walk each in steps of STEP_R rows
        r = tl.arange(0, STEP_R)
        for i in range(a, b):
            tile = tl.load(TIDX + i)
            t0 = tl.load(TILE_START + tile)
            rows = (tl.load(TILE_END + tile) - t0) * G
            for r0 in range(0, rows, STEP_R):
                tok = t0 + (r0 + r) // G
                head = h * G + (r0 + r) % G
                dk, dv = _dkv_step(Q, DO, LSE, DELTA, DQ, tok, head, r0 + r < rows, k, v, nm, d, sqt, sqh, slt, slh,
                                   qk_scale, sm_scale, dk, dv, FUSED_DQ, LEAN, KEYS_M, PAD)
    else:  # TPI short tiles side by side per step
        rr = tl.arange(0, TPI * BLOCK_R)
        j = rr // BLOCK_R
        r = rr % BLOCK_R
        for i in range(a, b, TPI):
            ti = i + j
            tm = ti < b
            tile = tl.load(TIDX + ti, mask=tm, other=0)
            t0 = tl.load(TILE_START + tile, mask=tm, other=0)
            t1 = tl.load(TILE_END + tile, mask=tm, other=0)
            tok = t0 + r // G
            head = h * G + r % G
            valid = tm & (r < BLOCK_T * G) & (tok < t1)
            dk, dv = _dkv_step(Q, DO, LSE, DELTA, DQ, tok, head, valid, k, v, nm, d, sqt, sqh, slt, slh,
                               qk_scale, sm_scale, dk, dv, FUSED_DQ, LEAN, KEYS_M, PAD)
    if ATOMIC:
        if b > a:  # work items past the last (the grid is an upper bound) add nothing
            tl.atomic_add(DK + koff, dk * sm_scale, mask=nm[:, None], sem="relaxed")
            tl.atomic_add(DV + koff, dv, mask=nm[:, None], sem="relaxed")
    else:
        tl.store(DK + koff, (dk * sm_scale).to(DK.dtype.element_ty), mask=nm[:, None])
        tl.store(DV + koff, dv.to(DV.dtype.element_ty), mask=nm[:, None])


@dataclass
class SegmentPlan:
    """Which key ranges each query tile attends to, and the inverse lists for dK/dV.

    seg_start/seg_end: int32 (n_tiles, Hkv or 1, S); seg_cum: exclusive prefix sums of the
    segment lengths along S (None allowed for S = 1). Backward: key chunks
    (chunk_start, chunk_end, chunk_seg) and, per (kv head, segment), the range
    qptr[h * qptr_head_stride + seg : ... + 1] of ``tidx`` listing the tiles that use it,
    tiles being ``dkv_tile_start/end`` when given (longer tiles walked in pieces), else the query tiles.
    """
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    seg_start: torch.Tensor
    seg_end: torch.Tensor
    block_t: int
    chunk_start: torch.Tensor
    chunk_end: torch.Tensor
    chunk_seg: torch.Tensor
    qptr: torch.Tensor | None  # None: built by ``inverse()`` on the first backward
    qptr_head_stride: int
    tidx: torch.Tensor | None
    block_n: int = 64  # key chunk of the forward and dQ kernels
    num_warps: int = 4
    num_stages: int = 0  # 0 = Triton's default software-pipelining depth
    inverse: object = None  # () -> (qptr, tidx), for plans whose inverse lists cost time to build
    lists: object = None  # (per_item, n_items) -> (qptr, tidx, work items) built on the GPU (dkv_steps > 0)
    dkv_split: int = 1  # programs per key chunk in dK/dV (partial sums added atomically in float32)
    seg_cum: torch.Tensor | None = None
    chunk_n: int = 0  # width of the dK/dV key chunks (0 = block_n)
    dkv_tile_start: torch.Tensor | None = None
    dkv_tile_end: torch.Tensor | None = None
    dkv_steps: int = 0  # >0: split every chunk's tile list into work items of about this many 128-row steps
    fused_dq: bool = False  # dQ from the dK/dV kernel's P (float32 atomics) instead of a second pass
    dkv_in_dq: int = 0  # dK/dV from the dQ kernel's P and dS (float32 atomics, no dK/dV kernel): 1 keys as M, 2 queries
    dkv_warps: int = 0  # warps of the dK/dV kernel (0: 4, or 8 for 256-row steps)
    lean: bool = True  # LEAN kernels for this plan (windows: ~2 key chunks each, the plain loop measured faster)
    dkv_tile_max: int = 0  # most tokens of a dK/dV tile (long tiles; 0 = read from the device)
    dkv_entries: int = 0  # bound on the tile-list entries summed over chunks and heads (0 = read from the device)
    # launch settings per kernel ("fwd", "dq", "dkv": num_warps / num_stages / maxnreg) over the defaults above
    launch: dict = field(default_factory=dict)


def _work_items(plan, qptr, hkv: int, per_item: int) -> torch.Tensor:
    """(chunk, kv head, first, end) int32 rows: each chunk's tile list cut into pieces of per_item entries,
    so a block that many tiles chose is shared by many programs (their sums meet in float32 atomics).

    With ``plan.dkv_entries`` the rows are as many as that bound allows (no host sync); those past the
    last real item are empty (first = end)."""
    seg = plan.chunk_seg.long()
    dev = seg.device
    base = torch.arange(hkv, device=dev)[:, None] * plan.qptr_head_stride + seg[None, :]
    p0 = qptr[base].long().flatten()
    p1 = qptr[base + 1].long().flatten()
    n_it = (p1 - p0 + per_item - 1) // per_item
    ends = torch.cumsum(n_it, 0)
    if plan.dkv_entries:  # each list of L entries gives at most L / per_item + 1 items
        total = n_it.numel() + (plan.dkv_entries + per_item - 1) // per_item
    else:
        total = int(ends[-1]) if n_it.numel() else 0
    i = torch.arange(total, device=dev)
    job = torch.searchsorted(ends, i, right=True).clamp_max(max(0, n_it.numel() - 1))
    a = p0[job] + (i - (ends[job] - n_it[job])) * per_item
    b = torch.minimum(a + per_item, p1[job])
    real = i < ends[-1] if n_it.numel() else torch.zeros_like(i, dtype=torch.bool)
    a, b = torch.where(real, a, 0), torch.where(real, b, 0)
    n_chunks = seg.numel()
    return torch.stack([job % n_chunks, job // n_chunks, a, b], 1).to(torch.int32).contiguous()


def _pad(device) -> torch.Tensor:
    """(+inf, 0) float32: what the dK/dV kernel reads as lse and rowsum(O·dO) for rows past a tile (DKV_PAD)."""
    if device not in _PADS:
        _PADS[device] = torch.tensor([float("inf"), 0.0], dtype=torch.float32, device=device)
    return _PADS[device]


def _rows_for(block_t: int, g: int) -> int:
    return max(16, triton.next_power_of_2(block_t * g))


def _warps(rows: int, default: int) -> int:
    """256-row tiles keep their fp32 score tiles in registers only with 8 warps."""
    return 8 if rows >= 256 else default


def _stages(plan) -> dict:
    return {"num_stages": plan.num_stages} if plan.num_stages else {}


def _launch_kw(plan, kernel: str, num_warps: int, stages: bool = True) -> dict:
    kw = {"num_warps": num_warps, **(_stages(plan) if stages else {})}
    kw.update(plan.launch.get(kernel, {}))
    return kw


def _seg_strides(t: torch.Tensor):
    return t.stride(0), (t.stride(1) if t.shape[1] > 1 else 0)


def _seg_args(plan):
    s = plan.seg_start.shape[2]
    cum = plan.seg_cum
    if cum is None:  # one segment: it starts the concatenation
        if s != 1:
            raise ValueError(f"a plan with {s} segments per tile needs seg_cum")
        cum = torch.zeros_like(plan.seg_start)
    return cum, dict(S=s, SP=triton.next_power_of_2(s))


def _launch_fwd(q, k, v, plan: SegmentPlan, scores=None, mix=None):
    """scores: (score matrix (units, Hkv, blocks) float32, zeroed; unit of each tile; compression block ->
    selection block within the shape, or None when they are the same; key chunk): compression only, the
    block scores of the selection added into the matrix (see _score_pass). mix: (o0, o1, gates (N, Hq, 3), out),
    outputs in token order like q: out = g0·o0 + g1·o1 + g2·o also written."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    o = _new((n, hq, d), q)
    lse = _new((n, hq), q, torch.float32)
    n_tiles = plan.tile_start.numel()
    score_kw = {}
    if scores is not None:
        score, unit, to_slc, score_n = scores
        score_kw = dict(SCORE=score, TILE_UNIT=unit, CMP_TO_SLC=to_slc if to_slc is not None else unit,
                        sct=score.stride(0), sch=score.stride(1), SCORE_N=score_n, POOL=to_slc is not None,
                        SCORES=True)
    if mix is not None:
        o0, o1, gates, out = mix
        if not (o0.stride() == o1.stride() == out.stride() == o.stride() and gates.is_contiguous()
                and o.stride(0) == hq * d):
            raise ValueError("the gated sum needs contiguous outputs and gates")
        score_kw.update(O0=o0, O1=o1, GATE=gates, OUT=out, MIX=True)
    if n_tiles:
        sst, ssh = _seg_strides(plan.seg_start)
        cum, seg_kw = _seg_args(plan)
        _fwd_kernel[(n_tiles, hkv)](
            q, k, v, o, lse, plan.tile_start, plan.tile_end, plan.seg_start, plan.seg_end, cum,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1), lse.stride(0), lse.stride(1),
            sst, ssh, d ** -0.5 * LOG2E, G=g, BLOCK_T=plan.block_t,
            BLOCK_R=_rows_for(plan.block_t, g), BLOCK_N=plan.block_n, D=d, LEAN=LEAN and plan.lean,
            **seg_kw, **score_kw, **_launch_kw(plan, "fwd", _warps(_rows_for(plan.block_t, g), plan.num_warps)))
    return o, lse


def _launch_bwd(q, k, v, o, lse, do, plan: SegmentPlan, dq_into=None, dkv_into=None, want_delta=False,
                gate=None, gate_b=-1, delta_into=None, dkv_stream=None, keep=None):
    """dQ, dK, dV of one branch (and rowsum(O·dO) with ``want_delta``). ``dq_into``: add dQ into this tensor
    (written by earlier branches); ``dkv_into``: float32 (dK, dV) to add into, returned as they are.
    ``gate`` (N, Hq, 3) with ``gate_b``: the kernels use lse − ln gate[..., gate_b]; ``delta_into``: an (N, Hq)
    float32 tensor with lse's strides that receives rowsum(O·dO). ``dkv_stream``: the dK/dV work (lists
    included) runs on that stream after the dQ kernel, so it overlaps the next branch's dQ; the caller
    joins the streams, and ``keep`` collects the tensors that must live until then."""
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    do = do.contiguous()
    fused = plan.fused_dq
    n_tiles = plan.tile_start.numel()
    if fused and dq_into is not None:
        raise ValueError("dQ from the dK/dV kernel's atomics cannot add into another branch's dQ")
    delta_here = DELTA_IN_DQ and not fused and n_tiles > 0
    if delta_into is None:
        delta = torch.empty(o.shape[:2], dtype=torch.float32, device=o.device) if delta_here else row_dot(o, do)
    else:
        delta = delta_into if delta_here else delta_into.copy_(row_dot(o, do))
    gate_b = gate_b if gate is not None else -1
    gate_args = (gate, gate.stride(0), gate.stride(1)) if gate is not None else (lse, 0, 0)
    lse_kv = lse  # the dK/dV kernel's log-sum-exp: lse − ln g written by the dQ kernel when gated
    if gate is not None:
        if fused or n_tiles == 0:
            raise ValueError("a gated backward needs the dQ kernel (no fused dQ)")
        lse_kv = torch.empty_like(lse)
    if dq_into is not None:
        dq = dq_into
    else:
        dq = torch.zeros(q.shape, dtype=torch.float32, device=q.device) if fused else _new(q.shape, q)
    dkv_here = plan.dkv_in_dq if not fused and n_tiles else 0  # dK/dV added by the dQ kernel (float32 atomics)
    atomic = plan.dkv_split > 1 or plan.dkv_steps > 0 or dkv_into is not None or dkv_here > 0
    if dkv_into is not None:
        dk, dv = dkv_into
    else:
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if atomic else _new(k.shape, k)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device) if atomic else _new(v.shape, v)
    br = _rows_for(plan.block_t, g)
    if n_tiles and not fused:
        sst, ssh = _seg_strides(plan.seg_start)
        cum, seg_kw = _seg_args(plan)
        _bwd_dq_kernel[(n_tiles, hkv)](
            q, k, v, o, do, lse, delta, dq, plan.tile_start, plan.tile_end, plan.seg_start, plan.seg_end, cum,
            gate_args[0], lse_kv, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), lse.stride(1),
            sst, ssh,
            *gate_args[1:], d ** -0.5 * LOG2E, d ** -0.5, G=g, BLOCK_T=plan.block_t, BLOCK_R=br,
            BLOCK_N=plan.block_n, D=d, LEAN=LEAN and plan.lean, DELTA_HERE=delta_here, ACC=dq_into is not None,
            GATE_B=gate_b, DK=dk if dkv_here else None, DV=dv if dkv_here else None, DKV=dkv_here,
            **seg_kw, **_launch_kw(plan, "dq", _warps(br, plan.num_warps)))
    n_chunks = 0 if dkv_here else plan.chunk_start.numel()
    side = contextlib.nullcontext()
    if dkv_stream is not None and n_chunks:
        ready = torch.cuda.Event()
        ready.record()
        dkv_stream.wait_event(ready)
        side = torch.cuda.stream(dkv_stream)
        keep.extend((q, k, v, do, lse_kv, delta))
    with side:
        if n_chunks:
            _launch_dkv(q, k, v, do, lse, lse_kv, delta, dq, dk, dv, plan, g, br, atomic, fused)
    if dkv_into is not None:
        return (dq, dk, dv, delta) if want_delta else (dq, dk, dv)  # float32 sums, cast after the last branch
    if atomic:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    if fused:
        dq = dq.to(q.dtype)
    return (dq, dk, dv, delta) if want_delta else (dq, dk, dv)


def _launch_dkv(q, k, v, do, lse, lse_kv, delta, dq, dk, dv, plan, g, br, atomic, fused):
    """The dK/dV kernel of one branch (and the selection's lists and work items)."""
    hkv, d = k.shape[1], k.shape[2]
    n_chunks = plan.chunk_start.numel()
    if n_chunks:
        long_tiles = plan.dkv_tile_start is not None
        ts = plan.dkv_tile_start if long_tiles else plan.tile_start
        te = plan.dkv_tile_end if long_tiles else plan.tile_end
        tpi = 1 if long_tiles else max(1, 128 // br)
        grid = (n_chunks, hkv, plan.dkv_split)
        if plan.dkv_steps:
            if long_tiles:  # entries are whole tiles of up to max_rows rows, walked in br-row steps
                max_rows = (plan.dkv_tile_max or int((plan.dkv_tile_end - plan.dkv_tile_start).max())) * g
                per_item = max(1, plan.dkv_steps // triton.cdiv(max_rows, br))
            else:
                per_item = plan.dkv_steps * tpi
            if plan.lists is not None and plan.dkv_entries:  # lists and items built on the GPU, no host sync
                qptr, tidx, items = plan.lists(per_item, hkv * n_chunks + triton.cdiv(plan.dkv_entries, per_item))
            else:
                qptr, tidx = plan.inverse() if plan.inverse is not None else (plan.qptr, plan.tidx)
                items = _work_items(plan, qptr, hkv, per_item)
            grid = (items.shape[0],)
        else:
            qptr, tidx = plan.inverse() if plan.inverse is not None else (plan.qptr, plan.tidx)
            items = qptr
        if grid[0]:
            kw = dict(G=g, BLOCK_T=plan.block_t, BLOCK_R=br, TPI=tpi, BLOCK_N=plan.chunk_n or plan.block_n, D=d,
                      ATOMIC=atomic, LONG_TILES=long_tiles, BALANCED=plan.dkv_steps > 0, FUSED_DQ=fused,
                      LEAN=LEAN and plan.lean, KEYS_M=DKV_KEYS_M and not fused, STEP_R=DKV_STEP_ROWS or br,
                      num_warps=plan.dkv_warps or _warps(tpi * br, 4), PAD=_pad(k.device) if DKV_PAD else None)
            kw.update(plan.launch.get("dkv", {}))  # launch settings and the constexprs above
            _bwd_dkv_kernel[grid](
                q, k, v, do, lse_kv, delta, dq, dk, dv, ts, te, plan.chunk_start, plan.chunk_end,
                plan.chunk_seg, qptr, tidx, items, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
                lse.stride(0), lse.stride(1), plan.qptr_head_stride, d ** -0.5 * LOG2E, d ** -0.5, **kw)
class _SegmentAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, plan):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        o, lse = _launch_fwd(q, k, v, plan)
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plan = plan
        ctx.mark_non_differentiable(lse)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        q, k, v, o, lse = ctx.saved_tensors
        dq, dk, dv = _launch_bwd(q, k, v, o, lse, do, ctx.plan)
        return dq, dk, dv, None


def segment_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: SegmentPlan):
    """Attention of every query tile over its key segments; returns (out (N, Hq, D), lse (N, Hq) float32)."""
    return _SegmentAttention.apply(q, k, v, plan)
