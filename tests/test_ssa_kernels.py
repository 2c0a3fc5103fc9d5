"""SSA kernels against the float64 reference on random ragged batches (Triton interpreter on the CPU)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # the Triton kernels run in the interpreter on CPU-only machines (read when the kernel module is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.ssa import (SSAStructure, block_order, compression_attention, select_blocks,  # noqa: E402
                         selection_attention, spatial_sparse_attention, ssa_reference, window_attention)
from kernels.ssa import reference as ref  # noqa: E402
from kernels.ssa import segment_attention as seg  # noqa: E402
from ssa_cases import random_batch, random_shapes, shell_shapes  # noqa: E402

# shapes of 1 token, shapes smaller than one block, odd block counts
SIZES = [41, 1, 3, 90, 9]
TOL = {torch.float32: 2e-5, torch.bfloat16: 1.6e-2, torch.float16: 4e-3}


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(autouse=True)
def poison():
    seg.POISON = True
    yield
    seg.POISON = False


def _device_dtype(device):
    if device == "cuda":
        return [torch.bfloat16, torch.float16]
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 before triton is imported")
    return [torch.float32]


def _run_all(st, t, dtype, top_k, q_tile, shifted, backend="triton"):
    x = {k: v.to(dtype).requires_grad_(True) for k, v in t.items()}
    out = spatial_sparse_attention(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["gates"], st, top_k=top_k,
                                   q_tile=q_tile, shifted=shifted, backend=backend)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(out)
    grads = torch.autograd.grad(out, list(x.values()), w)
    return x, out, grads, w


def _check_ssa(device, hq, hkv, d, cmp_block, top_k, q_tile, shifted, seed):
    for dtype in _device_dtype(device):
        st, t = random_batch(SIZES, hq, hkv, d, cmp_block=cmp_block, seed=seed, device=device, grid=11)
        x, out, grads, w = _run_all(st, t, dtype, top_k, q_tile, shifted)
        # the selection the kernels made, checked against the reference where its ranking is clear
        lse = compression_attention(x["q"].detach(), x["k_cmp"].detach(), x["v_cmp"].detach(), st)[1]
        sel = select_blocks(x["q"].detach(), x["k_cmp"].detach(), lse, st, top_k=top_k, q_tile=q_tile)
        assert int(sel.min()) >= -1
        r = {k: v.detach().double().requires_grad_(True) for k, v in x.items()}
        _, _, probs = ref.compression_attention_ref(r["q"], r["k_cmp"], r["v_cmp"], st)
        rsel = ref.select_blocks_ref([p.detach() for p in probs], st, hkv, top_k, q_tile)
        agree = (sel.sort(-1).values == rsel.sort(-1).values).all(-1).float().mean().item()
        assert agree >= (0.99 if dtype == torch.float32 else 0.9), f"selection agreement {agree}"
        rout, _ = ssa_reference(r["q"], r["k"], r["v"], r["k_cmp"], r["v_cmp"], r["gates"], st, top_k, shifted,
                                q_tile, selected=sel)
        rgrads = torch.autograd.grad(rout, list(r.values()), w.double())
        assert not torch.isnan(out).any()
        assert rel(out, rout) < TOL[dtype], f"out {rel(out, rout)}"
        for name, g, rg in zip(x, grads, rgrads):
            assert not torch.isnan(g).any(), f"d{name} has unwritten (NaN) elements"
            assert rel(g, rg) < TOL[dtype], f"d{name} {rel(g, rg)}"


# G = 16 query heads per kv head as in the paper, and a small group; top_k 3 < blocks, 20 > blocks;
# tiles of 32 tokens hold more than 128 rows: split into sub-tiles that share the tile's selection
@pytest.mark.parametrize("hq,hkv,d,cmp_block,top_k,q_tile,shifted", [
    (32, 2, 32, 8, 3, 1, False),
    (4, 2, 16, 4, 20, 1, True),
    (8, 1, 32, 8, 2, 4, True),
    (32, 2, 32, 8, 3, 32, False),
    (16, 2, 16, 4, 3, 32, True),
])
def test_ssa_matches_reference_cpu(hq, hkv, d, cmp_block, top_k, q_tile, shifted):
    _check_ssa("cpu", hq, hkv, d, cmp_block, top_k, q_tile, shifted, seed=hq + top_k)


def test_paper_config_cpu():
    """The released configuration: 32 query / 2 kv heads, d 32, m_cmp 4, m_slc 8, top-k 8, per-query selection,
    shifted windows (odd layers)."""
    _check_ssa("cpu", 32, 2, 32, 4, 8, 1, True, seed=11)



def test_block_scores_sum_each_selection_block_cpu():
    """The score matrix against float64 sums, on shapes of more compression blocks than one key chunk (64), so
    that selection blocks straddle the scoring kernel's chunks (m_cmp 4, m_slc 8, per query)."""
    if os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available():
        pytest.skip("needs the Triton interpreter")
    from kernels.ssa.scoring import block_scores

    coords, cu = shell_shapes([260, 40, 150], grid=64, seed=5)
    st = SSAStructure(coords[block_order(coords, cu, 4, 8)], cu, 4, 8)
    counts = (st.cmp_shape_offsets[1:] - st.cmp_shape_offsets[:-1]).tolist()
    assert max(counts) > 64, counts
    g = torch.Generator().manual_seed(5)
    q, k_cmp, v_cmp = (torch.randn(n, h, 16, generator=g, dtype=torch.float64)
                       for n, h in ((len(coords), 4), (st.n_cmp, 2), (st.n_cmp, 2)))
    lse = compression_attention(q.float(), k_cmp.float(), v_cmp.float(), st)[1]
    score = block_scores(q.float(), k_cmp.float(), lse, st, 1, st.max_slc_per_shape)
    _, _, probs = ref.compression_attention_ref(q, k_cmp, v_cmp, st)
    for b, want in enumerate(_block_scores_ref(probs, st, 2)):
        qa, nb = int(st.cu_seqlens[b]), want.shape[2]
        got = score[qa:qa + want.shape[0]].double()
        torch.testing.assert_close(got[..., :nb], want, rtol=1e-5, atol=1e-6)
        assert bool((got[..., nb:] == 0).all())


def _block_scores_ref(probs, st, hkv):
    """Per shape, float64 (tokens, Hkv, its selection blocks): probabilities summed over the G heads of each kv
    head and over the compression blocks of each selection block."""
    out = []
    for b, p in enumerate(probs):
        n, hq, nc = p.shape
        ca, sa, se = (int(x) for x in (st.cmp_shape_offsets[b], st.slc_shape_offsets[b], st.slc_shape_offsets[b + 1]))
        want = torch.zeros(n, hkv, se - sa, dtype=torch.float64)
        want.index_add_(2, st.cmp_to_slc_local[ca:ca + nc].long(), p.reshape(n, hkv, hq // hkv, nc).sum(2))
        out.append(want)
    return out


def _pooled_batch(sizes, hq, seed):
    """Sparse shells (m_cmp 4, m_slc 8) and random float64 q (N, hq, 16), pooled k/v (n_cmp, 2, 16)."""
    coords, cu = shell_shapes(sizes, grid=64, seed=seed)
    st = SSAStructure(coords[block_order(coords, cu, 4, 8)], cu, 4, 8)
    g = torch.Generator().manual_seed(seed)
    q, kc, vc = (torch.randn(n, h, 16, generator=g, dtype=torch.float64)
                 for n, h in ((st.n_tokens, hq), (st.n_cmp, 2), (st.n_cmp, 2)))
    return st, q, kc, vc


def _score_matrix_select(*args, **kw):
    """select_blocks through the score matrix + rank_blocks, whatever ScoringLaunch.pooled_select says."""
    import dataclasses

    from kernels.ssa import scoring
    kept = scoring.SCORING
    scoring.SCORING = dataclasses.replace(kept, pooled_select=False)
    try:
        return select_blocks(*args, **kw)
    finally:
        scoring.SCORING = kept


def test_select_pooled_matches_score_matrix_cpu():
    """The fused per-query select (m_cmp 4 < m_slc 8) picks the blocks of today's score matrix + rank_blocks, and of
    the float64 reference wherever its k-th and next score are apart: a shape of over 64 compression blocks
    (several key chunks, blocks cut by chunk ends), 1- and 3-token shapes (fewer blocks than top-k), and
    programs whose last tokens lie past their shape."""
    from kernels.ssa.scoring import select_pooled
    _device_dtype("cpu")
    top_k = 8
    st, q, kc, vc = _pooled_batch([150, 1, 30, 3], 4, seed=5)
    counts = (st.cmp_shape_offsets[1:] - st.cmp_shape_offsets[:-1]).tolist()
    assert max(counts) > 64 and min((st.slc_shape_offsets[1:] - st.slc_shape_offsets[:-1]).tolist()) < top_k
    lse = compression_attention(q.float(), kc.float(), vc.float(), st)[1]
    got = select_pooled(q.float(), kc.float(), lse, st, top_k)
    assert got.shape == (st.n_tokens, 2, top_k) and got.dtype == torch.int64
    today = _score_matrix_select(q.float(), kc.float(), lse, st, top_k=top_k, q_tile=1)
    assert torch.equal(got.sort(-1).values, today.sort(-1).values)
    # a key chunk narrower than top-k widens to it (the top-k lives in a chunk's row): more chunk ends, same sets
    narrow = select_pooled(q.float(), kc.float(), lse, st, top_k, block_n=4)
    assert torch.equal(narrow.sort(-1).values, today.sort(-1).values)
    _, _, probs = ref.compression_attention_ref(q, kc, vc, st)
    want = ref.select_blocks_ref(probs, st, 2, top_k, 1)
    clear = torch.cat([_clear_ranking(s, top_k) for s in _block_scores_ref(probs, st, 2)])
    assert clear.float().mean() > 0.9
    assert torch.equal(got.sort(-1).values[clear], want.sort(-1).values[clear])


def test_pooled_select_flag_routes_select_blocks_cpu(monkeypatch):
    """ScoringLaunch.pooled_select (on by default): select_blocks(q_tile=1) at m_cmp < m_slc goes through
    select_pooled, with the score matrix's sets; off, it does not; tiles of 64 queries keep their own path."""
    from kernels.ssa import scoring
    _device_dtype("cpu")
    assert scoring.SCORING.pooled_select
    st, q, kc, vc = _pooled_batch([40, 3], 4, seed=7)
    lse = compression_attention(q.float(), kc.float(), vc.float(), st)[1]
    calls = []
    real = scoring.select_pooled
    monkeypatch.setattr("kernels.ssa.ops.select_pooled", lambda *a: calls.append(1) or real(*a))
    matrix = _score_matrix_select(q.float(), kc.float(), lse, st, top_k=8, q_tile=1)
    assert not calls
    got = select_blocks(q.float(), kc.float(), lse, st, top_k=8, q_tile=1)
    assert calls and torch.equal(got.sort(-1).values, matrix.sort(-1).values)
    calls.clear()
    tiles = select_blocks(q.float(), kc.float(), lse, st, top_k=8, q_tile=64)
    assert not calls and torch.equal(tiles, _score_matrix_select(q.float(), kc.float(), lse, st, top_k=8, q_tile=64))


def _clear_ranking(score, top_k, gap=1e-5):
    """(tokens, Hkv) bool: the k-th and next float64 score differ by more than ``gap`` relative (or no next)."""
    if score.shape[2] <= top_k:
        return torch.ones(score.shape[:2], dtype=torch.bool)
    v = score.topk(top_k + 1, dim=-1).values
    return v[..., top_k - 1] - v[..., top_k] > gap * v[..., top_k - 1]


def test_select_pooled_ties_keep_lower_block_cpu():
    """Equal scores: q = 0 and lse = 0 make every probability 1, so a block's score is G × its number of
    compression blocks, exact in float32, and most blocks tie with others, also across key chunks; the lower
    block id must win every tie (32 query / 2 kv heads: 8 tokens per program)."""
    from kernels.ssa.scoring import select_pooled
    _device_dtype("cpu")
    top_k = 8
    st, _, kc, _ = _pooled_batch([60, 1, 9], 32, seed=2)
    assert st.max_cmp_per_shape > 32
    got = select_pooled(torch.zeros(st.n_tokens, 32, 16), kc.float(), torch.zeros(st.n_tokens, 32), st, top_k)
    count = torch.bincount(st.slc_of_token[st.cmp_offsets[:-1]], minlength=st.n_slc)
    for b in range(st.n_shapes):
        sa, se = int(st.slc_shape_offsets[b]), int(st.slc_shape_offsets[b + 1])
        best = sorted(range(sa, se), key=lambda j: (-int(count[j]), j))[:top_k]
        want = torch.tensor(sorted(best + [-1] * (top_k - len(best))))
        rows = got[int(st.cu_seqlens[b]):int(st.cu_seqlens[b + 1])].sort(-1).values
        assert bool((rows == want).all()), (b, rows[0, 0].tolist(), want.tolist())


def test_rank_blocks_equals_topk_cpu():
    """The running top-k kernel against torch.topk on ragged rows: 1 to 300 blocks a unit, fewer than top_k too."""
    _device_dtype("cpu")  # CPU tensors: the Triton interpreter only
    from kernels.ssa.scoring import rank_blocks

    g = torch.Generator().manual_seed(0)
    units, hkv, cols, k = 37, 2, 300, 8
    n_blocks = torch.randint(1, cols + 1, (units,), generator=g).to(torch.int32)
    n_blocks[:3] = torch.tensor([1, 5, 8], dtype=torch.int32)
    first = torch.randint(0, 1000, (units,), generator=g)
    score = torch.rand(units, hkv, cols, generator=g)
    sel = rank_blocks(score, n_blocks, first, k)
    for u in range(units):
        n = int(n_blocks[u])
        for h in range(hkv):
            want = set((score[u, h, :n].topk(min(k, n)).indices + first[u]).tolist())
            got = sel[u, h].tolist()
            assert set(x for x in got if x >= 0) == want and got.count(-1) == k - min(k, n), (u, h)

def test_rank_blocks_ties_keep_lower_block_cpu():
    """Scores of four values only: most blocks tie, within and across the kernel's 128-column chunks, and the
    lower column must win every tie (the documented order), as in a stable sort by descending score."""
    _device_dtype("cpu")  # CPU tensors: the Triton interpreter only
    from kernels.ssa.scoring import rank_blocks

    g = torch.Generator().manual_seed(1)
    units, hkv, cols, k = 12, 2, 300, 8
    n_blocks = torch.full((units,), cols, dtype=torch.int32)
    n_blocks[:2] = torch.tensor([140, 9], dtype=torch.int32)
    first = torch.arange(units) * 1000
    score = torch.randint(0, 4, (units, hkv, cols), generator=g).float() / 4
    score[0, :, 130:133] = 1.0  # three best blocks only after the first chunk: they evict three ties
    sel = rank_blocks(score, n_blocks, first, k)
    for u in range(units):
        n = int(n_blocks[u])
        for h in range(hkv):
            order = sorted(range(n), key=lambda j: (-float(score[u, h, j]), j))[:k]
            assert sorted(sel[u, h].tolist()) == sorted(j + int(first[u]) for j in order), (u, h)


def test_selection_many_blocks_cpu():
    """m_cmp 4 < m_slc 8 on sparse shells (top-k 8 of 20+ partly filled selection blocks per shape): the kernels pick the
    blocks of the float64 reference, per query and per 4-query tile."""
    _device_dtype("cpu")
    coords, cu = shell_shapes([600, 40], 40, seed=3)
    coords = coords[block_order(coords, cu, 4, 8)]
    st = SSAStructure(coords, cu, 4, 8)
    assert st.max_slc_per_shape >= 20 and st.n_cmp > 2 * st.n_slc
    g = torch.Generator().manual_seed(0)
    q, kc, vc = (torch.randn(n, h, 16, generator=g, dtype=torch.float64) for n, h in
                 ((st.n_tokens, 4), (st.n_cmp, 2), (st.n_cmp, 2)))
    lse = compression_attention(q.float(), kc.float(), vc.float(), st)[1]
    _, _, probs = ref.compression_attention_ref(q, kc, vc, st)
    for q_tile in (1, 4):
        sel = select_blocks(q.float(), kc.float(), lse, st, top_k=8, q_tile=q_tile)
        rsel = ref.select_blocks_ref(probs, st, 2, 8, q_tile)
        assert torch.equal(sel.sort(-1).values, rsel.sort(-1).values)


def test_shared_gates_cpu():
    """Gates (N, 3), one per token and branch as the released layer makes them, act as (N, Hq, 3) with the same
    value in every head; their gradient is the sum over the heads."""
    _device_dtype("cpu")
    st, t = random_batch([41, 3, 9], 8, 2, 16, cmp_block=4, seed=4, grid=11)
    g3 = t["gates"][:, 0, :].float().requires_grad_(True)
    gh = t["gates"][:, :1, :].expand(-1, 8, 3).contiguous().requires_grad_(True)  # float64, every head the same
    args = [t[n] for n in ("q", "k", "v", "k_cmp", "v_cmp")]
    w = torch.randn(t["q"].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    o3 = spatial_sparse_attention(*(a.float() for a in args), g3, st, top_k=3, q_tile=1, shifted=True)
    oh = spatial_sparse_attention(*args, gh, st, top_k=3, q_tile=1, shifted=True, backend="torch")
    assert rel(o3, oh) < 2e-5
    (d3,) = torch.autograd.grad(o3, g3, w.float())
    (dh,) = torch.autograd.grad(oh, gh, w)
    assert rel(d3, dh.sum(1)) < 2e-5


@pytest.mark.gpu
@pytest.mark.parametrize("d,cmp_block,q_tile,shifted", [(32, 8, 1, False), (64, 4, 1, True), (32, 4, 1, False),
                                                         (32, 8, 16, True),
                                                         (32, 8, 64, False)])
def test_ssa_matches_reference_gpu(d, cmp_block, q_tile, shifted):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    _check_ssa("cuda", 32, 2, d, cmp_block, 8, q_tile, shifted, seed=d + cmp_block)


def test_selection_work_items_cpu(monkeypatch):
    """Per-query selection: dK/dV lists cut into work items of one row step each, summed atomically, still give
    the gradients."""
    from dataclasses import replace

    from kernels.ssa import ops
    _device_dtype("cpu")
    monkeypatch.setattr(ops, "SLC_TOKEN", replace(ops.SLC_TOKEN, dkv_steps=1))
    q_tile = 1
    st, t = random_batch([70, 2, 33], 32, 2, 16, cmp_block=8, seed=5, grid=9)
    f = {k: t[k].float().requires_grad_(True) for k in ("q", "k", "v")}
    lse = compression_attention(f["q"].detach(), t["k_cmp"].float(), t["v_cmp"].float(), st)[1]
    sel = select_blocks(f["q"].detach(), t["k_cmp"].float(), lse, st, top_k=3, q_tile=q_tile)
    out = selection_attention(f["q"], f["k"], f["v"], st, sel, q_tile=q_tile)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(out, list(f.values()), w)
    r = {k: t[k].detach().requires_grad_(True) for k in ("q", "k", "v")}
    rout = ref.selection_attention_ref(r["q"], r["k"], r["v"], st, sel, q_tile)[0]
    rgrads = torch.autograd.grad(rout, list(r.values()), w.double())
    assert rel(out, rout) < 2e-5
    for name, g, rg in zip(f, grads, rgrads):
        assert rel(g, rg) < 2e-5, f"d{name} {rel(g, rg)}"


def test_branches_cpu():
    """Each public branch function on its own, forward only, including the window partition shift."""
    _device_dtype("cpu")
    st, t = random_batch(SIZES, 4, 2, 16, seed=7, grid=11)
    f = {k: v.float() for k, v in t.items()}
    o, lse = compression_attention(f["q"], f["k_cmp"], f["v_cmp"], st)
    ro, rl, _ = ref.compression_attention_ref(t["q"], t["k_cmp"], t["v_cmp"], st)
    assert rel(o, ro) < 2e-5 and rel(lse, rl) < 2e-5
    for shifted in (False, True):
        o = window_attention(f["q"], f["k"], f["v"], st, shifted=shifted)
        assert rel(o, ref.window_attention_ref(t["q"], t["k"], t["v"], st, shifted)) < 2e-5
    sel = select_blocks(f["q"], f["k_cmp"], lse, st, top_k=2)
    o = selection_attention(f["q"], f["k"], f["v"], st, sel)
    assert rel(o, ref.selection_attention_ref(t["q"], t["k"], t["v"], st, sel)[0]) < 2e-5


def test_structure_blocks_are_contiguous():
    coords, cu = random_shapes(SIZES, 11, seed=1)
    perm = block_order(coords, cu, 4, 8)
    st = SSAStructure(coords[perm], cu, 4, 8)
    c = coords[perm].long()
    for name, off, m in (("cmp", st.cmp_offsets, 4), ("slc", st.slc_offsets, 8)):
        for b in range(len(off) - 1):
            blk = torch.div(c[off[b]:off[b + 1]], m, rounding_mode="floor")
            assert (blk == blk[0]).all(), f"{name} block {b} mixes blocks"
            assert st.shape_of_token[off[b]:off[b + 1]].unique().numel() == 1
    # every compression block lies inside one selection block, and windows cover each token once
    assert (st.slc_of_token[st.cmp_offsets[:-1]] == st.slc_of_token[st.cmp_offsets[1:] - 1]).all()
    for shifted in (False, True):
        perm_w, off = st.window_partition(shifted)
        assert int(off[-1]) == st.n_tokens
        if perm_w is not None:
            assert torch.equal(torch.sort(perm_w).values, torch.arange(st.n_tokens))
    assert not torch.equal(st.window_ids(True), st.window_ids(False))


def test_dot_precision_follows_torch_tf32_switch():
    """float32 dots are exact unless PyTorch allows TF32 for float32 matmuls; 16-bit dots keep Triton's default."""
    matmul = torch.backends.cuda.matmul
    saved = matmul.allow_tf32
    try:
        matmul.allow_tf32 = False
        assert seg.dot_precision(torch.float32) == "ieee"
        assert seg.dot_precision(torch.bfloat16) == seg.dot_precision(torch.float16) == "tf32"
        matmul.allow_tf32 = True
        assert seg.dot_precision(torch.float32) == "tf32"
        assert seg.dot_precision(torch.bfloat16) == "tf32"
        if hasattr(matmul, "fp32_precision"):  # the newer switch (reading allow_tf32 after it raises)
            matmul.fp32_precision = "ieee"
            assert seg.dot_precision(torch.float32) == "ieee"
            matmul.fp32_precision = "tf32"
            assert seg.dot_precision(torch.float32) == "tf32"
    finally:
        matmul.allow_tf32 = saved
    assert matmul.allow_tf32 == saved


def test_bad_input_errors():
    st, t = random_batch([20, 5], 4, 2, 16, seed=2, grid=8)
    q, k, v, kc, vc = (t[n].float() for n in ("q", "k", "v", "k_cmp", "v_cmp"))
    with pytest.raises(ValueError, match="multiple of"):
        compression_attention(q[:, :3], kc, vc, st)
    with pytest.raises(ValueError, match="is torch.float64 but"):
        window_attention(q, k.double(), v, st)
    with pytest.raises(ValueError, match="float32|TRITON_INTERPRET"):
        window_attention(q.half(), k.half(), v.half(), st)
    with pytest.raises(ValueError, match="tokens but the structure"):
        window_attention(q[:-1], k[:-1], v[:-1], st)
    with pytest.raises(ValueError, match="on meta"):
        window_attention(q.to("meta"), k, v, st)
    with pytest.raises(ValueError, match="backend"):
        window_attention(q, k, v, st, backend="cuda")
    coords, cu = random_shapes([30, 4], 8, seed=3)
    perm = block_order(coords, cu, 4, 8)
    with pytest.raises(ValueError, match="not sorted by 3D block"):
        SSAStructure(coords[perm.flip(0)], cu, 4, 8)
    with pytest.raises(ValueError, match="shape 1 has no tokens"):
        SSAStructure(coords, torch.tensor([0, 34, 34]), 4, 8)
    with pytest.raises(ValueError, match="multiple of cmp_block"):
        SSAStructure(coords, cu, 3, 8)


def _lists_by_sort(plan, selected, n_slc, per_item):
    """The selection's dK/dV lists and work items by a sort and tensor ops: the list kernels' reference."""
    n_units, hkv, k = selected.shape
    head = torch.arange(hkv)[None, :, None]
    key, order = torch.sort(torch.where(selected >= 0, head * n_slc + selected, hkv * n_slc).flatten(), stable=True)
    tidx = torch.div(order, hkv * k, rounding_mode="floor").to(torch.int32)
    qptr = torch.searchsorted(key, torch.arange(hkv * n_slc + 1)).to(torch.int32)
    seg = plan.chunk_seg.long()
    base = torch.arange(hkv)[:, None] * n_slc + seg[None, :]
    p0, p1 = qptr[base].long().flatten(), qptr[base + 1].long().flatten()
    n_it = (p1 - p0 + per_item - 1) // per_item
    rows = []
    for job in range(n_it.numel()):
        for i in range(int(n_it[job])):
            a = int(p0[job]) + i * per_item
            rows.append([job % seg.numel(), job // seg.numel(), a, min(a + per_item, int(p1[job]))])
    return qptr, tidx, torch.tensor(rows, dtype=torch.int32).view(-1, 4)


def test_selection_lists_kernel_matches_sort_cpu():
    """The dK/dV lists and work items built by the list kernels equal those of a sort (the order of the tiles
    inside one list is free; rows past the real work items are empty)."""
    from kernels.ssa import ops
    from kernels.ssa.scoring import selection_lists
    _device_dtype("cpu")
    st, t = random_batch([70, 2, 33, 150], 32, 2, 16, cmp_block=8, seed=6, grid=9)
    sel = select_blocks(t["q"].float(), t["k_cmp"].float(), None, st, top_k=3, q_tile=1, backend="torch")
    plan = ops._selection_plan(st, sel, 1, 16)
    for per_item in (1, 2, 5):
        n_items = 2 * plan.chunk_start.numel() + -(-plan.dkv_entries // per_item)
        qptr, tidx, items = selection_lists(sel, st.n_slc, plan.chunk_seg, per_item, n_items)
        rq, rt, ritems = _lists_by_sort(plan, sel, st.n_slc, per_item)
        assert torch.equal(qptr, rq)
        for i in range(qptr.numel() - 1):
            a, b = int(qptr[i]), int(qptr[i + 1])
            assert sorted(tidx[a:b].tolist()) == sorted(rt[a:b].tolist())
        assert torch.equal(items[:len(ritems)], ritems)
        assert (items[len(ritems):, 2] == items[len(ritems):, 3]).all()
