"""Triton attention over lists of key segments: the one engine behind all three SSA branches.

A *tile* is up to BLOCK_T consecutive query tokens; its rows are the tokens × the G
query heads of one key/value head (GQA), so one K/V load serves G heads. Each
(tile, kv head) attends to S contiguous key ranges ("segments"):
compression = the shape's pooled tokens, selection = the top-k blocks,
window = the tile's window. The dK/dV kernel runs per key chunk over the list of
tiles that attended to it, so nothing is written twice and no atomics are needed.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gate import row_dot

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
POISON = False  # tests set this: outputs start as NaN so an unwritten element fails


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
def _fwd_kernel(Q, K, V, O, LSE, TILE_START, TILE_END, SEG_START, SEG_END,
                sqt, sqh, skt, skh, sot, soh, slt, slh, sst, ssh, qk_scale,
                S: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                BLOCK_N: tl.constexpr, D: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    tok, head, valid = _rows(TILE_START, TILE_END, tile, h, G, BLOCK_T, BLOCK_R)
    d = tl.arange(0, D)
    q = tl.load(Q + tok[:, None] * sqt + head[:, None] * sqh + d[None, :], mask=valid[:, None], other=0.0)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for s in range(S):
        start = tl.load(SEG_START + tile * sst + h * ssh + s)
        end = tl.load(SEG_END + tile * sst + h * ssh + s)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + cols
            nm = n < end
            k = tl.load(K + n[:, None] * skt + h * skh + d[None, :], mask=nm[:, None], other=0.0)
            v = tl.load(V + n[:, None] * skt + h * skh + d[None, :], mask=nm[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k)) * qk_scale  # log2 units
            qk = tl.where(nm[None, :], qk, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(qk, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(qk - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
    has = l_i > 0
    acc = acc / tl.where(has, l_i, 1.0)[:, None]
    lse = tl.where(has, (m_i + tl.log2(tl.where(has, l_i, 1.0))) * 0.6931471805599453, float("inf"))
    tl.store(O + tok[:, None] * sot + head[:, None] * soh + d[None, :], acc.to(O.dtype.element_ty), mask=valid[:, None])
    tl.store(LSE + tok * slt + head * slh, lse, mask=valid)


@triton.jit
def _bwd_dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, TILE_START, TILE_END, SEG_START, SEG_END,
                   sqt, sqh, skt, skh, slt, slh, sst, ssh, qk_scale, sm_scale,
                   S: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_N: tl.constexpr, D: tl.constexpr):
    tile = tl.program_id(0)
    h = tl.program_id(1)
    tok, head, valid = _rows(TILE_START, TILE_END, tile, h, G, BLOCK_T, BLOCK_R)
    d = tl.arange(0, D)
    qoff = tok[:, None] * sqt + head[:, None] * sqh + d[None, :]
    q = tl.load(Q + qoff, mask=valid[:, None], other=0.0)
    do = tl.load(DO + qoff, mask=valid[:, None], other=0.0)
    lse2 = tl.load(LSE + tok * slt + head * slh, mask=valid, other=0.0) * 1.4426950408889634
    delta = tl.load(DELTA + tok * slt + head * slh, mask=valid, other=0.0)
    dq = tl.zeros([BLOCK_R, D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    for s in range(S):
        start = tl.load(SEG_START + tile * sst + h * ssh + s)
        end = tl.load(SEG_END + tile * sst + h * ssh + s)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + cols
            nm = n < end
            k = tl.load(K + n[:, None] * skt + h * skh + d[None, :], mask=nm[:, None], other=0.0)
            v = tl.load(V + n[:, None] * skt + h * skh + d[None, :], mask=nm[:, None], other=0.0)
            qk = tl.dot(q, tl.trans(k)) * qk_scale
            p = tl.where(valid[:, None] & nm[None, :], tl.exp2(qk - lse2[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v))
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
    tl.store(DQ + qoff, (dq * sm_scale).to(DQ.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _bwd_dkv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, TILE_START, TILE_END, CHUNK_START, CHUNK_END, CHUNK_SEG,
                    QPTR, TIDX, sqt, sqh, skt, skh, slt, slh, sph, qk_scale, sm_scale,
                    G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, TPI: tl.constexpr,
                    BLOCK_N: tl.constexpr, D: tl.constexpr, ATOMIC: tl.constexpr):
    c = tl.program_id(0)
    h = tl.program_id(1)
    split = tl.program_id(2)
    n_split = tl.num_programs(2)
    n0 = tl.load(CHUNK_START + c)
    n1 = tl.load(CHUNK_END + c)
    seg = tl.load(CHUNK_SEG + c)
    n = n0 + tl.arange(0, BLOCK_N)
    nm = n < n1
    d = tl.arange(0, D)
    koff = n[:, None] * skt + h * skh + d[None, :]
    k = tl.load(K + koff, mask=nm[:, None], other=0.0)
    v = tl.load(V + koff, mask=nm[:, None], other=0.0)
    dk = tl.zeros([BLOCK_N, D], tl.float32)
    dv = tl.zeros([BLOCK_N, D], tl.float32)
    p0 = tl.load(QPTR + h * sph + seg)
    p1 = tl.load(QPTR + h * sph + seg + 1)
    # this program's share of the tiles that attended to the chunk (splits keep the GPU busy when chunks are few)
    per = (p1 - p0 + n_split - 1) // n_split
    a = p0 + split * per
    b = tl.minimum(a + per, p1)
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
        qoff = tok[:, None] * sqt + head[:, None] * sqh + d[None, :]
        q = tl.load(Q + qoff, mask=valid[:, None], other=0.0)
        do = tl.load(DO + qoff, mask=valid[:, None], other=0.0)
        lse2 = tl.load(LSE + tok * slt + head * slh, mask=valid, other=0.0) * 1.4426950408889634
        delta = tl.load(DELTA + tok * slt + head * slh, mask=valid, other=0.0)
        qk = tl.dot(q, tl.trans(k)) * qk_scale
        p = tl.where(valid[:, None] & nm[None, :], tl.exp2(qk - lse2[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do)
        dp = tl.dot(do, tl.trans(v))
        ds = p * (dp - delta[:, None])
        dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
    if ATOMIC:
        tl.atomic_add(DK + koff, dk * sm_scale, mask=nm[:, None])
        tl.atomic_add(DV + koff, dv, mask=nm[:, None])
    else:
        tl.store(DK + koff, (dk * sm_scale).to(DK.dtype.element_ty), mask=nm[:, None])
        tl.store(DV + koff, dv.to(DV.dtype.element_ty), mask=nm[:, None])


@dataclass
class SegmentPlan:
    """Which key ranges each query tile attends to, and the inverse lists for dK/dV.

    seg_start/seg_end: int32 (n_tiles, Hkv or 1, S). Backward: key chunks
    (chunk_start, chunk_end, chunk_seg) and, per (kv head, segment), the range
    qptr[h * qptr_head_stride + seg : ... + 1] of ``tidx`` listing the tiles that use it.
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
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 0  # 0 = Triton's default software-pipelining depth
    inverse: object = None  # () -> (qptr, tidx), for plans whose inverse lists cost time to build
    dkv_split: int = 1  # programs per key chunk in dK/dV (partial sums added atomically in float32)


def _rows_for(block_t: int, g: int) -> int:
    return max(16, triton.next_power_of_2(block_t * g))


def _warps(rows: int, default: int) -> int:
    """256-row tiles keep their fp32 score tiles in registers only with 8 warps."""
    return 8 if rows >= 256 else default


def _stages(plan) -> dict:
    return {"num_stages": plan.num_stages} if plan.num_stages else {}


def _seg_strides(t: torch.Tensor):
    return t.stride(0), (t.stride(1) if t.shape[1] > 1 else 0)


def _launch_fwd(q, k, v, plan: SegmentPlan):
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    o = _new((n, hq, d), q)
    lse = _new((n, hq), q, torch.float32)
    n_tiles = plan.tile_start.numel()
    if n_tiles:
        sst, ssh = _seg_strides(plan.seg_start)
        _fwd_kernel[(n_tiles, hkv)](
            q, k, v, o, lse, plan.tile_start, plan.tile_end, plan.seg_start, plan.seg_end,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1), lse.stride(0), lse.stride(1),
            sst, ssh, d ** -0.5 * LOG2E, S=plan.seg_start.shape[2], G=g, BLOCK_T=plan.block_t,
            BLOCK_R=_rows_for(plan.block_t, g), BLOCK_N=plan.block_n, D=d,
            num_warps=_warps(_rows_for(plan.block_t, g), plan.num_warps), **_stages(plan))
    return o, lse


def _launch_bwd(q, k, v, o, lse, do, plan: SegmentPlan):
    n, hq, d = q.shape
    hkv = k.shape[1]
    g = hq // hkv
    do = do.contiguous()
    delta = row_dot(o, do)
    dq = _new(q.shape, q)
    atomic = plan.dkv_split > 1
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if atomic else _new(k.shape, k)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device) if atomic else _new(v.shape, v)
    br = _rows_for(plan.block_t, g)
    n_tiles = plan.tile_start.numel()
    if n_tiles:
        sst, ssh = _seg_strides(plan.seg_start)
        _bwd_dq_kernel[(n_tiles, hkv)](
            q, k, v, do, lse, delta, dq, plan.tile_start, plan.tile_end, plan.seg_start, plan.seg_end,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0), lse.stride(1), sst, ssh,
            d ** -0.5 * LOG2E, d ** -0.5, S=plan.seg_start.shape[2], G=g, BLOCK_T=plan.block_t, BLOCK_R=br,
            BLOCK_N=plan.block_n, D=d, num_warps=_warps(br, plan.num_warps), **_stages(plan))
    qptr, tidx = plan.inverse() if plan.inverse is not None else (plan.qptr, plan.tidx)
    n_chunks = plan.chunk_start.numel()
    if n_chunks:
        _bwd_dkv_kernel[(n_chunks, hkv, plan.dkv_split)](
            q, k, v, do, lse, delta, dk, dv, plan.tile_start, plan.tile_end, plan.chunk_start, plan.chunk_end,
            plan.chunk_seg, qptr, tidx, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            lse.stride(0), lse.stride(1), plan.qptr_head_stride, d ** -0.5 * LOG2E, d ** -0.5,
            G=g, BLOCK_T=plan.block_t, BLOCK_R=br, TPI=max(1, 128 // br), BLOCK_N=plan.block_n, D=d,
            ATOMIC=atomic, num_warps=_warps(max(1, 128 // br) * br, 4))
    if atomic:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return dq, dk, dv


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
