"""Selection scores: compression probabilities summed per selection block, and the top-k blocks.

Direct3D-S2 Sec. 3.3: a block's score is the compression attention probability summed over the
G query heads of a KV group (and over the compression blocks inside the selection block, and over
the queries of a tile when q_tile > 1). Probabilities are recomputed from the saved log-sum-exp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .segment_attention import LOG2E, Launch, _new, _rows, _rows_for, dot_precision


@dataclass(frozen=True)
class ScoringLaunch:
    """Launch settings of the scoring and list kernels, the measured fastest (benchmarks/RESULTS.md)."""
    select_rows: int = 64  # rows (units × tokens × heads) per program of the one-pass scoring + top-k
    select_block_n: int = 64  # its key chunk; 32 for units of 128 rows
    score_block_n: int = 64  # key chunk of the score-matrix kernel and of the compression forward's score pass
    list_block: int = 1024  # entries per program of the dK/dV list kernels
    # per-query pooled select (select_pooled, m_cmp < m_slc; 0.77–0.83× the score matrix + rank_blocks at 131k,
    # H100): whether select_blocks and the whole SSA use it, rows (tokens × G heads) per program, its key chunk
    # and launch
    pooled_select: bool = True
    pooled_rows: int = 128
    pooled_block_n: int = 32
    pooled: Launch = Launch(num_warps=4)

    def select_chunk(self, rows: int) -> int:
        return 32 if rows == 128 else self.select_block_n


SCORING = ScoringLaunch()


@triton.jit
def _segmented_add(a, fa, b, fb):
    """Scan step of a sum that restarts where a flag is set (the flag marks the first element of a run)."""
    return tl.where(fb != 0, b, a + b), fa | fb


@triton.jit
def _score_kernel(Q, KC, LSE, SCORE, TILE_START, TILE_END, TILE_SEG, TILE_UNIT, CMP_OFF, CMP_TO_SLC,
                  sqt, sqh, skt, skh, slt, slh, sct, sch, qk_scale,
                  G: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  D: tl.constexpr, POOL: tl.constexpr, PRECISION: tl.constexpr):
    """Adds one tile's probabilities, summed over its rows, into the score row of its selection unit. The sums
    come from Pᵀ (keys as the matmul's M): float32 sums along accumulator rows, no transpose."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    tok, head, valid = _rows(TILE_START, TILE_END, tile, h, G, BLOCK_T, BLOCK_R)
    d = tl.arange(0, D)
    q = tl.load(Q + tok[:, None] * sqt + head[:, None] * sqh + d[None, :], mask=valid[:, None], other=0.0)
    # rows past the tile: lse = +inf, so their P is 0
    lse2 = tl.load(LSE + tok * slt + head * slh, mask=valid, other=float("inf")) * 1.4426950408889634
    seg = tl.load(TILE_SEG + tile)
    row = SCORE + tl.load(TILE_UNIT + tile).to(tl.int64) * sct + h * sch
    c0 = tl.load(CMP_OFF + seg)
    c1 = tl.load(CMP_OFF + seg + 1)
    cols = tl.arange(0, BLOCK_N)
    for n0 in range(c0, c1, BLOCK_N):
        n = n0 + cols
        nm = n < c1
        k = tl.load(KC + n[:, None] * skt + h * skh + d[None, :], mask=nm[:, None], other=0.0)
        # summed over the G heads of this kv group and the tile's tokens; rows past the tile have lse = +inf
        # (Pᵀ = 0), columns past the shape sum garbage that the masked atomic never adds
        s = tl.sum(tl.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :]), 1)
        if POOL:
            # Compression blocks come in selection-block order, so the chunk's keys form runs of one selection
            # block each: a segmented scan sums each run and only a run's last key in the chunk issues the
            # float32 atomic (about BLOCK_N / 4.6 a chunk on a surface instead of one per key, none of them on
            # a shared address).
            col = tl.load(CMP_TO_SLC + n, mask=nm, other=-1)
            prev = tl.load(CMP_TO_SLC + n - 1, mask=nm & (cols > 0), other=-2)
            nxt = tl.load(CMP_TO_SLC + n + 1, mask=nm & (n + 1 < c1), other=-3)
            run = tl.associative_scan((s, (col != prev).to(tl.int32)), 0, _segmented_add)[0]
            tl.atomic_add(row + col, run, mask=nm & ((col != nxt) | (cols == BLOCK_N - 1)))  # and at the chunk's end
        else:  # compression blocks are the selection blocks
            tl.atomic_add(row + n - c0, s, mask=nm)


def block_scores(q, k_cmp, lse_cmp, structure, q_tile: int, n_cols: int):
    """Per (query tile of q_tile tokens, kv head) sum of compression probabilities per selection block.

    Returns float32 (n_tiles, Hkv, n_cols) indexed by the block's number inside its shape, 0 past the
    shape's blocks. Programs hold at most 128 rows (tokens × G heads); a longer tile is summed by
    several programs adding into its row."""
    n, hq, d = q.shape
    hkv = k_cmp.shape[1]
    g = hq // hkv
    st = structure
    sub = q_tile if q_tile * g <= 128 else max(1, 128 // g)  # scoring: 128 rows per program
    ts, te, tseg, _ = st.tiles("shape", sub)
    unit = st.cached(("tile_unit", sub, q_tile), lambda: _unit_of_tile(st, sub, q_tile))
    cmp_off = st.cached("cmp_shape_offsets32", lambda: st.cmp_shape_offsets.to(torch.int32))
    pool = st.cmp_block != st.slc_block
    n_units = st.n_tiles("shape", q_tile)
    score = torch.zeros((n_units, hkv, n_cols), dtype=torch.float32, device=q.device)
    _score_kernel[(ts.numel(), hkv)](
        q, k_cmp, lse_cmp, score, ts, te, tseg, unit, cmp_off, st.cmp_to_slc_local,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), lse_cmp.stride(0), lse_cmp.stride(1),
        score.stride(0), score.stride(1), d ** -0.5 * LOG2E, G=g, BLOCK_T=sub,
        BLOCK_R=_rows_for(sub, g), BLOCK_N=SCORING.score_block_n, D=d, POOL=pool,
        PRECISION=dot_precision(q.dtype), **Launch().options(_rows_for(sub, g)))
    return score


def _unit_of_tile(st, sub: int, q_tile: int) -> torch.Tensor:
    """Index of the q_tile-token unit that holds each sub-token tile (sub divides q_tile; both start at shapes)."""
    ts, _, tseg, _ = st.tiles("shape", sub)
    unit_off = st.tiles("shape", q_tile)[3]
    seg = tseg.long()
    return (unit_off[seg] + (ts - st.cu_seqlens[seg]) // q_tile).to(torch.int32)


@triton.jit
def _segments_kernel(SEL, UNIT, OFF, SEG_START, SEG_END, SEG_CUM, n_rows, HKV: tl.constexpr, K: tl.constexpr,
                     KP: tl.constexpr, HAS_UNIT: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)  # (tile, kv head) pairs
    rm = r < n_rows
    tile = r // HKV
    if HAS_UNIT:
        unit = tl.load(UNIT + tile, mask=rm, other=0)
    else:
        unit = tile
    kk = tl.arange(0, KP)
    m = rm[:, None] & (kk[None, :] < K)
    blk = tl.load(SEL + (unit * HKV + r % HKV)[:, None] * K + kk[None, :], mask=m, other=-1)
    ok = m & (blk >= 0)
    a = tl.load(OFF + blk, mask=ok, other=0).to(tl.int32)
    e = tl.load(OFF + blk + 1, mask=ok, other=0).to(tl.int32)
    cum = tl.cumsum(e - a, 1) - (e - a)
    out = r[:, None] * K + kk[None, :]
    tl.store(SEG_START + out, a, mask=m)
    tl.store(SEG_END + out, e, mask=m)
    tl.store(SEG_CUM + out, cum, mask=m)


def selected_segments(selected: torch.Tensor, offsets: torch.Tensor, unit: torch.Tensor | None = None):
    """Key ranges of the selected blocks: int32 (start, end, exclusive prefix sum of the lengths), each
    (n_tiles, Hkv, k), empty where the id is -1. ``unit`` maps each tile to its row of ``selected``
    (sub-tiles sharing a unit's selection). One launch instead of a dozen tensor ops per call."""
    selected = selected.contiguous()
    n_units, hkv, k = selected.shape
    n_tiles = n_units if unit is None else unit.numel()
    out = [torch.empty((n_tiles, hkv, k), dtype=torch.int32, device=selected.device) for _ in range(3)]
    n_rows = n_tiles * hkv
    if n_rows:
        block = 64
        _segments_kernel[(triton.cdiv(n_rows, block),)](
            selected, unit if unit is not None else selected, offsets, *out, n_rows, HKV=hkv, K=k,
            KP=triton.next_power_of_2(k), HAS_UNIT=unit is not None, BLOCK=block)
    return out


@triton.jit
def _unit_rows(Q, LSE, t0, t1, h, r0, sqt, sqh, slt, slh, G: tl.constexpr, RB: tl.constexpr, D: tl.constexpr):
    """Queries and log2-sum-exp of rows r0..r0+RB of a program (units × tokens × G heads)."""
    r = r0 + tl.arange(0, RB)
    tok = t0 + r // G
    head = h * G + r % G
    valid = tok < t1
    d = tl.arange(0, D)
    q = tl.load(Q + tok[:, None] * sqt + head[:, None] * sqh + d[None, :], mask=valid[:, None], other=0.0)
    lse2 = tl.load(LSE + tok * slt + head * slh, mask=valid, other=0.0) * 1.4426950408889634
    return q, lse2, valid


@triton.jit
def _unit_col_sums(q, lse2, valid, k, nm, qk_scale, P: tl.constexpr, RB: tl.constexpr, BLOCK_N: tl.constexpr,
                   PRECISION: tl.constexpr):
    """Probabilities of one row step against one key chunk, summed per unit: (P, BLOCK_N)."""
    qk = tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale
    p = tl.where(valid[:, None] & nm[None, :], tl.exp2(qk - lse2[:, None]), 0.0)
    return tl.sum(tl.reshape(p, [P, RB // P, BLOCK_N]), 1)


@triton.jit
def _topk_insert(cand, ids, top_v, top_i, cols, kk):
    """Running top-k per unit: the chunk's best candidate (units, keys) replaces the unit's weakest slot while it
    beats it (strictly: of equal scores the one seen first stays, and of equal weakest slots the one of the
    highest id goes, so with candidates in increasing id order the lower id wins every tie); after the first
    chunks few do, so the loop is short. ids (keys,) names each candidate column."""
    kth = tl.min(top_v, 1)
    while tl.sum((tl.max(cand, 1) > kth).to(tl.int32), 0) > 0:  # comparisons: no inf - inf
        bc = tl.max(cand, 1)
        ic = tl.argmax(cand, 1)
        slot = tl.argmax(tl.where(top_v == kth[:, None], top_i, -2), 1)
        ins = bc > kth
        put = (kk[None, :] == slot[:, None]) & ins[:, None]
        bid = tl.sum(tl.where(cols[None, :] == ic[:, None], ids[None, :], 0), 1)
        top_v = tl.where(put, bc[:, None], top_v)
        top_i = tl.where(put, bid[:, None], top_i)
        cand = tl.where((cols[None, :] == ic[:, None]) & ins[:, None], float("-inf"), cand)
        kth = tl.min(top_v, 1)
    return top_v, top_i


@triton.jit
def _select_kernel(Q, KC, LSE, SEL, TILE_START, TILE_END, TILE_SEG, CMP_OFF, CU, UNIT_OFF,
                   sqt, sqh, skt, skh, slt, slh, sst, ssh, qk_scale,
                   TOPK: tl.constexpr, KP: tl.constexpr, G: tl.constexpr, Q_TILE: tl.constexpr, P: tl.constexpr,
                   BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    """Block scores and a running top-k in one pass (compression blocks = selection blocks), for units of at most
    128 rows: a program holds P selection units (query tiles of Q_TILE tokens) of one shape; rows are
    units × tokens × the G heads of a kv group, and each unit keeps its own top-k (no score matrix, no atomics)."""
    tile = tl.program_id(0)
    h = tl.program_id(1)
    RB: tl.constexpr = P * Q_TILE * G  # rows
    t0 = tl.load(TILE_START + tile)
    t1 = tl.load(TILE_END + tile)
    seg = tl.load(TILE_SEG + tile)
    c0 = tl.load(CMP_OFF + seg)
    c1 = tl.load(CMP_OFF + seg + 1)
    cols = tl.arange(0, BLOCK_N)
    d = tl.arange(0, D)
    kk = tl.arange(0, KP)
    # slots past TOPK hold +inf so the minimum (the k-th best) never lands on them
    top_v = tl.where(kk[None, :] < TOPK, tl.full([P, KP], float("-inf"), tl.float32), float("inf"))
    top_i = tl.full([P, KP], -1, tl.int32)
    q, lse2, valid = _unit_rows(Q, LSE, t0, t1, h, 0, sqt, sqh, slt, slh, G, RB, D)
    for n0 in range(c0, c1, BLOCK_N):
        n = n0 + cols
        nm = n < c1
        k = tl.load(KC + n[:, None] * skt + h * skh + d[None, :], mask=nm[:, None], other=0.0)
        # summed over the G heads of the kv group and the unit's tokens
        s = _unit_col_sums(q, lse2, valid, k, nm, qk_scale, P, RB, BLOCK_N, PRECISION)
        top_v, top_i = _topk_insert(tl.where(nm[None, :], s, float("-inf")), n, top_v, top_i, cols, kk)
    out = tl.where((top_v > float("-inf")) & (kk[None, :] < TOPK), top_i, -1)
    unit = tl.load(UNIT_OFF + seg) + (t0 - tl.load(CU + seg)) // Q_TILE + tl.arange(0, P)
    umask = t0 + tl.arange(0, P) * Q_TILE < t1
    tl.store(SEL + unit[:, None] * sst + h * ssh + kk[None, :], out.to(tl.int64),
             mask=umask[:, None] & (kk[None, :] < TOPK))


def select_topk(q, k_cmp, lse_cmp, structure, top_k: int, q_tile: int):
    """Top-k global block ids (n_units, Hkv, top_k), -1 past the shape's blocks; needs m_cmp == m_slc and units
    of at most 128 rows (q_tile × G)."""
    n, hq, d = q.shape
    hkv = k_cmp.shape[1]
    g = hq // hkv
    u = q_tile * g
    if u > 128:
        raise ValueError(f"select_topk takes units of at most 128 rows, got {q_tile} tokens × {g} heads")
    p = max(1, SCORING.select_rows // u)
    if u < 16:
        p = max(p, 16 // u)
    st = structure
    _, _, _, unit_off = st.tiles("shape", q_tile)
    ts, te, tseg, _ = st.tiles("shape", p * q_tile)
    cu = st.cached("cu32", lambda: st.cu_seqlens.to(torch.int32))
    cmp_off = st.cached("cmp_shape_offsets32", lambda: st.cmp_shape_offsets.to(torch.int32))
    sel = _new((st.n_tiles("shape", q_tile), hkv, top_k), q, torch.int64)
    _select_kernel[(ts.numel(), hkv)](
        q, k_cmp, lse_cmp, sel, ts, te, tseg, cmp_off, cu, unit_off,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), lse_cmp.stride(0), lse_cmp.stride(1),
        sel.stride(0), sel.stride(1), d ** -0.5 * LOG2E, TOPK=top_k, KP=triton.next_power_of_2(top_k), G=g,
        Q_TILE=q_tile, P=p, BLOCK_N=SCORING.select_chunk(u), D=d, PRECISION=dot_precision(q.dtype),
        **Launch().options(p * u))
    return sel


@triton.jit
def _program_keys(TILE_START, TILE_END, TILE_SEG, CMP_OFF, tile):
    """A select program's tokens [t0, t1), its shape and the shape's pooled keys [c0, c1). (_select_kernel keeps
    these loads inline: through this helper its sm_90 code changes by a register move.)"""
    t0 = tl.load(TILE_START + tile)
    t1 = tl.load(TILE_END + tile)
    seg = tl.load(TILE_SEG + tile)
    return t0, t1, seg, tl.load(CMP_OFF + seg), tl.load(CMP_OFF + seg + 1)


@triton.jit
def _topk_insert_wide(cand, blk, top_v, top_i, kth, slot, cols):
    """Running top-k per token for candidates that come in increasing block order, chunk by chunk: the chunk's
    best candidate replaces the token's weakest slot while it beats it. Of equal scores the lower block stays:
    the leftmost best goes first, and of equal weakest slots the one of the highest block goes.

    Every tensor has the candidates' (tokens, keys) shape and so their layout: the top-k lives in the first k
    columns of top_v / top_i (+inf past them), the weakest score and its slot are carried broadcast along the
    row (kth, slot), blk (1, keys) holds each column's block. Only the loop's condition crosses warps; (tokens, k)
    state or carried (tokens,) vectors converted layouts through shared memory every step (19.1 → 16.0 ms at
    131k tokens on an H100, benchmarks/RESULTS.md)."""
    go = tl.sum((cand > kth).to(tl.int32))
    while go > 0:
        best, col = tl.max(cand, 1, return_indices=True, return_indices_tie_break_left=True)
        ins = best[:, None] > kth
        put = (cols[None, :] == slot) & ins
        hit = (cols[None, :] == col[:, None]) & ins
        top_v = tl.where(put, best[:, None], top_v)
        top_i = tl.where(put, tl.sum(tl.where(hit, blk, 0), 1)[:, None], top_i)
        cand = tl.where(hit, float("-inf"), cand)
        k_min = tl.min(top_v, 1)
        kth = tl.broadcast_to(k_min[:, None], kth.shape)
        weakest = tl.argmax(tl.where(top_v == k_min[:, None], top_i, -2), 1, tie_break_left=True)
        slot = tl.broadcast_to(weakest[:, None], slot.shape)
        go = tl.sum((cand > kth).to(tl.int32))
    return top_v, top_i, kth, slot


@triton.jit
def _select_pooled_kernel(Q, KC, LSE, SEL, TILE_START, TILE_END, TILE_SEG, CMP_OFF, SLC_OFF, CMP_TO_SLC,
                          sqt, sqh, skt, skh, slt, slh, sst, ssh, qk_scale,
                          TOPK: tl.constexpr, G: tl.constexpr, P: tl.constexpr,
                          BLOCK_N: tl.constexpr, D: tl.constexpr, PRECISION: tl.constexpr):
    """Per-query block scores and top-k in one pass when a selection block holds several compression blocks.

    A program holds P tokens × the G heads of kv head h (row t·G + g) and walks its shape's pooled keys in
    contiguous chunks. Per token, a chunk's probabilities summed over the G heads are summed again over each run
    of keys of one selection block (a segmented scan); a block cut by the chunk's end carries its partial sum
    into the next chunk, and only whole blocks enter the token's running top-k: no score matrix, no atomics."""
    h = tl.program_id(1)
    RB: tl.constexpr = P * G
    t0, t1, seg, c0, c1 = _program_keys(TILE_START, TILE_END, TILE_SEG, CMP_OFF, tl.program_id(0))
    tok_ok = t0 + tl.arange(0, P) < t1
    cols = tl.arange(0, BLOCK_N)
    # the top-k in the first TOPK columns (+inf past them, never the weakest), its weakest score and slot
    top_v = tl.where(cols[None, :] < TOPK, tl.full([P, BLOCK_N], float("-inf"), tl.float32), float("inf"))
    top_i = tl.full([P, BLOCK_N], -1, tl.int32)
    kth = tl.full([P, BLOCK_N], float("-inf"), tl.float32)
    slot = tl.zeros([P, BLOCK_N], tl.int32)
    d = tl.arange(0, D)
    carry = tl.zeros([P], tl.float32)  # per token: the partial sum of the block cut by the last chunk's end
    q, lse2, valid = _unit_rows(Q, LSE, t0, t1, h, 0, sqt, sqh, slt, slh, G, RB, D)
    lse2 = tl.where(valid, lse2, float("inf"))  # rows past the shape: P = 0
    for n0 in range(c0, c1, BLOCK_N):
        n = n0 + cols
        nm = n < c1
        k = tl.load(KC + n[:, None] * skt + h * skh + d[None, :], mask=nm[:, None], other=0.0)
        # selection block of each key as a (1, keys) row, in the layout of the (tokens, keys) sums
        n2 = n0 + cols[None, :]
        nm2 = n2 < c1
        blk = tl.load(CMP_TO_SLC + n2, mask=nm2, other=-1)
        prev = tl.load(CMP_TO_SLC + n2 - 1, mask=nm2 & (n2 > n0), other=-2)  # the chunk's first key starts a run
        nxt = tl.load(CMP_TO_SLC + n2 + 1, mask=n2 + 1 < c1, other=-3)
        cont = tl.load(CMP_TO_SLC + n0 - 1, mask=n0 > c0, other=-4)  # the block the last chunk ended in
        # columns past the shape are not masked here: their (finite or +inf, never NaN) sums stay in runs of
        # their own that never become candidates
        p = tl.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
        s = tl.sum(tl.reshape(p, [P, G, BLOCK_N]), 1)  # (tokens, keys): over the G heads
        run = tl.associative_scan((s, tl.broadcast_to((blk != prev).to(tl.int32), [P, BLOCK_N])), 1,
                                  _segmented_add)[0]
        run += tl.where(blk == cont, carry[:, None], 0.0)
        done = nm2 & (blk != nxt)  # a block's last key: the next key is another block's or past the shape
        carry = tl.sum(tl.where((n2 == n0 + BLOCK_N - 1) & ~done, run, 0.0), 1)
        cand = tl.where(tok_ok[:, None] & done, run, float("-inf"))
        top_v, top_i, kth, slot = _topk_insert_wide(cand, blk, top_v, top_i, kth, slot, cols)
    base = tl.load(SLC_OFF + seg)
    out = tl.where((top_v > float("-inf")) & (cols[None, :] < TOPK), top_i.to(tl.int64) + base, -1)
    tok = t0 + tl.arange(0, P)
    tl.store(SEL + tok[:, None].to(tl.int64) * sst + h * ssh + cols[None, :], out,
             mask=tok_ok[:, None] & (cols[None, :] < TOPK))


def select_pooled(q, k_cmp, lse_cmp, structure, top_k: int, tokens_per_program: int | None = None,
                  block_n: int | None = None):
    """Per-query top-k global block ids (n_tokens, Hkv, top_k), -1 past the shape's blocks, in one kernel for
    m_cmp < m_slc; of equal scores the lower block id wins. In place of the score matrix + rank_blocks
    (block_scores with q_tile 1) when ScoringLaunch.pooled_select: the same exponentials, no matrix and no atomics. ``tokens_per_program`` and
    ``block_n`` (pooled keys per chunk) default to ScoringLaunch's pooled_rows // G and pooled_block_n."""
    n, hq, d = q.shape
    hkv = k_cmp.shape[1]
    g = hq // hkv
    p = tokens_per_program or max(1, SCORING.pooled_rows // g)
    if p & (p - 1) or p * g < 16:
        raise ValueError(f"tokens_per_program must be a power of two of at least 16 rows, got {p} × {g} heads")
    # the top-k lives in the first columns of a chunk's row
    block_n = max(block_n or SCORING.pooled_block_n, triton.next_power_of_2(top_k))
    st = structure
    ts, te, tseg, _ = st.tiles("shape", p)
    cmp_off = st.cached("cmp_shape_offsets32", lambda: st.cmp_shape_offsets.to(torch.int32))
    q, k_cmp = q.contiguous(), k_cmp.contiguous()
    sel = _new((n, hkv, top_k), q, torch.int64)
    _select_pooled_kernel[(ts.numel(), hkv)](
        q, k_cmp, lse_cmp, sel, ts, te, tseg, cmp_off, st.slc_shape_offsets, st.cmp_to_slc_local,
        q.stride(0), q.stride(1), k_cmp.stride(0), k_cmp.stride(1), lse_cmp.stride(0), lse_cmp.stride(1),
        sel.stride(0), sel.stride(1), d ** -0.5 * LOG2E, TOPK=top_k, G=g, P=p, BLOCK_N=block_n, D=d,
        PRECISION=dot_precision(q.dtype), **SCORING.pooled.options(p * g))
    return sel


@triton.jit
def _rank_kernel(SCORE, NBLK, BASE, SEL, n_rows, hkv, ssu, ssh, slu, slh,
                 TOPK: tl.constexpr, KP: tl.constexpr, P: tl.constexpr, BLOCK_N: tl.constexpr):
    """Top-k columns of P rows (unit, kv head) of the score matrix by a running top-k over column chunks, read
    once and only up to each row's own block count: global block ids (first block + column), -1 past them."""
    r = tl.program_id(0) * P + tl.arange(0, P)
    rm = r < n_rows
    unit = r // hkv
    h = r % hkv
    nb = tl.load(NBLK + unit, mask=rm, other=0)
    base = tl.load(BASE + unit, mask=rm, other=0)
    cols = tl.arange(0, BLOCK_N)
    kk = tl.arange(0, KP)
    top_v = tl.where(kk[None, :] < TOPK, tl.full([P, KP], float("-inf"), tl.float32), float("inf"))
    top_i = tl.full([P, KP], -1, tl.int32)
    rows = SCORE + unit[:, None].to(tl.int64) * ssu + h[:, None] * ssh
    for c0 in range(0, tl.max(nb, 0), BLOCK_N):
        c = c0 + cols
        v = tl.load(rows + c[None, :], mask=c[None, :] < nb[:, None], other=float("-inf"))
        top_v, top_i = _topk_insert(v, c, top_v, top_i, cols, kk)
    out = tl.where((top_v > float("-inf")) & (kk[None, :] < TOPK), top_i.to(tl.int64) + base[:, None], -1)
    tl.store(SEL + unit[:, None].to(tl.int64) * slu + h[:, None] * slh + kk[None, :], out,
             mask=rm[:, None] & (kk[None, :] < TOPK))


def rank_blocks(score: torch.Tensor, n_blocks: torch.Tensor, first_block: torch.Tensor, top_k: int):
    """Top-k global block ids (units, Hkv, top_k) of a (units, Hkv, n_cols) float32 score matrix whose unit u
    has n_blocks[u] columns (its shape's selection blocks) numbered from first_block[u]; -1 past them. Of equal
    scores the lower column wins."""
    units, hkv, _ = score.shape
    sel = torch.empty((units, hkv, top_k), dtype=torch.int64, device=score.device)
    p = 16
    _rank_kernel[(triton.cdiv(units * hkv, p),)](
        score, n_blocks, first_block, sel, units * hkv, hkv, score.stride(0), score.stride(1),
        sel.stride(0), sel.stride(1), TOPK=top_k, KP=triton.next_power_of_2(top_k), P=p, BLOCK_N=128, num_warps=4)
    return sel


# ------------------------------------------------------------------ dK/dV lists of the selection, on the GPU
# For each (kv head, block) the tiles that selected it, and the work items (chunk, kv head, first, end) of the
# dK/dV kernel: a counting sort (atomic ranks) and two prefix sums in three launches and one memset, instead of
# a sort, searchsorted and ~20 small tensor ops per backward (the 8k backward is bound by the host).
@triton.jit
def _list_count_kernel(SEL, COUNT, RANK, n_entries, n_slc, HKV: tl.constexpr, K: tl.constexpr,
                       BLOCK: tl.constexpr):
    e = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = e < n_entries
    blk = tl.load(SEL + e, mask=m, other=-1).to(tl.int32)
    ok = m & (blk >= 0)
    lst = ((e // K) % HKV) * n_slc + blk
    rank = tl.atomic_add(COUNT + lst, tl.full([BLOCK], 1, tl.int32), mask=ok, sem="relaxed")
    tl.store(RANK + e, rank, mask=ok)


@triton.jit
def _list_scan_kernel(COUNT, QPTR, CHUNK_SEG, ENDS, n_lists, n_chunks, n_slc, per_item, HKV: tl.constexpr,
                      BLOCK: tl.constexpr):
    """One program: list starts (qptr, exclusive scan of the counts) and the work items' inclusive ends per
    (kv head, chunk) job, a chunk's list cut into pieces of per_item entries."""
    r = tl.arange(0, BLOCK)
    carry = tl.zeros([], tl.int32)
    tl.store(QPTR + r, tl.zeros([BLOCK], tl.int32), mask=r == 0)
    for s in range(0, n_lists, BLOCK):
        i = s + r
        c = tl.load(COUNT + i, mask=i < n_lists, other=0)
        tl.store(QPTR + i + 1, tl.cumsum(c, 0) + carry, mask=i < n_lists)
        carry += tl.sum(c, 0)
    carry = tl.zeros([], tl.int32)
    for s in range(0, HKV * n_chunks, BLOCK):
        j = s + r
        jm = j < HKV * n_chunks
        seg = tl.load(CHUNK_SEG + j % n_chunks, mask=jm, other=0)
        n = tl.load(COUNT + (j // n_chunks) * n_slc + seg, mask=jm, other=0)
        n_it = (n + per_item - 1) // per_item
        tl.store(ENDS + j, tl.cumsum(n_it, 0) + carry, mask=jm)
        carry += tl.sum(n_it, 0)


@triton.jit
def _list_fill_kernel(SEL, RANK, QPTR, TIDX, ENDS, CHUNK_SEG, ITEMS, n_entries, scatter_programs, n_items,
                      n_chunks, n_slc, per_item, search_steps, HKV: tl.constexpr, K: tl.constexpr,
                      BLOCK: tl.constexpr):
    """Programs below scatter_programs put each entry's tile in its list; the rest write work-item rows
    (a binary search of each row in the jobs' ends; rows past the last item are empty, first = end = 0)."""
    pid = tl.program_id(0)
    r = tl.arange(0, BLOCK)
    if pid < scatter_programs:
        e = pid * BLOCK + r
        m = e < n_entries
        blk = tl.load(SEL + e, mask=m, other=-1).to(tl.int32)
        ok = m & (blk >= 0)
        lst = ((e // K) % HKV) * n_slc + blk
        pos = tl.load(QPTR + lst, mask=ok, other=0) + tl.load(RANK + e, mask=ok, other=0)
        tl.store(TIDX + pos, (e // (K * HKV)).to(tl.int32), mask=ok)
    else:
        i = (pid - scatter_programs) * BLOCK + r
        im = i < n_items
        n_jobs = HKV * n_chunks
        lo = tl.zeros([BLOCK], tl.int32)
        hi = tl.zeros([BLOCK], tl.int32) + n_jobs
        for _ in range(search_steps):  # first job whose inclusive end passes i
            mid = (lo + hi) // 2
            act = lo < hi
            right = tl.load(ENDS + mid, mask=act & (mid < n_jobs), other=0) <= i
            lo = tl.where(act & right, mid + 1, lo)
            hi = tl.where(act & ~right, mid, hi)
        job = tl.minimum(lo, n_jobs - 1)
        c = job % n_chunks
        h = job // n_chunks
        lst = h * n_slc + tl.load(CHUNK_SEG + c, mask=im, other=0)
        p0 = tl.load(QPTR + lst, mask=im, other=0)
        p1 = tl.load(QPTR + lst + 1, mask=im, other=0)
        n_it = (p1 - p0 + per_item - 1) // per_item
        end = tl.load(ENDS + job, mask=im, other=0)
        a = p0 + (i - (end - n_it)) * per_item
        b = tl.minimum(a + per_item, p1)
        real = i < tl.load(ENDS + n_jobs - 1)
        a = tl.where(real, a, 0)
        b = tl.where(real, b, 0)
        tl.store(ITEMS + i * 4, c, mask=im)
        tl.store(ITEMS + i * 4 + 1, h, mask=im)
        tl.store(ITEMS + i * 4 + 2, a, mask=im)
        tl.store(ITEMS + i * 4 + 3, b, mask=im)


def selection_lists(selected: torch.Tensor, n_slc: int, chunk_seg: torch.Tensor, per_item: int, n_items: int):
    """(qptr (Hkv·n_slc + 1), tidx, items (n_items, 4)) int32 for the selection's dK/dV kernel, with no host
    sync: qptr[h·n_slc + blk] .. qptr[...+1] indexes ``tidx``, the units that chose block blk for kv head h (in
    no particular order); items cut each (chunk, kv head) list into pieces of per_item units, n_items rows (an
    upper bound; the rows past the real items are empty)."""
    selected = selected.contiguous()
    n_units, hkv, k = selected.shape
    dev = selected.device
    n_entries = selected.numel()
    n_lists = hkv * n_slc
    n_chunks = chunk_seg.numel()
    count = torch.zeros(n_lists, dtype=torch.int32, device=dev)
    rank = torch.empty(max(1, n_entries), dtype=torch.int32, device=dev)
    qptr = torch.empty(n_lists + 1, dtype=torch.int32, device=dev)
    tidx = torch.empty(max(1, n_entries), dtype=torch.int32, device=dev)
    ends = torch.empty(max(1, hkv * n_chunks), dtype=torch.int32, device=dev)
    items = torch.empty((n_items, 4), dtype=torch.int32, device=dev)
    if n_entries and n_lists:
        _list_count_kernel[(triton.cdiv(n_entries, SCORING.list_block),)](
            selected, count, rank, n_entries, n_slc, HKV=hkv, K=k, BLOCK=SCORING.list_block)
    _list_scan_kernel[(1,)](count, qptr, chunk_seg, ends, n_lists, n_chunks, n_slc, per_item, HKV=hkv,
                            BLOCK=SCORING.list_block)
    scatter = triton.cdiv(n_entries, SCORING.list_block) if n_lists else 0
    grid = scatter + (triton.cdiv(n_items, SCORING.list_block) if n_chunks else 0)
    if grid:
        _list_fill_kernel[(grid,)](
            selected, rank, qptr, tidx, ends, chunk_seg, items, n_entries, scatter, n_items, n_chunks, n_slc,
            per_item, max(1, (hkv * n_chunks).bit_length()), HKV=hkv, K=k, BLOCK=SCORING.list_block)
    return qptr, tidx, items
