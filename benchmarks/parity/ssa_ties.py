"""Whether the SSA layer's parity misses sit on near-tied top-k blocks: the release vs ours, row by row.

    OMP_NUM_THREADS=2 .venv/bin/python -m benchmarks.parity.ssa_ties [--layer 1] [--device cuda --size paper]

Runs the ``ssa`` (or ``ssa_shifted``) parity stage, then recomputes, in float64 from our layer's own
queries and compressed keys, every query's selection scores (compression probabilities summed over the
heads of a KV group and over a selection block's compression blocks, as ``kernels/ssa/reference.py``)
and the margin between its k-th and (k+1)-th block, the smallest over KV heads. A row whose output
misses the tolerance while its margin is at float32 rounding is a tie that any float32 summation order
may break either way; a miss with a wide margin would be a real difference. It also counts queries
whose float64 top-k set differs from our kernel's (the same float32 scores, another rounding).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    __package__ = "benchmarks.parity"

from benchmarks.parity import common, run, ssa_branches


def _margins(q, k_cmp, st, n_kv: int, top_k: int):
    """float64 (N,) smallest k-th minus (k+1)-th block score over KV heads, and (N, Hkv, k) top-k block ids
    (global, sorted), for queries in block order. Shapes with ≤ k blocks get margin +inf."""
    q64, k64 = q.double(), k_cmp.double()
    n, hq, d = q.shape
    g = hq // n_kv
    margin = torch.full((n,), float("inf"), dtype=torch.float64, device=q.device)
    chosen = torch.full((n, n_kv, top_k), -1, dtype=torch.long, device=q.device)
    for b in range(st.n_shapes):
        a, e = st.cu_seqlens[b].item(), st.cu_seqlens[b + 1].item()
        ca, ce = st.cmp_shape_offsets[b].item(), st.cmp_shape_offsets[b + 1].item()
        sa, se = st.slc_shape_offsets[b].item(), st.slc_shape_offsets[b + 1].item()
        blocks = st.cmp_to_slc_local[ca:ce].long()
        for r0 in range(a, e, 1024):  # rows in chunks: (rows, Hq, n_cmp) float64 at a time
            r1 = min(e, r0 + 1024)
            kk = k64[ca:ce].repeat_interleave(g, dim=1)  # (n_cmp, Hq, D)
            s = torch.einsum("nhd,mhd->nhm", q64[r0:r1], kk) * d ** -0.5
            p = torch.softmax(s, dim=-1).reshape(r1 - r0, n_kv, g, ce - ca).sum(2)
            score = torch.zeros(r1 - r0, n_kv, se - sa, dtype=torch.float64, device=q.device)
            score.index_add_(2, blocks, p)
            if se - sa > top_k:
                top = score.topk(top_k + 1, dim=-1)
                margin[r0:r1] = (top.values[..., top_k - 1] - top.values[..., top_k]).amin(1)
                chosen[r0:r1] = top.indices[..., :top_k].sort(-1).values + sa
    return margin, chosen


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ssa_branches.add_args(ap)
    args = ap.parse_args(argv)
    import model.ssa as our_ssa
    from kernels.ssa import ops

    stage, ctx, release, ours, inputs = ssa_branches.build_ssa_stage(args)
    dtype, device = ctx.dtype, ctx.device
    _, ref = run._release_output(stage, release, inputs, ctx, dtype)

    seen = {}
    real_ssa, real_structure = our_ssa.spatial_sparse_attention, our_ssa.ssa_structure

    def spy_ssa(q, k, v, k_cmp, v_cmp, gates, st, **kw):
        seen.update(q=q, k_cmp=k_cmp, v_cmp=v_cmp, st=st, kw=kw)
        return real_ssa(q, k, v, k_cmp, v_cmp, gates, st, **kw)

    def spy_structure(x, cfg):
        out = real_structure(x, cfg)
        seen["perm"] = out[0]
        return out

    our_ssa.spatial_sparse_attention, our_ssa.ssa_structure = spy_ssa, spy_structure
    try:
        with torch.no_grad():
            _, out = run._as_dense(stage.ours(ours, run._to(inputs, device, dtype)))
    finally:
        our_ssa.spatial_sparse_attention, our_ssa.ssa_structure = real_ssa, real_structure

    tol = common.TOLERANCE[dtype]
    err = common.compare(out, ref)
    over_rows = err.row_max > tol  # input order
    q, k_cmp, st, kw = seen["q"], seen["k_cmp"], seen["st"], seen["kw"]
    top_k, n_kv = kw["top_k"], k_cmp.shape[1]
    with torch.no_grad():
        margin_sorted, chosen64 = _margins(q, k_cmp, st, n_kv, top_k)
        _, lse = ops.compression_attention(q, k_cmp, seen["v_cmp"], st, backend=kw.get("backend", "triton"))
        kernel_sel = ops.select_blocks(q, k_cmp, lse, st, top_k=top_k, q_tile=kw.get("q_tile", 1),
                                       backend=kw.get("backend", "triton"))
    perm = seen["perm"].cpu()
    margin = torch.empty_like(margin_sorted.cpu())
    margin[perm] = margin_sorted.cpu()
    n = margin.numel()
    finite = margin[torch.isfinite(margin)]
    print(f"SSA layer {args.layer}: {n} tokens, {args.dtype} on {device}, top-k {top_k}, {n_kv} KV heads; "
          f"layer max rel {err.max:.2e}, mean rel {err.mean:.2e}; {int(over_rows.sum())} rows over {tol:g}")
    if finite.numel():
        qs = torch.quantile(finite, torch.tensor([0.001, 0.01, 0.5], dtype=torch.float64)).tolist()
        print(f"  k-th minus (k+1)-th block score (smallest over KV heads), all rows: "
              f"0.1% {qs[0]:.2e}, 1% {qs[1]:.2e}, median {qs[2]:.2e}, min {finite.min().item():.2e}")
    if kw.get("q_tile", 1) == 1:
        differ = (kernel_sel.sort(-1).values.cpu() != chosen64.cpu()).any(-1).any(-1)
        d_in = torch.zeros(n, dtype=torch.bool)
        d_in[perm] = differ
        print(f"  queries whose kernel top-k set differs from the float64 one: {int(differ.sum())}"
              + (f" (their margins ≤ {margin[d_in].max().item():.2e})" if differ.any() else ""))
    if over_rows.any():
        m = margin[over_rows]
        order = torch.argsort(err.row_max[over_rows], descending=True)[:12]
        print(f"  rows over {tol:g}: margin ≤ {m.max().item():.2e} (median {m.median().item():.2e}); "
              f"rows with margin below that bound: {int((margin <= m.max()).sum())}")
        for i in order.tolist():
            row = over_rows.nonzero()[i].item()
            print(f"    row {row:7d}: error {err.row_max[row].item():.2e}, margin {margin[row].item():.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
