"""Triton attention over lists of key segments: the one engine behind all three SSA branches.

A *tile* is up to BLOCK_T consecutive query tokens; its rows are the tokens × the G
query heads of one key/value head (GQA), so one K/V load serves G heads. Each
(tile, kv head) attends to S contiguous key ranges ("segments"):
compression = the shape's pooled tokens, selection = the top-k blocks,
window = the tile's window. The forward and dQ kernels walk the concatenation of a
tile's segments in dense key chunks (gathering rows), so a short block costs no padded
chunk of its own. dK/dV comes one of two ways, chosen per branch (``BranchLaunch.dkv_in_dq``):
the dQ kernel adds each (tile, key chunk)'s dK, dV into float32 sums with atomics (tile-level
selection, windows), or a dK/dV kernel runs per key chunk over the tiles that attended to it
(compression, whose pooled keys a whole shape shares; per-query selection).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
POISON = False  # tests set this: outputs start as NaN so an unwritten element fails
_PADS = {}


@dataclass(frozen=True)
class Launch:
    """Triton launch options of one kernel. num_warps 0: 4, or 8 for programs of 256 rows or more (their float32
    score tiles stay in registers only with 8 warps); num_stages 0: Triton's default; maxnreg 0: no cap."""
    num_warps: int = 0
    num_stages: int = 0
    maxnreg: int = 0

    def options(self, rows: int) -> dict:
        kw = {"num_warps": self.num_warps or (8 if rows >= 256 else 4)}
        if self.num_stages:
            kw["num_stages"] = self.num_stages
        if self.maxnreg:
            kw["maxnreg"] = self.maxnreg
        return kw


@dataclass(frozen=True)
class BranchLaunch:
    """How one branch's kernels run: launch options per kernel, key chunks, the softmax loop and the dK/dV path.

    lean: the forward's softmax scale rides in the exponent's FMA (max taken on the raw dot) and whole key chunks
    skip the masks, the partial chunk running after the loop; off for windows (about two chunks each).
    dkv_in_dq: the dQ kernel adds dK/dV (queries as the matmuls' M) into float32 sums with atomics and no dK/dV
    kernel runs. dkv_block_n: key chunk of the dK/dV kernel (0: by block density). dkv_piece: query tokens per
    dK/dV list entry (compression: a shape's queries in contiguous pieces). dkv_steps: 128-row steps per dK/dV
    work item (selection: a chunk's list of tiles cut into items). The settings are the measured fastest
    (benchmarks/RESULTS.md, docs/ssa.md)."""
    fwd: Launch = Launch()
    dq: Launch = Launch()
    dkv: Launch = Launch()
    block_n: int = 64
    lean: bool = True
    dkv_in_dq: bool = False
    dkv_block_n: int = 64
    dkv_piece: int = 0
    dkv_steps: int = 0


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` of the kernels' ``tl.dot`` on ``dtype`` operands. float32 is exact ("ieee") unless
    PyTorch lets float32 matmuls use TF32 (``torch.backends.cuda.matmul.allow_tf32``, also set by
    ``torch.set_float32_matmul_precision``); 16-bit operands ignore it and get Triton's default, "tf32"."""
    return "tf32" if dtype != torch.float32 or _matmul_tf32() else "ieee"


def _matmul_tf32() -> bool:
    """PyTorch's TF32 switch for float32 matmuls. Read through ``fp32_precision`` (torch >= 2.9), which both the
    old flag and the new API set: reading ``allow_tf32`` raises once the new API has been used."""
    matmul = torch.backends.cuda.matmul
    precision = getattr(matmul, "fp32_precision", None)
    if precision is None:
        return bool(matmul.allow_tf32)
    if precision == "none":  # inherits the global setting
        precision = getattr(torch.backends, "fp32_precision", "none")
    return precision == "tf32"


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
def _fwd_step(q, K, V, n, nm, h, skt, skh, d, qk_scale, m_i, l_i, acc, PRECISION: tl.constexpr,
              MASK: tl.constexpr = True, LEAN: tl.constexpr = False):
    """One key chunk of the online softmax. LEAN: the scale rides in the exponent's FMA (max taken on the
    raw dot), and chunks with every key present (MASK=False) skip the masked loads and the -inf select."""
    k, v = _chunk_kv(K, V, n, nm, h, skt, skh, d, MASK)
    if LEAN:
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if MASK:
            qk = tl.where(nm[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)  # qk_scale > 0: the max commutes with it
        p = tl.exp2(qk * qk_scale - m_new[:, None])
    else:
        qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale  # log2 units
        qk = tl.where(nm[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.exp2(qk - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _score_pass(q, lse2, K, SCORE, TILE_UNIT, CMP_TO_SLC, tile, h, c0, c1, d, skt, skh, sct, sch, qk_scale,
                BLOCK_N: tl.constexpr, POOL: tl.constexpr, PRECISION: tl.constexpr):
    """Selection-block scores of one compression tile (Direct3D-S2 Sec. 3.3): a second pass over the pooled keys
    with the final log-sum-exp, Pᵀ summed along each accumulator row (over the tile's tokens and G heads) in
    float32 and added into the row of the tile's selection unit, as scoring._score_kernel does."""
    row = SCORE + tl.load(TILE_UNIT + tile).to(tl.int64) * sct + h * sch
    cols = tl.arange(0, BLOCK_N)
    for n0 in range(c0, c1, BLOCK_N):
        n = n0 + cols
        nm = n < c1
        k = tl.load(K + n[:, None] * skt + h * skh + d[None, :], mask=nm[:, None], other=0.0)
        s = tl.sum(tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :]), 1)
        if POOL:
            col = tl.load(CMP_TO_SLC + n, mask=nm, other=0)
        else:  # compression blocks are the selection blocks
            col = n - c0
        tl.atomic_add(row + col, s, mask=nm, sem="relaxed")


_SEG_SHAPE = {"SP": lambda a: triton.next_power_of_2(a["S"]),
              "BLOCK_R": lambda a: max(16, triton.next_power_of_2(a["BLOCK_T"] * a["G"]))}


@triton.heuristics({**_SEG_SHAPE, "SCORES": lambda a: a.get("SCORE") is not None,
                     "MIX": lambda a: a.get("OUT") is not None})
@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, TILE_START, TILE_END, SEG_START, SEG_END, SEG_CUM,
                sqt, sqh, skt, skh, sot, soh, slt, slh, sst, ssh, qk_scale,
                S: tl.constexpr, SP: tl.constexpr, G: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr, LEAN: tl.constexpr,
                PRECISION: tl.constexpr, SCORE=None, TILE_UNIT=None, CMP_TO_SLC=None, sct=0, sch=0,
                SCORE_N: tl.constexpr = 64, POOL: tl.constexpr = False, SCORES: tl.constexpr = False, O0=None,
                O1=None, GATE=None, OUT=None, MIX: tl.constexpr = False):
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
            m_i, l_i, acc = _fwd_step(q, K, V, n, nm, h, skt, skh, d, qk_scale, m_i, l_i, acc, PRECISION, False, True)
        if full < total:
            n, nm = _gathered_keys(full, cols, shift, lo, hi, total)
            m_i, l_i, acc = _fwd_step(q, K, V, n, nm, h, skt, skh, d, qk_scale, m_i, l_i, acc, PRECISION, True, True)
    else:
        for n0 in range(0, total, BLOCK_N):
            n, nm = _gathered_keys(n0, cols, shift, lo, hi, total)
            m_i, l_i, acc = _fwd_step(q, K, V, n, nm, h, skt, skh, d, qk_scale, m_i, l_i, acc, PRECISION)
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
                    sct, sch, qk_scale, SCORE_N, POOL, PRECISION)


@triton.jit
def _lse2(LSE, GATE, tok, head, valid, slt, slh, sgt, sgh, GATE_B: tl.constexpr):
    """log2-sum-exp of the rows (+inf past the tile); minus log2 of the gate when GATE_B >= 0."""
    lse2 = tl.load(LSE + tok * slt + head * slh, mask=valid, other=float("inf")) * 1.4426950408889634
    if GATE_B >= 0:  # a zero gate gives +inf: P = 0
        lse2 -= tl.log2(tl.load(GATE + tok * sgt + head * sgh + GATE_B, mask=valid, other=1.0).to(tl.float32))
    return lse2


@triton.jit
def _dq_step(q, do, lse2, delta, K, V, n, nm, h, skt, skh, d, qk_scale, dq, MASK: tl.constexpr,
             PRECISION: tl.constexpr):
    """Rows past the tile carry lse = +inf (so P = 0 there without a select); whole chunks (MASK=False) skip masks."""
    k, v = _chunk_kv(K, V, n, nm, h, skt, skh, d, MASK)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
    if MASK:
        p = tl.where(nm[None, :], p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
    ds = p * (dp - delta[:, None])
    return dq + tl.dot(ds.to(k.dtype), k, input_precision=PRECISION)


@triton.jit
def _dq_dkv_step(q, do, lse2, delta, K, V, DK, DV, n, nm, h, skt, skh, d, qk_scale, sm_scale, dq,
                 MASK: tl.constexpr, PRECISION: tl.constexpr):
    """One key chunk of dQ that also adds the chunk's dK = dSᵀQ and dV = PᵀdO over this tile's rows (all G query
    heads of the kv head) into float32 DK, DV with atomics: no dK/dV kernel re-reading q and dO per key chunk.
    Rows past the tile carry lse = +inf (P = 0); keys past the chunk are masked (dQ sums over them). S has the
    queries as M (P, dS transposed for dV, dK): the keys as M spilled and measured slower (docs/ssa.md)."""
    k, v = _chunk_kv(K, V, n, nm, h, skt, skh, d, MASK)
    p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
    if MASK:
        p = tl.where(nm[None, :], p, 0.0)
    ds16 = (p * (tl.dot(do, tl.trans(v), input_precision=PRECISION) - delta[:, None])).to(k.dtype)
    dq += tl.dot(ds16, k, input_precision=PRECISION)
    dv_c = tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
    dk_c = tl.dot(tl.trans(ds16), q, input_precision=PRECISION)
    koff = n[:, None] * skt + h * skh + d[None, :]
    if MASK:
        tl.atomic_add(DK + koff, dk_c * sm_scale, mask=nm[:, None], sem="relaxed")
        tl.atomic_add(DV + koff, dv_c, mask=nm[:, None], sem="relaxed")
    else:
        tl.atomic_add(DK + koff, dk_c * sm_scale, sem="relaxed")
        tl.atomic_add(DV + koff, dv_c, sem="relaxed")
    return dq


@triton.heuristics({**_SEG_SHAPE, "DKV": lambda a: a["DK"] is not None})
@triton.jit
def _bwd_dq_kernel(Q, K, V, O, DO, LSE, DELTA, DQ, TILE_START, TILE_END, SEG_START, SEG_END, SEG_CUM, GATE, LSE_OUT,
                   sqt, sqh, skt, skh, slt, slh, sst, ssh, sgt, sgh, qk_scale, sm_scale,
                   S: tl.constexpr, SP: tl.constexpr, G: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, D: tl.constexpr,
                   ACC: tl.constexpr, GATE_B: tl.constexpr, DK, DV, DKV: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Also writes rowsum(O·dO) into DELTA for itself and a dK/dV kernel after it (no separate pass over O, dO).
    ACC: dQ is added to DQ (written by the branches before). GATE_B >= 0: the log-sum-exp is lse − ln g
    with g = GATE[..., GATE_B] (the gated branch's P, see ops._WholeSSA), stored into LSE_OUT for the dK/dV
    kernel (reading the gate there costs its registers, measured slower). DKV (DK given): also dK, dV of every
    (tile, key chunk) pair added into float32 DK, DV (_dq_dkv_step), so the branch needs no dK/dV kernel."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    tok, head, valid = _rows(TILE_START, TILE_END, tile, h, G, BLOCK_T, BLOCK_R)
    d = tl.arange(0, D)
    qoff = tok[:, None] * sqt + head[:, None] * sqh + d[None, :]
    q = tl.load(Q + qoff, mask=valid[:, None], other=0.0)
    do = tl.load(DO + qoff, mask=valid[:, None], other=0.0)
    lse2 = _lse2(LSE, GATE, tok, head, valid, slt, slh, sgt, sgh, GATE_B)
    if GATE_B >= 0 and not DKV:
        tl.store(LSE_OUT + tok * slt + head * slh, lse2 * 0.6931471805599453, mask=valid)
    o = tl.load(O + qoff, mask=valid[:, None], other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + tok * slt + head * slh, delta, mask=valid)
    dq = tl.zeros([BLOCK_R, D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    base = tile * sst + h * ssh
    shift, lo, hi, total = _segment_table(SEG_START, SEG_END, SEG_CUM, base, S, SP)
    # whole chunks unmasked, then the partial one (rows past the tile have lse = +inf either way)
    full = total - total % BLOCK_N
    if DKV:
        for n0 in range(0, full, BLOCK_N):
            n, nm = _gathered_keys(n0, cols, shift, lo, hi, total)
            dq = _dq_dkv_step(q, do, lse2, delta, K, V, DK, DV, n, nm, h, skt, skh, d, qk_scale, sm_scale, dq, False,
                              PRECISION)
        if full < total:
            n, nm = _gathered_keys(full, cols, shift, lo, hi, total)
            dq = _dq_dkv_step(q, do, lse2, delta, K, V, DK, DV, n, nm, h, skt, skh, d, qk_scale, sm_scale, dq, True,
                              PRECISION)
    else:
        for n0 in range(0, full, BLOCK_N):
            n, nm = _gathered_keys(n0, cols, shift, lo, hi, total)
            dq = _dq_step(q, do, lse2, delta, K, V, n, nm, h, skt, skh, d, qk_scale, dq, False, PRECISION)
        if full < total:
            n, nm = _gathered_keys(full, cols, shift, lo, hi, total)
            dq = _dq_step(q, do, lse2, delta, K, V, n, nm, h, skt, skh, d, qk_scale, dq, True, PRECISION)
    dq = dq * sm_scale
    if ACC:  # the branches before this one wrote DQ; each program owns its rows
        dq += tl.load(DQ + qoff, mask=valid[:, None], other=0.0).to(tl.float32)
    tl.store(DQ + qoff, dq.to(DQ.dtype.element_ty), mask=valid[:, None])


@triton.jit
def _dkv_step(Q, DO, LSE, DELTA, tok, head, valid, k, v, d, sqt, sqh, slt, slh, qk_scale, dk, dv, PAD,
              PRECISION: tl.constexpr):
    """One row step of dK/dV, computed transposed (keys as the matmuls' M, Pᵀ and dSᵀ straight from the
    accumulators as A operands), so no tile is transposed through shared memory. PAD: float32 (+inf, 0) that rows
    past the tile read as lse and rowsum(O·dO), so those loads need no mask (a masked load's fill value costs a
    select and the row mask in the accumulators' column layout: registers the dK/dV kernel does not have)."""
    qoff = tok[:, None] * sqt + head[:, None] * sqh + d[None, :]
    q = tl.load(Q + qoff, mask=valid[:, None], other=0.0)
    do = tl.load(DO + qoff, mask=valid[:, None], other=0.0)
    loff = tok * slt + head * slh  # q = dO = 0 and lse = +inf on rows past the tile: Pᵀ = dSᵀ = 0 there
    lse2 = tl.load(tl.where(valid, LSE + loff, PAD)) * 1.4426950408889634
    delta = tl.load(tl.where(valid, DELTA + loff, PAD + 1))
    # keys past the chunk only fill dK/dV rows never stored
    pt = tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
    dv += tl.dot(pt.to(do.dtype), do, input_precision=PRECISION)
    dst = pt * (tl.dot(v, tl.trans(do), input_precision=PRECISION) - delta[None, :])
    dk += tl.dot(dst.to(q.dtype), q, input_precision=PRECISION)
    return dk, dv


@triton.heuristics({"ITEMS_GIVEN": lambda a: a["ITEMS"] is not None,
                    "TPI": lambda a: max(1, 128 // a["BLOCK_R"]) if a["ITEMS"] is not None else 1})
@triton.jit
def _bwd_dkv_kernel(Q, K, V, DO, LSE, DELTA, DK, DV, TILE_START, TILE_END, CHUNK_START, CHUNK_END, CHUNK_SEG,
                    QPTR, TIDX, ITEMS, sqt, sqh, skt, skh, slt, slh, sph, qk_scale, sm_scale, PAD,
                    G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, TPI: tl.constexpr,
                    BLOCK_N: tl.constexpr, D: tl.constexpr, ATOMIC: tl.constexpr, ITEMS_GIVEN: tl.constexpr,
                    PRECISION: tl.constexpr):
    """dK/dV of one key chunk over tiles that attended to it. ITEMS given (selection): one work item (chunk, kv
    head, range of its tile list) per program, TPI short tiles side by side per step. Otherwise (compression):
    a (chunk, kv head, split) program walks its share of the chunk's list, whose entries are long tiles (pieces
    of a shape's queries) walked in BLOCK_R-row steps."""
    if ITEMS_GIVEN:
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
    if ITEMS_GIVEN:  # TPI short tiles side by side per step
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
            dk, dv = _dkv_step(Q, DO, LSE, DELTA, tok, head, valid, k, v, d, sqt, sqh, slt, slh, qk_scale, dk, dv,
                               PAD, PRECISION)
    else:  # long tiles: each walked in steps of BLOCK_R rows
        r = tl.arange(0, BLOCK_R)
        for i in range(a, b):
            tile = tl.load(TIDX + i)
            t0 = tl.load(TILE_START + tile)
            rows = (tl.load(TILE_END + tile) - t0) * G
            for r0 in range(0, rows, BLOCK_R):
                tok = t0 + (r0 + r) // G
                head = h * G + (r0 + r) % G
                dk, dv = _dkv_step(Q, DO, LSE, DELTA, tok, head, r0 + r < rows, k, v, d, sqt, sqh, slt, slh,
                                   qk_scale, dk, dv, PAD, PRECISION)
    if ATOMIC:
        if b > a:  # work items past the last (the grid is an upper bound) add nothing
            tl.atomic_add(DK + koff, dk * sm_scale, mask=nm[:, None], sem="relaxed")
            tl.atomic_add(DV + koff, dv, mask=nm[:, None], sem="relaxed")
    else:
        tl.store(DK + koff, (dk * sm_scale).to(DK.dtype.element_ty), mask=nm[:, None])
        tl.store(DV + koff, dv.to(DV.dtype.element_ty), mask=nm[:, None])


@dataclass(kw_only=True)
class SegmentPlan:
    """Which key ranges each query tile attends to, and the lists its dK/dV kernel walks.

    seg_start/seg_end: int32 (n_tiles, Hkv or 1, S); seg_cum: exclusive prefix sums of the segment lengths
    along S (None allowed for S = 1). dK/dV kernel (branches without ``launch.dkv_in_dq``): key chunks
    (chunk_start, chunk_end, chunk_seg) and either, per (kv head, segment), the range
    qptr[h * qptr_head_stride + seg : ... + 1] of ``tidx`` listing the tiles ``dkv_tile_start/end`` that use it
    (compression), or ``lists`` building those lists and the work items on the device (selection).
    """
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    seg_start: torch.Tensor
    seg_end: torch.Tensor
    seg_cum: torch.Tensor | None = None
    block_t: int  # query tokens per tile
    launch: BranchLaunch
    chunk_start: torch.Tensor | None = None
    chunk_end: torch.Tensor | None = None
    chunk_seg: torch.Tensor | None = None
    qptr: torch.Tensor | None = None
    tidx: torch.Tensor | None = None
    qptr_head_stride: int = 0
    dkv_tile_start: torch.Tensor | None = None
    dkv_tile_end: torch.Tensor | None = None
    dkv_split: int = 1  # programs per key chunk in dK/dV (partial sums added atomically in float32)
    lists: object = None  # (per_item, n_items) -> (qptr, tidx, work items) built on the device
    dkv_entries: int = 0  # bound on the tile-list entries summed over chunks and heads (the work-item grid)


def _pad(device) -> torch.Tensor:
    """(+inf, 0) float32: what the dK/dV kernel reads as lse and rowsum(O·dO) for rows past a tile."""
    if device not in _PADS:
        _PADS[device] = torch.tensor([float("inf"), 0.0], dtype=torch.float32, device=device)
    return _PADS[device]


def _rows_for(block_t: int, g: int) -> int:
    return max(16, triton.next_power_of_2(block_t * g))


def _seg_strides(t: torch.Tensor):
    return t.stride(0), (t.stride(1) if t.shape[1] > 1 else 0)


def _seg_cum(plan) -> torch.Tensor:
    if plan.seg_cum is not None:
        return plan.seg_cum
    if plan.seg_start.shape[2] != 1:
        raise ValueError(f"a plan with {plan.seg_start.shape[2]} segments per tile needs seg_cum")
    return torch.zeros_like(plan.seg_start)  # one segment: it starts the concatenation


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
    extra = {}
    if scores is not None:
        score, unit, to_slc, score_n = scores
        extra = dict(SCORE=score, TILE_UNIT=unit, CMP_TO_SLC=to_slc if to_slc is not None else unit,
                     sct=score.stride(0), sch=score.stride(1), SCORE_N=score_n, POOL=to_slc is not None)
    if mix is not None:
        o0, o1, gates, out = mix
        if not (o0.stride() == o1.stride() == out.stride() == o.stride() and gates.is_contiguous()
                and o.stride(0) == hq * d):
            raise ValueError("the gated sum needs contiguous outputs and gates")
        extra.update(O0=o0, O1=o1, GATE=gates, OUT=out)
    if n_tiles:
        sst, ssh = _seg_strides(plan.seg_start)
        _fwd_kernel[(n_tiles, hkv)](
            q, k, v, o, lse, plan.tile_start, plan.tile_end, plan.seg_start, plan.seg_end, _seg_cum(plan),
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), o.stride(0), o.stride(1), lse.stride(0), lse.stride(1),
            sst, ssh, d ** -0.5 * LOG2E, S=plan.seg_start.shape[2], G=g, BLOCK_T=plan.block_t,
            BLOCK_N=plan.launch.block_n, D=d, LEAN=plan.launch.lean, PRECISION=dot_precision(q.dtype), **extra,
            **plan.launch.fwd.options(_rows_for(plan.block_t, g)))
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
    n_tiles = plan.tile_start.numel()
    delta = delta_into if delta_into is not None else torch.empty(o.shape[:2], dtype=torch.float32,
                                                                  device=o.device)
    lse_kv = lse  # the dK/dV kernel's log-sum-exp: lse − ln g written by the dQ kernel when gated
    if gate is not None:
        if n_tiles == 0:
            raise ValueError("a gated backward needs the dQ kernel")
        lse_kv = torch.empty_like(lse)
    dq = dq_into if dq_into is not None else _new(q.shape, q)
    dkv_here = plan.launch.dkv_in_dq and n_tiles > 0  # dK/dV added by the dQ kernel (float32 atomics)
    atomic = plan.dkv_split > 1 or plan.launch.dkv_steps > 0 or dkv_into is not None or dkv_here
    if dkv_into is not None:
        dk, dv = dkv_into
    else:
        dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device) if atomic else _new(k.shape, k)
        dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device) if atomic else _new(v.shape, v)
    br = _rows_for(plan.block_t, g)
    if n_tiles:
        sst, ssh = _seg_strides(plan.seg_start)
        gate_args = (gate, gate.stride(0), gate.stride(1)) if gate is not None else (lse, 0, 0)
        _bwd_dq_kernel[(n_tiles, hkv)](
            q, k, v, o, do, lse, delta, dq, plan.tile_start, plan.tile_end, plan.seg_start, plan.seg_end,
            _seg_cum(plan), gate_args[0], lse_kv, q.stride(0), q.stride(1), k.stride(0), k.stride(1), lse.stride(0),
            lse.stride(1), sst, ssh, *gate_args[1:], d ** -0.5 * LOG2E, d ** -0.5, S=plan.seg_start.shape[2], G=g,
            BLOCK_T=plan.block_t, BLOCK_N=plan.launch.block_n, D=d, ACC=dq_into is not None,
            GATE_B=gate_b if gate is not None else -1, DK=dk if dkv_here else None, DV=dv if dkv_here else None,
            PRECISION=dot_precision(q.dtype), **plan.launch.dq.options(br))
    n_chunks = 0 if dkv_here or plan.chunk_start is None else plan.chunk_start.numel()
    side = contextlib.nullcontext()
    if dkv_stream is not None and n_chunks:
        ready = torch.cuda.Event()
        ready.record()
        dkv_stream.wait_event(ready)
        side = torch.cuda.stream(dkv_stream)
        keep.extend((q, k, v, do, lse_kv, delta))
    with side:
        if n_chunks:
            _launch_dkv(q, k, v, do, lse, lse_kv, delta, dk, dv, plan, g, br, atomic)
    if dkv_into is not None:
        return (dq, dk, dv, delta) if want_delta else (dq, dk, dv)  # float32 sums, cast after the last branch
    if atomic:
        dk, dv = dk.to(k.dtype), dv.to(v.dtype)
    return (dq, dk, dv, delta) if want_delta else (dq, dk, dv)


def _launch_dkv(q, k, v, do, lse, lse_kv, delta, dk, dv, plan, g, br, atomic):
    """The dK/dV kernel of one branch (and the selection's lists and work items)."""
    hkv, d = k.shape[1], k.shape[2]
    n_chunks = plan.chunk_start.numel()
    qptr, tidx, items = plan.qptr, plan.tidx, None
    ts, te = plan.tile_start, plan.tile_end
    grid = (n_chunks, hkv, plan.dkv_split)
    if plan.lists is not None:  # selection: lists and work items built on the device, no host sync
        per_item = plan.launch.dkv_steps * max(1, 128 // br)
        qptr, tidx, items = plan.lists(per_item, hkv * n_chunks + triton.cdiv(plan.dkv_entries, per_item))
        qptr = None
        grid = (items.shape[0],)
    else:  # compression: entries are pieces of a shape's queries
        ts, te = plan.dkv_tile_start, plan.dkv_tile_end
    if grid[0]:
        rows = br * max(1, 128 // br) if items is not None else br
        _bwd_dkv_kernel[grid](
            q, k, v, do, lse_kv, delta, dk, dv, ts, te, plan.chunk_start, plan.chunk_end,
            plan.chunk_seg, qptr, tidx, items, q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            lse.stride(0), lse.stride(1), plan.qptr_head_stride, d ** -0.5 * LOG2E, d ** -0.5, _pad(k.device),
            G=g, BLOCK_T=plan.block_t, BLOCK_R=br, BLOCK_N=plan.launch.dkv_block_n, D=d, ATOMIC=atomic,
            PRECISION=dot_precision(q.dtype), **plan.launch.dkv.options(rows))


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
