"""Public SSA functions: plain tensors in, tensors out, ``backend="triton"`` or the ``"torch"`` reference.

All tensors are packed over the tokens of a batch in the order of ``structure``
(sorted by 3D block): q (N, Hq, D), k/v (N, Hkv, D), pooled k_cmp/v_cmp (n_cmp, Hkv, D).
"""
from __future__ import annotations

import os
import threading
from dataclasses import replace

import torch

from . import reference as ref
from . import scoring as _scoring
from .gate import gate_forward
from .scoring import (_unit_of_tile, block_scores, rank_blocks, select_pooled, select_topk, selected_segments,
                      selection_lists)
from .segment_attention import BranchLaunch, Launch, SegmentPlan, _launch_bwd, _launch_fwd, segment_attention
from .structure import SSAStructure

_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _rows_per_tile(g: int) -> int:
    """Tokens per tile for the shared-segment branches: 128 rows of tokens × heads."""
    return max(1, 128 // g)


def _check(st: SSAStructure, backend: str, **tensors):
    """Clear one-line errors before any kernel launches."""
    if not isinstance(st, SSAStructure):
        raise TypeError(f"structure must be an SSAStructure, got {type(st).__name__}")
    if backend not in ("triton", "torch"):
        raise ValueError(f"backend must be 'triton' or 'torch', got {backend!r}")
    first = None
    for name, t in tensors.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
        if t.ndim != 3:
            raise ValueError(f"{name} must be (tokens, heads, head_dim), got shape {tuple(t.shape)}")
        if t.device != st.device:
            raise ValueError(f"{name} is on {t.device} but the structure is on {st.device}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {t.dtype}")
        if first is None:
            first = (name, t)
        elif t.dtype != first[1].dtype:
            raise ValueError(f"{name} is {t.dtype} but {first[0]} is {first[1].dtype}")
        if t.shape[2] != first[1].shape[2]:
            raise ValueError(f"{name} has head_dim {t.shape[2]} but {first[0]} has {first[1].shape[2]}")
    q = tensors.get("q")
    kvs = [(n, t) for n, t in tensors.items() if n != "q"]
    if q is not None:
        if q.shape[0] != st.n_tokens:
            raise ValueError(f"q has {q.shape[0]} tokens but the structure has {st.n_tokens}")
        for name, t in kvs:
            if t.shape[1] == 0 or q.shape[1] % t.shape[1]:
                raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of {name} heads ({t.shape[1]})")
            rows = st.n_cmp if name.endswith("_cmp") else st.n_tokens
            if t.shape[0] != rows:
                raise ValueError(f"{name} has {t.shape[0]} rows, expected {rows}")
        heads = {t.shape[1] for _, t in kvs}
        if len(heads) > 1:
            raise ValueError(f"key/value tensors disagree on heads: {sorted(heads)}")
    if backend == "triton":
        d = first[1].shape[2]
        if d not in (16, 32, 64, 128):
            raise ValueError(f"triton backend supports head_dim 16/32/64/128, got {d}")
        if q is not None and kvs:
            g = q.shape[1] // kvs[0][1].shape[1]
            if g & (g - 1):
                raise ValueError(f"triton backend needs query heads per kv head to be a power of two, got {g}")
        dt = first[1].dtype
        if st.device.type == "cuda":
            if dt not in _GPU_DTYPES:
                raise ValueError(f"triton backend takes float16/bfloat16/float32 on the GPU, got {dt}")
        elif os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(f"triton backend on {st.device} needs TRITON_INTERPRET=1 (or use backend='torch')")
        elif dt != torch.float32:
            raise ValueError(f"triton interpreter on the CPU takes float32, got {dt}")


def _block_n(st: SSAStructure, offsets: torch.Tensor) -> int:
    """Key chunk width: narrow for sparse blocks so fewer masked columns are computed."""
    mean = st.n_tokens / max(1, len(offsets) - 1)
    return 32 if mean < 48 else 64


# Launch settings per branch, the measured fastest (benchmarks/RESULTS.md, docs/ssa.md). Forward programs capped at
# 128 registers run 4 to an SM instead of 2. The compression's dK/dV kernel walks a shape's queries in pieces of
# 2,048 tokens; the selection's and the windows' dK/dV come from their dQ kernels, except with per-query selection
# (programs of at most 16 rows: 1 warp, and the dK/dV kernel over work items of 64 row steps).
_FWD_CAP = Launch(num_warps=4, num_stages=3, maxnreg=128)
CMP = BranchLaunch(fwd=_FWD_CAP, dkv_piece=2048)
WIN = BranchLaunch(lean=False, dkv_in_dq=True)
SLC = BranchLaunch(fwd=_FWD_CAP, dq=Launch(num_stages=3), dkv_in_dq=True)
SLC_TOKEN = BranchLaunch(fwd=Launch(num_warps=1, num_stages=3), dq=Launch(num_warps=1, num_stages=3),
                         dkv_block_n=0, dkv_steps=64)
SLC_SUB_ROWS = 128  # rows (tokens × G heads) per program of the selection forward and dQ


def _shared_plan(st, tile_kind, seg_offsets, chunk_kind, block_t, launch: BranchLaunch, fill_gpu=False):
    """Plan for branches where every tile of a segment attends to that whole segment.

    dK/dV of a key chunk (without ``launch.dkv_in_dq``) walks the segment's queries in contiguous pieces of
    ``launch.dkv_piece`` tokens (each in 128-row steps, no per-tile indirection)."""
    ts, te, tseg, _ = st.tiles(tile_kind, block_t)
    segs = seg_offsets.to(torch.int32)
    seg_start = segs[tseg.long()].view(-1, 1, 1)
    plan = dict(tile_start=ts, tile_end=te, seg_start=seg_start, seg_end=segs[tseg.long() + 1].view(-1, 1, 1),
                seg_cum=torch.zeros_like(seg_start), block_t=block_t, launch=launch)
    if launch.dkv_in_dq:
        return SegmentPlan(**plan)
    cs, ce, cseg, _ = st.chunks(chunk_kind, launch.dkv_block_n)
    split = 1
    if fill_gpu:  # few long key segments: split each chunk's tile list so ~1k programs run
        split = max(1, min(64, 1024 // max(1, cs.numel())))
    dts, dte, _, qptr = st.tiles(tile_kind, launch.dkv_piece)
    tidx = torch.arange(dts.numel(), dtype=torch.int32, device=st.device)
    return SegmentPlan(**plan, chunk_start=cs, chunk_end=ce, chunk_seg=cseg, qptr=qptr, tidx=tidx,
                       dkv_tile_start=dts, dkv_tile_end=dte, dkv_split=split)


def compression_attention(q, k_cmp, v_cmp, structure: SSAStructure, *, backend: str = "triton"):
    """Every query over its shape's pooled block tokens. Returns (out (N, Hq, D), lse (N, Hq) float32)."""
    _check(structure, backend, q=q, k_cmp=k_cmp, v_cmp=v_cmp)
    if backend == "torch":
        o, lse, _ = ref.compression_attention_ref(q, k_cmp, v_cmp, structure)
        return o, lse.float()
    return segment_attention(q, k_cmp, v_cmp, _cmp_plan(structure, q.shape[1] // k_cmp.shape[1]))


def _cmp_plan(st: SSAStructure, g: int) -> SegmentPlan:
    bt = _rows_per_tile(g)
    return st.cached(("plan_cmp", bt), lambda: _shared_plan(st, "shape", st.cmp_shape_offsets, "cmp", bt, CMP,
                                                           fill_gpu=True))


def _win_plan(st: SSAStructure, shifted: bool, g: int) -> SegmentPlan:
    kind = "window1" if shifted else "window0"
    bt = _rows_per_tile(g)
    return st.cached(("plan_win", kind, bt), lambda: _shared_plan(st, kind, st.window_partition(shifted)[1], kind,
                                                                   bt, WIN))


def select_blocks(q, k_cmp, lse_cmp, structure: SSAStructure, *, top_k: int = 8, q_tile: int = 1,
                  backend: str = "triton"):
    """Top-k selection blocks per query tile and kv head from the compression scores.

    Returns int64 (n_tiles, Hkv, top_k) global block ids, -1 where the shape has fewer blocks."""
    _check(structure, backend, q=q, k_cmp=k_cmp)
    if top_k < 1 or q_tile < 1 or q_tile & (q_tile - 1):
        raise ValueError(f"top_k must be >= 1 and q_tile a power of two, got top_k={top_k}, q_tile={q_tile}")
    st = structure
    hkv = k_cmp.shape[1]
    with torch.no_grad():
        if backend == "torch":
            _, _, probs = ref.compression_attention_ref(q, k_cmp, k_cmp, st)
            return ref.select_blocks_ref(probs, st, hkv, top_k, q_tile)
        return _select(q, k_cmp, lse_cmp, st, top_k, q_tile)


def _select(q, k_cmp, lse_cmp, st: SSAStructure, top_k: int, q_tile: int):
    """select_blocks on the Triton kernels, after the checks."""
    if _scoring.SCORING.pooled_select and q_tile == 1 and st.cmp_block < st.slc_block:
        # per query over pooled keys: one pass, blocks summed by a segmented scan (docs/ssa.md)
        return select_pooled(q, k_cmp, lse_cmp, st, top_k)
    if not _score_matrix_path(st, q_tile, q.shape[1] // k_cmp.shape[1]):
        # one pass with a running top-k per unit, no score matrix
        return select_topk(q.contiguous(), k_cmp.contiguous(), lse_cmp, st, top_k, q_tile)
    # a (units, Hkv, blocks) score matrix ranked by rank_blocks: units of more than 128 rows, and tiles at
    # m_cmp < m_slc (where a one-pass kernel over chunks of whole selection blocks measured slower, docs/ssa.md)
    score = block_scores(q.contiguous(), k_cmp.contiguous(), lse_cmp, st, q_tile, st.max_slc_per_shape)
    return _rank(score, st, top_k, q_tile)


def _score_matrix_path(st: SSAStructure, q_tile: int, g: int) -> bool:
    """Whether _select ranks a score matrix (units of more than 128 rows, or m_cmp < m_slc)."""
    return not (st.cmp_block == st.slc_block and q_tile * g <= 128)


def _rank(score, st: SSAStructure, top_k: int, q_tile: int):
    """Top-k global block ids of a (units, Hkv, n_cols) score matrix, -1 past the shape's blocks."""
    n_blocks, first = st.cached(("rank_layout", q_tile), lambda: _rank_layout(st, q_tile))
    return rank_blocks(score, n_blocks, first, top_k)


def _rank_layout(st: SSAStructure, q_tile: int):
    """Per structure, once: each unit's number of selection blocks (int32) and its first global block id."""
    tseg = st.tiles("shape", q_tile)[2].long()
    n_blocks = (st.slc_shape_offsets[1:] - st.slc_shape_offsets[:-1])[tseg]
    return n_blocks.to(torch.int32).contiguous(), st.slc_shape_offsets[tseg].contiguous()


def _selection_plan(st: SSAStructure, selected: torch.Tensor, q_tile: int, g: int) -> SegmentPlan:
    """Programs of at most SLC_SUB_ROWS rows (tokens × G heads); a longer tile is split into sub-tiles that read
    its selection. Per-query programs (at most 16 rows) run the dK/dV kernel over the lists of the units that
    chose each block; the others add dK/dV from their dQ kernel."""
    units_start = st.tiles("shape", q_tile)[0]
    n_units, hkv, k = selected.shape
    if n_units != units_start.numel():
        raise ValueError(f"selected has {n_units} tiles, expected {units_start.numel()} for q_tile={q_tile}")
    sub = q_tile if q_tile * g <= SLC_SUB_ROWS else max(1, SLC_SUB_ROWS // g)
    ts, te, _, _ = st.tiles("shape", sub)
    unit = None
    if sub != q_tile:
        unit = st.cached(("tile_unit", sub, q_tile), lambda: _unit_of_tile(st, sub, q_tile))
    seg_start, seg_end, seg_cum = selected_segments(selected, st.slc_offsets, unit)
    plan = dict(tile_start=ts, tile_end=te, seg_start=seg_start, seg_end=seg_end, seg_cum=seg_cum, block_t=sub)
    if sub * g > 16:
        return SegmentPlan(**plan, launch=SLC)
    chunk_n = SLC_TOKEN.dkv_block_n or _block_n(st, st.slc_offsets)
    cs, ce, cseg, _ = st.chunks("slc", chunk_n)
    # most (tile, block, chunk) list entries the dK/dV lists can hold: the work-item grid's bound
    max_chunks = st.cached(("max_chunks", "slc", chunk_n),
                           lambda: int((st.chunks("slc", chunk_n)[3].diff()).max()) if st.n_slc else 0)

    def lists(per_item, n_items):
        return selection_lists(selected, st.n_slc, cseg, per_item, n_items)

    return SegmentPlan(**plan, launch=replace(SLC_TOKEN, dkv_block_n=chunk_n), chunk_start=cs, chunk_end=ce,
                       chunk_seg=cseg, qptr_head_stride=st.n_slc, lists=lists,
                       dkv_entries=n_units * hkv * k * max_chunks)


def selection_attention(q, k, v, structure: SSAStructure, selected: torch.Tensor, *, q_tile: int = 1,
                        backend: str = "triton"):
    """Exact attention of every query over the tokens of its tile's selected blocks. Returns out (N, Hq, D)."""
    _check(structure, backend, q=q, k=k, v=v)
    if selected.ndim != 3 or selected.shape[1] != k.shape[1]:
        raise ValueError(f"selected must be (tiles, {k.shape[1]}, top_k), got {tuple(selected.shape)}")
    if backend == "torch":
        return ref.selection_attention_ref(q, k, v, structure, selected, q_tile)[0]
    return segment_attention(q, k, v, _selection_plan(structure, selected, q_tile, q.shape[1] // k.shape[1]))[0]


def window_attention(q, k, v, structure: SSAStructure, *, shifted: bool = False, backend: str = "triton"):
    """Every query over the tokens present in its window (shifted windows on odd layers). Returns out (N, Hq, D)."""
    _check(structure, backend, q=q, k=k, v=v)
    if backend == "torch":
        return ref.window_attention_ref(q, k, v, structure, shifted)
    st = structure
    perm = st.window_partition(shifted)[0]
    plan = _win_plan(st, shifted, q.shape[1] // k.shape[1])
    if perm is None:
        return segment_attention(q, k, v, plan)[0]
    inv = _inv_perm(st, shifted)
    o = segment_attention(_permute(q, perm, inv), _permute(k, perm, inv), _permute(v, perm, inv), plan)[0]
    return _permute(o, inv, perm)


def _inv_perm(st: SSAStructure, shifted: bool):
    return st.cached(("inv_perm", "window1" if shifted else "window0"),
                     lambda: torch.argsort(st.window_partition(shifted)[0]))


class _Permute(torch.autograd.Function):
    """x[perm] whose gradient is a gather by the inverse permutation, not a scatter-add."""

    @staticmethod
    def forward(ctx, x, perm, inv):
        ctx.inv = inv
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, g):
        return g.index_select(0, ctx.inv), None, None


def _permute(x, perm, inv):
    return _Permute.apply(x, perm, inv)


def spatial_sparse_attention(q, k, v, k_cmp, v_cmp, gates, structure: SSAStructure, *, top_k: int = 8,
                             q_tile: int = 64, shifted: bool = False, backend: str = "triton"):
    """o = g_cmp·o_cmp + g_slc·o_slc + g_win·o_win (Direct3D-S2 Sec. 3.3); gates after the sigmoid, (N, 3) as
    the release's layer gives them (one per token and branch, shared by the heads) or (N, Hq, 3).

    q_tile consecutive block-sorted queries share one selection (1 = per query, as in the paper)."""
    _check(structure, backend, q=q, k=k, v=v, k_cmp=k_cmp, v_cmp=v_cmp)
    if gates.shape == (q.shape[0], 3):  # the same gate for every head; autograd sums its gradient over them
        gates = gates[:, None, :].expand(*q.shape[:2], 3)
    if gates.shape != (*q.shape[:2], 3):
        raise ValueError(f"gates must be (N, 3) = {(q.shape[0], 3)} or (N, Hq, 3) = {(*q.shape[:2], 3)}, "
                         f"got {tuple(gates.shape)}")
    if top_k < 1 or q_tile < 1 or q_tile & (q_tile - 1):
        raise ValueError(f"top_k must be >= 1 and q_tile a power of two, got top_k={top_k}, q_tile={q_tile}")
    if backend == "triton":
        return _WholeSSA.apply(q, k, v, k_cmp, v_cmp, gates, structure, top_k, q_tile, shifted)
    o_cmp, _ = compression_attention(q, k_cmp, v_cmp, structure, backend=backend)
    sel = select_blocks(q, k_cmp, None, structure, top_k=top_k, q_tile=q_tile, backend="torch")
    o_slc = selection_attention(q, k, v, structure, sel, q_tile=q_tile, backend=backend)
    o_win = window_attention(q, k, v, structure, shifted=shifted, backend=backend)
    g = gates.to(q.dtype)
    return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win


_SIDE_STREAMS = {}


def _side_stream(device):
    """The CUDA stream the backward runs each branch's dK/dV kernel on, overlapping the next branch's dQ kernel."""
    if device not in _SIDE_STREAMS:
        _SIDE_STREAMS[device] = torch.cuda.Stream(device)
    return _SIDE_STREAMS[device]


class SelectionReuse:
    """What one checkpointed forward's SSA layers computed, handed to its recomputation.

    Under gradient checkpointing every block's forward runs twice: once in the forward pass and again in the
    backward pass to rebuild what the backward reads. The recomputation sees the same Q and K, so it would
    select the same blocks; the selection (a pass over every pooled key for each query) is instead kept from
    the first run, in call order, and taken back in the second. Outputs and gradients are unchanged.
    With ``keep_outputs`` the attention's outputs and log-sum-exps are kept too, so the recomputation runs
    no attention kernel: the attention forward runs once a step, for four (N, Hq, D) tensors and three
    log-sum-exps a layer held from the forward to that layer's backward (a recomputation after the first, through a graph kept with
    retain_graph=True, computes them again from the kept selection).
    ``selection_reuse`` / ``attention_reuse`` give ``torch.utils.checkpoint``'s ``context_fn`` the pair of
    contexts for one call."""

    def __init__(self, keep_outputs: bool = False):
        self.keep_outputs = keep_outputs
        self.kept: list[list] = []  # [rows, plan, outputs or None] per SSA layer, in call order
        self.replaying = False
        self.cursor = 0

    def keep(self, plan: SegmentPlan, rows: int, outputs: tuple | None = None) -> None:
        self.kept.append([rows, plan, outputs if self.keep_outputs else None])

    def take(self, rows: int) -> tuple[SegmentPlan, tuple | None]:
        """The next layer's (plan, outputs); the outputs are handed over once (the recomputation's graph holds
        them from then on)."""
        if self.cursor >= len(self.kept):
            raise RuntimeError("SSA selection reuse: the recomputation ran more SSA layers than the forward")
        entry = self.kept[self.cursor]
        if entry[0] != rows:
            raise RuntimeError(f"SSA selection reuse: the recomputation's layer has {rows} queries, the "
                               f"forward's had {entry[0]}")
        self.cursor += 1
        outputs, entry[2] = entry[2], None
        return entry[1], outputs

    def _active(self, replaying: bool) -> "_ReuseMode":
        return _ReuseMode(self, replaying)


class _ReuseMode:
    """Makes ``box`` the SSA layers' store while entered; can be entered again (a graph kept with
    retain_graph=True is recomputed once per backward, each time from the first kept plan)."""

    def __init__(self, box: SelectionReuse, replaying: bool):
        self.box, self.replaying, self.before = box, replaying, []

    def __enter__(self):
        self.before.append(getattr(_REUSE, "box", None))
        _REUSE.box, self.box.replaying, self.box.cursor = self.box, self.replaying, 0
        return self.box

    def __exit__(self, *exc):
        _REUSE.box = self.before.pop()
        return False


_REUSE = threading.local()


def selection_reuse():
    """(forward context, recomputation context) for ``checkpoint(..., context_fn=selection_reuse)``."""
    box = SelectionReuse()
    return box._active(False), box._active(True)


def attention_reuse():
    """As ``selection_reuse``, also keeping the attention outputs: no attention kernel in the recomputation."""
    box = SelectionReuse(keep_outputs=True)
    return box._active(False), box._active(True)


class _WholeSSA(torch.autograd.Function):
    """All three branches and the gate in one node (Direct3D-S2 Sec. 3.3: o = Σ_b g_b·o_b). Branch b's share of
    the gradient is its attention backward with dO_b = g_b·dO; with lse_b − ln g_b in place of lse_b the kernels'
    P is g_b·P, so they take dO itself, and their rowsum(O_b·dO) is the gate's gradient. The dQ kernels add the
    branches' dQ and the dK/dV kernels one float32 sum: no gate backward pass, no dO_b copies, no gradient sums."""

    @staticmethod
    def forward(ctx, q, k, v, k_cmp, v_cmp, gates, st, top_k, q_tile, shifted):
        q, k, v, k_cmp, v_cmp, gates = (t.contiguous() for t in (q, k, v, k_cmp, v_cmp, gates))
        g = q.shape[1] // k.shape[1]
        plan_c = _cmp_plan(st, g)
        reuse = getattr(_REUSE, "box", None)
        plan_s, kept = reuse.take(q.shape[0]) if reuse is not None and reuse.replaying else (None, None)
        plan_w = _win_plan(st, shifted, g)
        perm = st.window_partition(shifted)[0]
        wq, wk, wv = (q, k, v) if perm is None else (t.index_select(0, perm) for t in (q, k, v))
        if kept is not None:  # a checkpoint's recomputation with the forward's outputs: no attention kernel
            o_c, lse_c, o_s, lse_s, o_wp, lse_w, out = kept
            out = out.detach()  # a fresh alias: this node's output, the kept tensor untouched
        else:
            if plan_s is not None:  # a checkpoint's recomputation: the forward's own selection
                o_c, lse_c = _launch_fwd(q, k_cmp, v_cmp, plan_c)
            elif _score_matrix_path(st, q_tile, g) and q_tile * g > 128:  # 128-row tiles: its units
                # the compression forward also sums the selection-block scores (a second pass over the pooled
                # keys with the final log-sum-exp): no scoring kernel reading Q and the lse again
                bt = _rows_per_tile(g)
                score = torch.zeros((st.n_tiles("shape", q_tile), k.shape[1], st.max_slc_per_shape),
                                    dtype=torch.float32, device=q.device)
                unit = st.cached(("tile_unit", bt, q_tile), lambda: _unit_of_tile(st, bt, q_tile))
                to_slc = st.cmp_to_slc_local if st.cmp_block != st.slc_block else None
                chunk = _scoring.SCORING.score_block_n
                o_c, lse_c = _launch_fwd(q, k_cmp, v_cmp, plan_c, scores=(score, unit, to_slc, chunk))
                plan_s = _selection_plan(st, _rank(score, st, top_k, q_tile), q_tile, g)
            else:
                o_c, lse_c = _launch_fwd(q, k_cmp, v_cmp, plan_c)
                plan_s = _selection_plan(st, _select(q, k_cmp, lse_c, st, top_k, q_tile), q_tile, g)
            o_s, lse_s = _launch_fwd(q, k, v, plan_s)
            if perm is None:  # the window forward writes the gated sum too (shifted windows' rows are permuted)
                out = torch.empty_like(o_c)
                o_wp, lse_w = _launch_fwd(wq, wk, wv, plan_w, mix=(o_c, o_s, gates, out))
            else:
                o_wp, lse_w = _launch_fwd(wq, wk, wv, plan_w)
                out = gate_forward(o_c, o_s, o_wp.index_select(0, _inv_perm(st, shifted)), gates)
            if reuse is not None and not reuse.replaying:
                reuse.keep(plan_s, q.shape[0], (o_c, lse_c, o_s, lse_s, o_wp, lse_w, out.detach()))
        ctx.save_for_backward(q, k, v, k_cmp, v_cmp, gates, o_c, lse_c, o_s, lse_s, wq, wk, wv, o_wp, lse_w)
        ctx.plans, ctx.st, ctx.shifted = (plan_c, plan_s, plan_w), st, shifted
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, k_cmp, v_cmp, gates, o_c, lse_c, o_s, lse_s, wq, wk, wv, o_wp, lse_w = ctx.saved_tensors
        plan_c, plan_s, plan_w = ctx.plans
        do = dout.contiguous()
        n, hkv, d = k.shape
        nc = k_cmp.shape[0]
        # every float32 dK/dV sum in one zeroed buffer (one memset, one cast at the end); the kernels take
        # lse − ln g from the gates themselves and write rowsum(O·dO), the gates' gradient, into one buffer
        acc = torch.zeros(2 * (n + nc) * hkv * d, dtype=torch.float32, device=k.device)
        dk, dv, dkc, dvc = (t.view(-1, hkv, d) for t in acc.split([n * hkv * d] * 2 + [nc * hkv * d] * 2))
        delta = torch.empty((3, *q.shape[:2]), dtype=torch.float32, device=q.device)
        # each branch's dK/dV kernel on a second stream once its dQ kernel is done (the dQ kernels add into one dQ
        # in turn; the dK/dV kernels add into float32 sums with atomics)
        side = dict(dkv_stream=_side_stream(q.device), keep=[]) if q.is_cuda else {}
        dq = _launch_bwd(q, k_cmp, v_cmp, o_c, lse_c, do, plan_c, dkv_into=(dkc, dvc), gate=gates, gate_b=0,
                         delta_into=delta[0], **side)[0]
        _launch_bwd(q, k, v, o_s, lse_s, do, plan_s, dq_into=dq, dkv_into=(dk, dv), gate=gates, gate_b=1,
                    delta_into=delta[1], **side)
        perm = ctx.st.window_partition(ctx.shifted)[0]
        if perm is None:
            _launch_bwd(q, k, v, o_wp, lse_w, do, plan_w, dq_into=dq, dkv_into=(dk, dv), gate=gates, gate_b=2,
                        delta_into=delta[2], **side)
        else:  # shifted windows run on permuted copies: their gradients come back through the inverse
            inv = _inv_perm(ctx.st, ctx.shifted)
            dq_w, dk_w, dv_w, dg_w = _launch_bwd(wq, wk, wv, o_wp, lse_w, do.index_select(0, perm), plan_w,
                                                 want_delta=True, gate=gates.index_select(0, perm), gate_b=2)
            if side:  # the selection's dK/dV atomics into dk, dv must be done before the sums below
                torch.cuda.current_stream().wait_stream(side["dkv_stream"])
            dq += dq_w.index_select(0, inv)
            dk.add_(dk_w.index_select(0, inv))
            dv.add_(dv_w.index_select(0, inv))
            torch.index_select(dg_w, 0, inv, out=delta[2])
        if side:  # join: every dK/dV kernel done before the cast (and before side["keep"] lets go)
            torch.cuda.current_stream().wait_stream(side["dkv_stream"])
        grads = acc.to(k.dtype)
        dk, dv, dkc, dvc = (t.view(-1, hkv, d) for t in grads.split([n * hkv * d] * 2 + [nc * hkv * d] * 2))
        dg = torch.empty(gates.shape, dtype=gates.dtype, device=gates.device).copy_(delta.permute(1, 2, 0))
        return dq, dk, dv, dkc, dvc, dg, None, None, None, None
