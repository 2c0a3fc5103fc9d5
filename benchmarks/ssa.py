"""Spatial Sparse Attention on one GPU: correctness sweep, per-branch timings, and two baselines.

    python benchmarks/ssa.py --check                       # bf16/fp16 sweep against the float64 reference
    python benchmarks/ssa.py --sizes 16384,131072          # timings (ms, effective TFLOP/s) and baselines

Shapes: one thick sphere shell on a 128³ latent grid, 32 query / 2 kv heads, d = 32,
bf16, top-k = 8, m_cmp = m_slc = 8. Baselines in the same run: full attention through
PyTorch SDPA (cuDNN and flash backends) and the same SSA pattern on FlexAttention.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]

from kernels.ssa import (SSAStructure, block_order, compression_attention, select_blocks,  # noqa: E402
                         selection_attention, spatial_sparse_attention, ssa_reference, window_attention)
from kernels.ssa import segment_attention as seg  # noqa: E402


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def bench(fn, ms=200):
    import triton
    return triton.testing.do_bench(fn, warmup=25, rep=ms, return_mode="median")


# ---------------------------------------------------------------------------------------------- check
def check(log):
    """Forward and every gradient of every branch, bf16 and fp16, against float64 on upcast inputs."""
    from ssa_cases import random_batch
    seg.POISON = True
    tol = {torch.bfloat16: 1.6e-2, torch.float16: 4e-3, torch.float32: 1e-5}
    worst = 0.0
    failures = []
    cases = [
        dict(sizes=[1500, 3, 700, 1, 37], d=32, cmp=8, q_tile=1, shifted=False),
        dict(sizes=[900, 1, 2, 411], d=64, cmp=4, q_tile=1, shifted=True),
        dict(sizes=[1200, 65, 5], d=32, cmp=8, q_tile=16, shifted=True),
        dict(sizes=[1700, 130, 1, 64], d=32, cmp=8, q_tile=64, shifted=False),
        dict(sizes=[800, 9, 333], d=64, cmp=4, q_tile=32, shifted=True),
    ]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = (torch.bfloat16, torch.float16)
    if dev == "cpu":  # smoke run of this script in the Triton interpreter
        dtypes = (torch.float32,)
        for c in cases:
            c["sizes"] = [max(1, s // 20) for s in c["sizes"]]
    for dtype in dtypes:
        for i, c in enumerate(cases):
            st, t = random_batch(c["sizes"], 32, 2, c["d"], cmp_block=c["cmp"], seed=10 + i, device=dev,
                                 grid=24)
            x = {k: v.to(dtype).requires_grad_(True) for k, v in t.items()}
            out = spatial_sparse_attention(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["gates"], st,
                                           top_k=8, q_tile=c["q_tile"], shifted=c["shifted"])
            w = torch.randn_like(out)
            grads = torch.autograd.grad(out, list(x.values()), w)
            # reference on the same (rounded) inputs in float64, given the kernel's block choice
            lse = compression_attention(x["q"].detach(), x["k_cmp"].detach(), x["v_cmp"].detach(), st)[1]
            sel = select_blocks(x["q"].detach(), x["k_cmp"].detach(), lse, st, top_k=8, q_tile=c["q_tile"])
            r = {k: v.detach().double().requires_grad_(True) for k, v in x.items()}
            rout, rsel = ssa_reference(r["q"], r["k"], r["v"], r["k_cmp"], r["v_cmp"], r["gates"], st, 8,
                                       c["shifted"], c["q_tile"])
            same_sel = (sel.sort(-1).values == rsel.sort(-1).values).all(-1).float().mean().item()
            rout2, _ = ssa_reference(r["q"], r["k"], r["v"], r["k_cmp"], r["v_cmp"], r["gates"], st, 8,
                                     c["shifted"], c["q_tile"], selected=sel)
            rgrads = torch.autograd.grad(rout2, list(r.values()), w.double())
            errs = {"out": rel(out, rout2)}
            errs.update({f"d{k}": rel(g, rg) for k, g, rg in zip(x, grads, rgrads)})
            bad = [k for k, e in errs.items() if not (e <= tol[dtype])]
            nan = any(torch.isnan(g).any().item() for g in (out, *grads))
            worst = max(worst, *errs.values())
            line = (f"check {str(dtype)[6:]:8s} case {i} N={st.n_tokens} d={c['d']} m_cmp={c['cmp']} "
                    f"q_tile={c['q_tile']} shifted={c['shifted']} same-selection={same_sel:.4f} "
                    + " ".join(f"{k}={e:.2e}" for k, e in errs.items()))
            log(line)
            if bad or nan:
                failures.append(line)
    seg.POISON = False
    log(f"check: {'FAIL' if failures else 'ok'}; worst relative error {worst:.2e}")
    return not failures


# ------------------------------------------------------------------------------------------ workload
def shell(n, grid=128, device="cuda"):
    """n voxels of a thick sphere shell (the n closest to radius 0.4·grid) on a grid³ lattice."""
    ax = torch.arange(grid, device=device, dtype=torch.float32)
    c = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    dist = ((c - (grid - 1) / 2).norm(dim=1) - 0.4 * grid).abs()
    return c[torch.argsort(dist)[:n]].int()


def workload(n, hq=32, hkv=2, d=32, m=8, dtype=torch.bfloat16, shared_gate=False):
    """shared_gate: gates (N, 3), one per token and branch for every head, as the released layer makes them."""
    coords = shell(n)
    cu = torch.tensor([0, n], device="cuda")
    coords = coords[block_order(coords, cu, m, 8)]
    st = SSAStructure(coords, cu, m, 8)
    torch.manual_seed(n)  # the same tensors for every run and code version at this size
    mk = lambda *s: torch.randn(*s, device="cuda", dtype=dtype)  # noqa: E731
    t = dict(q=mk(n, hq, d), k=mk(n, hkv, d), v=mk(n, hkv, d), k_cmp=mk(st.n_cmp, hkv, d),
             v_cmp=mk(st.n_cmp, hkv, d), gates=torch.sigmoid(mk(n, 3) if shared_gate else mk(n, hq, 3)))
    return st, t


def load_base(base: str):
    """kernels/ssa of another version, imported beside the working tree's as the package ``ssa_base``: ``base``
    is a folder holding kernels/ssa/ (made with ``git archive REV kernels/ssa | tar -x -C DIR``, e.g. carried to
    a machine without the repository's history) or a git revision read here with ``git archive``."""
    import importlib
    import subprocess
    import tempfile
    src = os.path.join(base, "kernels", "ssa")
    if not os.path.isdir(src):
        tmp = tempfile.mkdtemp(prefix="ssa-base-")
        tar = subprocess.run(["git", "-C", _ROOT, "archive", base, "kernels/ssa"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=tar.stdout, check=True)
        src = os.path.join(tmp, "kernels", "ssa")
    pkg = os.path.join(tempfile.mkdtemp(prefix="ssa-base-pkg-"), "ssa_base")
    import shutil
    shutil.copytree(src, pkg)
    sys.path.insert(0, os.path.dirname(pkg))
    return importlib.import_module("ssa_base")


def ab_base(log, base: str, n=131072, q_tiles=(1, 64), rounds=3):
    """The whole SSA of the working tree against ``base`` (load_base) in one process, rows alternated, paper
    configuration: ms forward / backward per round, the ratio tree / base of the medians, and the outputs'
    relative difference."""
    import kernels.ssa as tree
    mods = {"base": load_base(base), "tree": tree}
    st0, t = workload(n, m=4)
    structs = {k: m.SSAStructure(st0._coords, st0.cu_seqlens, 4, 8) for k, m in mods.items()}
    x = {k: v.detach().requires_grad_(True) for k, v in t.items()}
    for qt in q_tiles:
        times = {k: [] for k in mods}
        outs = {}
        for r in range(rounds):
            for name, m in mods.items():
                fn = lambda *a, m=m, st=structs[name]: m.spatial_sparse_attention(*a, st, top_k=8, q_tile=qt)  # noqa
                outs[name] = fn(*x.values()).detach()
                times[name].append(time_fwd_bwd(fn, list(x.values()), 300))
                log(f"base ab q_tile={qt} round {r} [{name}]: {times[name][-1][0]:.3f} / {times[name][-1][1]:.3f} ms")
        med = {k: [sorted(v[i] for v in ts)[len(ts) // 2] for i in (0, 1)] for k, ts in times.items()}
        log(f"base ab q_tile={qt}: tree / base {med['tree'][0] / med['base'][0]:.3f} forward, "
            f"{med['tree'][1] / med['base'][1]:.3f} backward (medians of {rounds}); outputs differ by "
            f"{rel(outs['tree'], outs['base']):.2e}")


def paper(log, n=131072, q_tiles=(1, 64), sdpa=True, detail=True):
    """The paper's SSA (m_cmp 4, m_slc 8, top-k 8, 32/2 heads, d 32, gates (N, 3)), whole forward and backward
    per q_tile, its branches at q_tile 1, and full attention (SDPA cuDNN and flash) in the same process."""
    st, t = workload(n, m=4, shared_gate=True)
    log(f"paper N={n}: {st.n_cmp} compression blocks (m_cmp 4), {st.n_slc} selection blocks (m_slc 8), "
        f"{n / st.n_cmp:.1f} / {n / st.n_slc:.1f} tokens per block")
    x = {k: v.detach().requires_grad_(True) for k, v in t.items()}
    rows = {}
    for qt in q_tiles:
        rows[f"ssa q_tile={qt}"] = time_fwd_bwd(lambda *a: spatial_sparse_attention(*a, st, top_k=8, q_tile=qt),
                                                list(x.values()))
        log(f"paper ssa q_tile={qt}: {rows[f'ssa q_tile={qt}'][0]:.3f} / {rows[f'ssa q_tile={qt}'][1]:.3f} ms")
    res = ours(st, t, 1, log)[0] if detail else {}
    for br, fb in res.items():
        if br != "ssa":
            rows[f"q_tile=1 {br}"] = fb
    if len(q_tiles) > 1 and detail:
        tile_vs_query(st, t, q_tiles[-1], "random q, k", log)
        tile_vs_query(st, smooth_inputs(st), q_tiles[-1], "smooth field", log)
    if sdpa:
        for be in ("cudnn", "flash"):
            try:
                rows[f"sdpa-{be}"] = sdpa_full(t, be)
            except Exception as e:  # noqa: BLE001 - a failing baseline must not hide our numbers
                log(f"sdpa {be} failed: {type(e).__name__}: {str(e)[:200]}")
    best = [min(v[i] for k, v in rows.items() if k.startswith("sdpa")) for i in (0, 1)] if sdpa else None
    log(f"{'paper, N=' + str(n):>24} {'fwd ms':>9} {'bwd ms':>9} {'fwd x':>7} {'bwd x':>7}")
    for k, (f, b) in rows.items():
        ratio = (f"{best[0] / f:>7.1f} {best[1] / b:>7.1f}" if best and b else "")
        log(f"{k:>24} {f:>9.3f} {b:>9.3f} {ratio}")
    return rows


def smooth_inputs(st, hq=32, hkv=2, d=32, dtype=torch.bfloat16, seed=0, noise=0.1):
    """q, k, v as functions of position: random Fourier features of the voxel coordinates (periods of
    a few 8³ blocks) through random projections, q/k RMS-normalized as in the layer, plus a little
    per-token noise; pooled k_cmp/v_cmp are block means, as the layer's pooling gives."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    c = st._coords.float()
    w = torch.randn(3, 32, device="cuda", generator=g) * (2 * torch.pi / 32)  # ~32-voxel periods
    f = torch.cat([torch.sin(c @ w), torch.cos(c @ w)], 1)  # (N, 64)
    n = c.shape[0]

    def proj(heads):
        a = torch.randn(64, heads * d, device="cuda", generator=g) / 8
        x = (f @ a).view(n, heads, d)
        return x + noise * x.std() * torch.randn(x.shape, device="cuda", generator=g)

    norm = lambda x: x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6)  # noqa: E731
    q, k, v = norm(proj(hq)), norm(proj(hkv)), proj(hkv)
    cnt = (st.cmp_offsets[1:] - st.cmp_offsets[:-1]).float()[:, None, None]
    pool = lambda x: torch.zeros(st.n_cmp, hkv, d, device="cuda").index_add(0, st.cmp_of_token, x) / cnt  # noqa
    gates = torch.sigmoid(torch.randn(n, hq, 3, device="cuda", generator=g))
    return {name: x.to(dtype) for name, x in
            dict(q=q, k=k, v=v, k_cmp=pool(k), v_cmp=pool(v), gates=gates).items()}


def tile_vs_query(st, t, qt, label, log):
    """What sharing one selection per qt-token tile changes against the paper's per-query selection."""
    q, k, v, kc, vc = (t[s] for s in ("q", "k", "v", "k_cmp", "v_cmp"))
    lse = compression_attention(q, kc, vc, st)[1]
    s1 = select_blocks(q, kc, lse, st, top_k=8, q_tile=1)
    st_ = select_blocks(q, kc, lse, st, top_k=8, q_tile=qt)
    unit = torch.arange(st.n_tokens, device="cuda") // qt  # one shape: units are consecutive
    shared = (s1[:, :, :, None] == st_[unit][:, :, None, :]).any(-1).float().mean().item()
    o1 = selection_attention(q, k, v, st, s1, q_tile=1)
    o2 = selection_attention(q, k, v, st, st_, q_tile=qt)
    a1 = spatial_sparse_attention(q, k, v, kc, vc, t["gates"], st, top_k=8, q_tile=1)
    a2 = spatial_sparse_attention(q, k, v, kc, vc, t["gates"], st, top_k=8, q_tile=qt)
    log(f"tile vs query ({label}, N={st.n_tokens}, q_tile={qt}): {shared:.3f} of each query's own blocks are in "
        f"its tile's; relative difference of the selection output {rel(o2, o1):.3e}, of the whole SSA output "
        f"{rel(a2, a1):.3e}")


def pair_counts(st, sel, q_tile, hq, hkv):
    """Query·key pairs each branch computes (summed over query heads)."""
    n = st.n_tokens
    cmp = n * st.n_cmp * hq
    sizes = (st.slc_offsets[1:] - st.slc_offsets[:-1])
    tile_len = torch.full((sel.shape[0],), q_tile, device=sel.device)
    tile_len[-1] = n - q_tile * (sel.shape[0] - 1)
    per = torch.where(sel >= 0, sizes[sel.clamp_min(0)], 0).sum(-1)  # (tiles, hkv)
    slc = int((per * tile_len[:, None]).sum()) * (hq // hkv)
    woff = st.window_partition(False)[1]
    win = int(((woff[1:] - woff[:-1]).double() ** 2).sum()) * hq
    return dict(cmp=cmp, slc=slc, win=win)


def time_fwd_bwd(fn, inputs, ms=200):
    """(forward ms, backward ms) of fn(*inputs) -> tensor."""
    f = bench(lambda: fn(*inputs), ms)
    out = fn(*inputs)
    go = torch.randn_like(out)
    b = bench(lambda: torch.autograd.grad(out, inputs, go, retain_graph=True), ms)
    return f, b


PAPER_TOKEN_VARIANTS = {  # ops.SELECT_TOKEN: launch settings, key chunk and dK/dV path of per-token programs
    "128-row settings": {},
    "2 warps": {"launch": {}, "dkv_in_dq": 2},
    "2 warps, dK/dV kernel": {"launch": {}, "dkv_in_dq": 0},
    "1 warp, dK/dV kernel": {"launch": {"fwd": {"num_warps": 1}, "dq": {"num_warps": 1}}, "dkv_in_dq": 0},
    "2 warps, 128-key chunks, dK/dV kernel": {"launch": {}, "block_n": 128, "dkv_in_dq": 0},
    "4 warps, 128-key chunks, dK/dV kernel": {"launch": {"fwd": {"num_warps": 4}, "dq": {"num_warps": 4}},
                                              "block_n": 128, "dkv_in_dq": 0},
}


def paper_ab(log, n=131072, rounds=2):
    """Per-query selection (q_tile 1) in the paper's configuration, rows alternated in one process: each per-token
    setting of PAPER_TOKEN_VARIANTS (selection branch and whole SSA, outputs and gradients against the first).
    Leaves the fastest whole-SSA setting in place."""
    from kernels.ssa import ops
    st, t = workload(n, m=4, shared_gate=True)
    x = {k: v.detach().requires_grad_(True) for k, v in t.items()}
    q, kc, vc = t["q"], t["k_cmp"], t["v_cmp"]
    lse = compression_attention(q, kc, vc, st)[1]
    sel = select_blocks(q, kc, lse, st, top_k=8, q_tile=1)
    go = torch.randn(q.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(q.dtype)
    first, best = None, (float("inf"), {})
    for r in range(rounds):
        for name, cfg in PAPER_TOKEN_VARIANTS.items():
            ops.SELECT_TOKEN = cfg
            try:
                xs = [x["q"], x["k"], x["v"]]
                if r == 0:
                    o = selection_attention(*xs, st, sel, q_tile=1)
                    g = torch.autograd.grad(o, xs, go)
                    if first is None:
                        first = (o, g)
                    diff = " ".join(f"{k_} {rel(a, b):.1e}" for k_, a, b in zip(("out", "dq", "dk", "dv"),
                                                                                 (o, *g), (first[0], *first[1])))
                    log(f"paper-ab [{name}] against the first: {diff}")
                f, b = time_fwd_bwd(lambda a, b_, c: selection_attention(a, b_, c, st, sel, q_tile=1), xs, 100)
                ff, bb = time_fwd_bwd(lambda *a: spatial_sparse_attention(*a, st, top_k=8, q_tile=1),
                                      list(x.values()), 300)
            except Exception as e:  # noqa: BLE001 - a setting can fail to compile; that is an answer too
                log(f"paper-ab [{name}] failed: {type(e).__name__}: {str(e)[:200]}")
                continue
            log(f"paper-ab round {r} [{name}]: selection {f:.3f} / {b:.3f} ms, whole SSA {ff:.3f} / {bb:.3f} ms")
            if r == rounds - 1 and ff + bb < best[0]:
                best = (ff + bb, cfg, name)
    ops.SELECT_TOKEN = best[1]
    log(f"paper-ab: fastest whole SSA with [{best[2] if len(best) > 2 else 'none'}], kept for what follows")


# ------------------------------------------------------------------------------------------- ours
def ours(st, t, q_tile, log):
    x = {k: v.detach().requires_grad_(True) for k, v in t.items()}
    q, k, v, kc, vc, g = (x[n] for n in ("q", "k", "v", "k_cmp", "v_cmp", "gates"))
    res = {}
    res["cmp"] = time_fwd_bwd(lambda a, b, c: compression_attention(a, b, c, st)[0], [q, kc, vc])
    lse = compression_attention(q.detach(), kc.detach(), vc.detach(), st)[1]
    res["select"] = (bench(lambda: select_blocks(q.detach(), kc.detach(), lse, st, top_k=8, q_tile=q_tile)), 0.0)
    sel = select_blocks(q.detach(), kc.detach(), lse, st, top_k=8, q_tile=q_tile)
    res["slc"] = time_fwd_bwd(lambda a, b, c: selection_attention(a, b, c, st, sel, q_tile=q_tile), [q, k, v])
    res["win"] = time_fwd_bwd(lambda a, b, c: window_attention(a, b, c, st), [q, k, v])
    res["win_shifted"] = time_fwd_bwd(lambda a, b, c: window_attention(a, b, c, st, shifted=True), [q, k, v])
    res["ssa"] = time_fwd_bwd(lambda *a: spatial_sparse_attention(*a, st, top_k=8, q_tile=q_tile),
                              [q, k, v, kc, vc, g])
    return res, sel


# ---------------------------------------------------------------------------------------- baselines
def sdpa_full(t, backend_name):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    backend = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend_name]
    g = t["q"].shape[1] // t["k"].shape[1]
    q = t["q"].transpose(0, 1)[None].detach().requires_grad_(True)
    k = t["k"].repeat_interleave(g, 1).transpose(0, 1)[None].detach().requires_grad_(True)
    v = t["v"].repeat_interleave(g, 1).transpose(0, 1)[None].detach().requires_grad_(True)

    def fn(a, b, c):
        with sdpa_kernel(backend):
            return torch.nn.functional.scaled_dot_product_attention(a, b, c)
    n = q.shape[2]
    ms = 200 if n <= 32768 else 1500
    return time_fwd_bwd(fn, [q, k, v], ms)


def pad_cols(idx, n):
    """BlockMask index tensors are as wide as the number of key blocks; unused entries are ignored."""
    out = torch.zeros((*idx.shape[:-1], n), dtype=torch.int32, device=idx.device)
    out[..., :idx.shape[-1]] = idx
    return out


def flex_ssa(st, t, log):
    """The same three branches as a PyTorch user would build them on FlexAttention (128-token blocks)."""
    from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
    torch._dynamo.reset()  # a fresh static compile per size: a dynamic recompile asked for 512 GiB at 64k
    flex = torch.compile(flex_attention, dynamic=False)
    n, hq, d = t["q"].shape
    hkv = t["k"].shape[1]
    B = 128
    nb = n // B
    T = lambda x: x.transpose(0, 1)[None].contiguous().detach().requires_grad_(True)  # noqa: E731
    q, k, v, kc, vc = (T(t[s]) for s in ("q", "k", "v", "k_cmp", "v_cmp"))
    res = {}
    # compression: pooled keys padded to whole 128-blocks, padding masked out
    nc = kc.shape[2]
    pad = (-nc) % B
    kcp, vcp = (torch.nn.functional.pad(x.detach(), (0, 0, 0, pad)).requires_grad_(True) for x in (kc, vc))
    cmask = create_block_mask(lambda b, h, i, j: j < nc, None, None, n, nc + pad, device="cuda", BLOCK_SIZE=B)
    log(f"flex compression: {nc} pooled tokens padded to {nc + pad}")
    res["cmp"] = time_fwd_bwd(lambda a, b, c: flex(a, b, c, block_mask=cmask, enable_gqa=True), [q, kcp, vcp])
    log("flex selection")
    # selection: per 128-token query block, top-8 of the 128-token key blocks by mean-pooled scores
    with torch.no_grad():
        qb = t["q"].float().view(nb, B, hkv, hq // hkv, d).mean((1, 3))  # (nb, hkv, d)
        kb = t["k"].float().view(nb, B, hkv, d).mean(1)
        score = torch.einsum("ihd,jhd->hij", qb, kb)
        idx = score.topk(8, dim=-1).indices.sort(-1).values.to(torch.int32)  # (hkv, nb, 8)
        idx = pad_cols(idx.repeat_interleave(hq // hkv, 0)[None], nb)  # last dim = number of key blocks
        num = torch.full((1, hq, nb), 8, dtype=torch.int32, device="cuda")
        mask = BlockMask.from_kv_blocks(torch.zeros_like(num), idx, num, idx, BLOCK_SIZE=B)
    res["slc"] = time_fwd_bwd(lambda a, b, c: flex(a, b, c, block_mask=mask, enable_gqa=True), [q, k, v])
    log("flex window")
    # window: key blocks covering the windows of each query block, masked to the same window
    win = st.window_ids(False)
    woff = st.window_partition(False)[1]
    with torch.no_grad():
        first = woff[win.view(nb, B)[:, 0]] // B
        last = (woff[win.view(nb, B)[:, -1] + 1] - 1) // B
        cnt = (last - first + 1).to(torch.int32)
        width = int(cnt.max())
        idx = (first[:, None] + torch.arange(width, device="cuda")[None]).clamp_max(nb - 1).to(torch.int32)
        wmask = BlockMask.from_kv_blocks(cnt[None, None].contiguous(), pad_cols(idx[None, None], nb),
                                         BLOCK_SIZE=B, mask_mod=lambda b, h, i, j: win[i] == win[j])
    res["win"] = time_fwd_bwd(lambda a, b, c: flex(a, b, c, block_mask=wmask, enable_gqa=True), [q, k, v])
    log(f"flex window: up to {width} key blocks per query block, mean {cnt.float().mean().item():.2f}")
    return res


def sweep_tiles(log, n=131072, q_tiles=(1, 64)):
    """Launch settings of the selection branch: scoring time per tile size; forward/backward ms for
    dK/dV work items of several sizes and 128 or 256 rows per program."""
    from kernels.ssa import ops
    st, t = workload(n)
    x = {s: t[s].detach().requires_grad_(True) for s in ("q", "k", "v")}
    lse = compression_attention(t["q"], t["k_cmp"], t["v_cmp"], st)[1]
    for qt in q_tiles:
        ms = bench(lambda: select_blocks(t["q"], t["k_cmp"], lse, st, top_k=8, q_tile=qt))
        sel = select_blocks(t["q"], t["k_cmp"], lse, st, top_k=8, q_tile=qt)
        log(f"sweep tiles q_tile={qt}: scoring + top-k {ms:.3f} ms")
        for steps, sub_rows in ((32, 128), (64, 128), (128, 128), (32, 256), (64, 256)):
            if qt == 1 and sub_rows != 128:
                continue
            ops.SELECT_DKV_STEPS, ops.SELECT_SUB_ROWS = steps, sub_rows
            try:
                f, b = time_fwd_bwd(lambda a, b_, c: selection_attention(a, b_, c, st, sel, q_tile=qt),
                                    [x["q"], x["k"], x["v"]])
            except Exception as e:  # a setting can exceed shared memory; that is an answer too
                f = b = float("nan")
                log(f"  {type(e).__name__}: {str(e)[:80]}")
            log(f"sweep tiles slc q_tile={qt} dkv_steps={steps} rows={sub_rows}: {f:.3f} / {b:.3f} ms")
    ops.SELECT_DKV_STEPS, ops.SELECT_SUB_ROWS = 64, 128


def compare_paths(log, n=131072, qt=64):
    """The fused paths (scoring + top-k of long units in one kernel, dQ from the dK/dV kernel) against the
    two-pass paths on the same inputs: gradients' relative difference, the share of equal block choices,
    and ms of each branch and of the whole SSA."""
    from kernels.ssa import ops
    st, t = workload(n)
    x = {s_: t[s_].detach().requires_grad_(True) for s_ in t}
    configs = {"two-pass": (False, dict(cmp=False, slc=False, win=False)),
               "fused": (True, dict(cmp=True, slc=True, win=True)),
               "fused, window two-pass": (True, dict(cmp=True, slc=True, win=False))}
    ref = None
    for name, (long_scoring, fused) in configs.items():
        ops.SELECT_FUSED_LONG = long_scoring
        ops.FUSED_DQ.update(fused)
        st._cache.clear()
        lse = compression_attention(t["q"], t["k_cmp"], t["v_cmp"], st)[1]
        sel = select_blocks(t["q"], t["k_cmp"], lse, st, top_k=8, q_tile=qt)
        out = spatial_sparse_attention(*x.values(), st, q_tile=qt)
        go = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(0)).to(out.dtype)
        grads = torch.autograd.grad(out, list(x.values()), go)
        if ref is None:
            ref = (sel, out, grads)
        same = (sel.sort(-1).values == ref[0].sort(-1).values).all(-1).float().mean().item()
        diffs = " ".join(f"d{k_}={rel(g, rg):.1e}" for k_, g, rg in zip(x, grads, ref[2]))
        ms = {"select": bench(lambda: select_blocks(t["q"], t["k_cmp"], lse, st, top_k=8, q_tile=qt), 100)}
        ms["cmp"] = time_fwd_bwd(lambda a, b, c: compression_attention(a, b, c, st)[0],
                                 [x["q"], x["k_cmp"], x["v_cmp"]], 100)
        ms["slc"] = time_fwd_bwd(lambda a, b, c: selection_attention(a, b, c, st, sel, q_tile=qt),
                                 [x["q"], x["k"], x["v"]], 100)
        ms["win"] = time_fwd_bwd(lambda a, b, c: window_attention(a, b, c, st), [x["q"], x["k"], x["v"]], 100)
        ms["ssa"] = time_fwd_bwd(lambda *a: spatial_sparse_attention(*a, st, q_tile=qt), list(x.values()), 100)
        log(f"paths N={n} q_tile={qt} [{name}] same selection {same:.4f}, out {rel(out, ref[1]):.1e} {diffs}")
        log(f"paths N={n} q_tile={qt} [{name}] ms " + " ".join(
            f"{k_}={v_:.3f}" if isinstance(v_, float) else f"{k_}={v_[0]:.3f}/{v_[1]:.3f}" for k_, v_ in ms.items()))
    ops.SELECT_FUSED_LONG = False
    ops.FUSED_DQ.update(configs["two-pass"][1])
    st._cache.clear()


def sweep_bwd(log, n=131072, qt=64):
    """Launch settings at one size for tile-level selection: the fused scoring's key chunk and row step,
    the selection forward's chunk/warps/stages, the dK/dV chunk and warps of selection and compression;
    then where the whole SSA's time goes, kernel by kernel (torch.profiler)."""
    import dataclasses

    from kernels.ssa import ops, scoring
    st, t = workload(n)
    x = {s_: t[s_].detach().requires_grad_(True) for s_ in t}
    q, k, v, kc, vc = (t[s_] for s_ in ("q", "k", "v", "k_cmp", "v_cmp"))
    lse = compression_attention(q, kc, vc, st)[1]
    ms = bench(lambda: select_blocks(q, kc, lse, st, top_k=8, q_tile=qt))
    log(f"sweep scoring q_tile={qt} score matrix + torch.topk (default): {ms:.3f} ms")
    ops.SELECT_FUSED_LONG = True
    for bn in (32, 64, 128):
        for rows in (128, 256):
            ops.SELECT_LONG_BLOCK_N, scoring.SELECT_STEP_ROWS = bn, rows
            ms = bench(lambda: select_blocks(q, kc, lse, st, top_k=8, q_tile=qt))
            log(f"sweep scoring q_tile={qt} one kernel, block_n={bn} step_rows={rows}: {ms:.3f} ms")
    ops.SELECT_LONG_BLOCK_N, scoring.SELECT_STEP_ROWS, ops.SELECT_FUSED_LONG = 64, 128, False
    sel = select_blocks(q, kc, lse, st, top_k=8, q_tile=qt)
    base = ops._selection_plan(st, sel, qt, 16)
    for bn, nw, ns in ((64, 4, 3), (32, 4, 3), (64, 8, 3), (64, 4, 2), (64, 4, 4), (32, 4, 4)):
        plan = dataclasses.replace(base, block_n=bn, num_warps=nw, num_stages=ns)
        ms = bench(lambda: seg.segment_attention(q, k, v, plan))
        log(f"sweep slc fwd q_tile={qt} block_n={bn} warps={nw} stages={ns}: {ms:.3f} ms")
    fused0 = dict(ops.FUSED_DQ)
    for fused, cn, nw in ((False, 0, 0), (True, 0, 0), (True, 128, 8), (True, 64, 8), (True, 128, 4)):
        ops.SELECT_DKV_BLOCK_N, ops.SELECT_DKV_WARPS, ops.FUSED_DQ["slc"] = cn, nw, fused
        f, b = time_fwd_bwd(lambda a, b_, c: selection_attention(a, b_, c, st, sel, q_tile=qt),
                            [x["q"], x["k"], x["v"]])
        log(f"sweep slc bwd q_tile={qt} fused_dq={fused} chunk={cn or 'auto'} warps={nw or 'auto'}: "
            f"{f:.3f} / {b:.3f} ms")
    ops.SELECT_DKV_BLOCK_N, ops.SELECT_DKV_WARPS = 0, 0
    for fused, cn, nw in ((False, 64, 0), (True, 64, 0), (True, 128, 8), (True, 128, 4), (True, 64, 8)):
        ops.CMP_DKV.update(chunk_n=cn, dkv_warps=nw)
        ops.FUSED_DQ["cmp"] = fused
        st._cache.clear()
        f, b = time_fwd_bwd(lambda a, b_, c: compression_attention(a, b_, c, st)[0], [x["q"], x["k_cmp"], x["v_cmp"]])
        log(f"sweep cmp bwd fused_dq={fused} chunk={cn} warps={nw or 'auto'}: {f:.3f} / {b:.3f} ms")
    ops.CMP_DKV.update(chunk_n=64, dkv_warps=0)
    for fused in (False, True):
        ops.FUSED_DQ["win"] = fused
        st._cache.clear()
        for shifted in (False, True):
            f, b = time_fwd_bwd(lambda a, b_, c: window_attention(a, b_, c, st, shifted=shifted),
                                [x["q"], x["k"], x["v"]])
            log(f"sweep win bwd fused_dq={fused} shifted={shifted}: {f:.3f} / {b:.3f} ms")
    ops.FUSED_DQ.update(fused0)
    st._cache.clear()
    out = spatial_sparse_attention(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["gates"], st, q_tile=qt)
    go = torch.randn_like(out)
    for _ in range(3):
        out = spatial_sparse_attention(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["gates"], st, q_tile=qt)
        torch.autograd.grad(out, list(x.values()), go)
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            out = spatial_sparse_attention(x["q"], x["k"], x["v"], x["k_cmp"], x["v_cmp"], x["gates"], st,
                                           q_tile=qt)
            torch.autograd.grad(out, list(x.values()), go)
        torch.cuda.synchronize()
    log(f"profile: whole SSA forward + backward, N={n}, q_tile={qt}, 5 iterations (device time per kernel)")
    log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=22))


def ab_variants(log, sizes=(131072,), qt=64):
    """Kernel variants against each other on the same inputs, one process: the plain softmax (every chunk
    masked, scale multiplied apart) against the lean one, score-tile column sums by reductions against
    a matmul with ones, and rowsum(O·dO) by its own pass against inside the dQ kernel. ms of scoring,
    each branch and the whole SSA; outputs and gradients against the first variant."""
    from kernels.ssa import scoring
    variants = {"plain": (False, False, False), "lean": (True, False, False), "lean+sum-dot": (True, True, False),
                "lean+sum-dot+delta-in-dQ": (True, True, True)}
    keep = (seg.LEAN, scoring.SCORE_SUM_DOT, seg.DELTA_IN_DQ)
    for n in sizes:
        st, t = workload(n)
        x = {s_: t[s_].detach().requires_grad_(True) for s_ in t}
        gen = torch.Generator("cuda").manual_seed(0)
        go = torch.randn(t["q"].shape, device="cuda", generator=gen).to(t["q"].dtype)
        ref = None
        for name, (lean, sum_dot, delta) in variants.items():
            seg.LEAN, scoring.SCORE_SUM_DOT, seg.DELTA_IN_DQ = lean, sum_dot, delta
            lse = compression_attention(t["q"], t["k_cmp"], t["v_cmp"], st)[1]
            sel = select_blocks(t["q"], t["k_cmp"], lse, st, top_k=8, q_tile=qt)
            out = spatial_sparse_attention(*x.values(), st, q_tile=qt)
            grads = torch.autograd.grad(out, list(x.values()), go)
            if ref is None:
                ref = (sel, out, grads)
            same = (sel.sort(-1).values == ref[0].sort(-1).values).all(-1).float().mean().item()
            diffs = " ".join(f"d{k_}={rel(g, rg):.1e}" for k_, g, rg in zip(x, grads, ref[2]))
            ms = {"select": bench(lambda: select_blocks(t["q"], t["k_cmp"], lse, st, top_k=8, q_tile=qt))}
            ms["cmp"] = time_fwd_bwd(lambda a, b, c: compression_attention(a, b, c, st)[0],
                                     [x["q"], x["k_cmp"], x["v_cmp"]])
            ms["slc"] = time_fwd_bwd(lambda a, b, c: selection_attention(a, b, c, st, ref[0], q_tile=qt),
                                     [x["q"], x["k"], x["v"]])
            ms["win"] = time_fwd_bwd(lambda a, b, c: window_attention(a, b, c, st), [x["q"], x["k"], x["v"]])
            ms["ssa"] = time_fwd_bwd(lambda *a: spatial_sparse_attention(*a, st, q_tile=qt), list(x.values()))
            log(f"variants N={n} q_tile={qt} [{name}] same selection {same:.4f}, out {rel(out, ref[1]):.1e} {diffs}")
            log(f"variants N={n} q_tile={qt} [{name}] ms " + " ".join(
                f"{k_}={v_:.3f}" if isinstance(v_, float) else f"{k_}={v_[0]:.3f}/{v_[1]:.3f}"
                for k_, v_ in ms.items()))
    seg.LEAN, scoring.SCORE_SUM_DOT, seg.DELTA_IN_DQ = keep


def profile(log, n, qt=64, cpu=False):
    """Where the whole SSA's forward + backward time goes, kernel by kernel (torch.profiler, 5 iterations);
    with cpu=True also the host side (what bounds small sizes)."""
    st, t = workload(n)
    x = {s_: t[s_].detach().requires_grad_(True) for s_ in t}
    out = spatial_sparse_attention(*x.values(), st, q_tile=qt)
    go = torch.randn_like(out)
    for _ in range(3):
        out = spatial_sparse_attention(*x.values(), st, q_tile=qt)
        torch.autograd.grad(out, list(x.values()), go)
    torch.cuda.synchronize()
    acts = [torch.profiler.ProfilerActivity.CUDA] + ([torch.profiler.ProfilerActivity.CPU] if cpu else [])
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(5):
            out = spatial_sparse_attention(*x.values(), st, q_tile=qt)
            torch.autograd.grad(out, list(x.values()), go)
        torch.cuda.synchronize()
    log(f"profile: whole SSA forward + backward, N={n}, q_tile={qt}, 5 iterations")
    log(prof.key_averages().table(sort_by="cuda_time_total", row_limit=24, max_name_column_width=60))
    if cpu:
        log(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=24, max_name_column_width=60))


def sweep(log, n=131072):
    """Launch settings of the selection kernels at one size: the table's defaults come from here."""
    import dataclasses

    from kernels.ssa import ops, scoring
    from kernels.ssa.ops import _selection_plan
    st, t = workload(n)
    q, k, v, kc = (t[s] for s in ("q", "k", "v", "k_cmp"))
    lse = compression_attention(q, kc, t["v_cmp"], st)[1]
    for qt in (1, 8):
        for rows in (32, 64, 128, 256):
            for bn in (32, 64, 128):
                if qt * 16 > rows:
                    continue
                scoring.SELECT_ROWS, ops.SELECT_BLOCK_N = rows, bn
                ms = bench(lambda: select_blocks(q, kc, lse, st, top_k=8, q_tile=qt))
                log(f"sweep select q_tile={qt} rows={rows} block_n={bn}: {ms:.3f} ms")
        scoring.SELECT_ROWS, ops.SELECT_BLOCK_N = 64, 0
        sel = select_blocks(q, kc, lse, st, top_k=8, q_tile=qt)
        base = _selection_plan(st, sel, qt, 16)
        for bn in (32, 64, 128):
            for nw in (2, 4, 8):
                for ns in (1, 3):
                    plan = dataclasses.replace(base, block_n=bn, num_warps=nw, num_stages=ns)
                    try:
                        ms = bench(lambda: seg.segment_attention(q, k, v, plan))
                    except Exception as e:  # a setting can exceed shared memory; that is an answer too
                        ms = float("nan")
                        log(f"  {type(e).__name__}: {str(e)[:80]}")
                    log(f"sweep slc fwd q_tile={qt} block_n={bn} warps={nw} stages={ns}: {ms:.3f} ms")


def ab_whole(log, sizes=(8192, 131072), qt=64):
    """The whole SSA under the switches of the latest round, same inputs, one process: the current defaults against
    each switch turned back (and the opt-in warp specialization). Outputs and gradients against the first row."""
    from kernels.ssa import ops
    names = ("SCORE_IN_CMP", "GATE_IN_WINDOW", "LEAN_HOST", "SELECT_LISTS_KERNEL", "BWD_STREAMS")
    keep = {nm: getattr(ops, nm) for nm in names}
    rows = [("current defaults", {}),
            ("dK/dV on the main stream (BWD_STREAMS off)", {"BWD_STREAMS": False}),
            ("current defaults again", {}),
            ("BWD_STREAMS off again", {"BWD_STREAMS": False}),
            ("scoring kernel after the compression forward (SCORE_IN_CMP off)", {"SCORE_IN_CMP": False}),
            ("gate pass after the window forward (GATE_IN_WINDOW off)", {"GATE_IN_WINDOW": False}),
            ("gate, sums and casts as tensor ops (LEAN_HOST off)", {"LEAN_HOST": False}),
            ("dK/dV lists by sort + tensor ops (SELECT_LISTS_KERNEL off)", {"SELECT_LISTS_KERNEL": False}),
            ("previous code (all five off)", {nm: False for nm in names})]
    refs = {}
    for n in sizes:
        for label, sw in rows:
            for nm in names:
                setattr(ops, nm, sw.get(nm, keep[nm]))
            _timed_row(log, f"whole N={n} [{label}]", n, qt, refs)
    for nm in names:
        setattr(ops, nm, keep[nm])


DKV_VARIANTS = {  # label: (segment_attention.DKV_PAD, dK/dV launch settings and constexprs)
    "default": (False, {}),
    "pad": (True, {}),
    "pad, 64-row steps, 168 registers": (True, dict(STEP_R=64, maxnreg=168)),
    "pad, 32-row steps, 128 registers": (True, dict(STEP_R=32, maxnreg=128)),
}


def ab_dkv(log, n=131072, qt=64, rounds=2, whole_rounds=2):
    """The dK/dV kernel's row step and register cap with the padded lse/rowsum loads (segment_attention.DKV_PAD):
    each branch's backward alone under each variant, rounds alternated, then the whole SSA with each variant on
    every branch and with the fastest per branch, rows alternated. Same seeded inputs, one process."""
    import dataclasses

    from kernels.ssa import ops
    st, t = workload(n)
    x = {s_: t[s_].detach().requires_grad_(True) for s_ in t}
    q, k, v, kc, vc = (x[s_] for s_ in ("q", "k", "v", "k_cmp", "v_cmp"))
    g = q.shape[1] // k.shape[1]
    with torch.no_grad():
        lse = compression_attention(q, kc, vc, st)[1]
        sel = select_blocks(q, kc, lse, st, top_k=8, q_tile=qt)
    plans = {"cmp": (ops._cmp_plan(st, g), [q, kc, vc]), "slc": (ops._selection_plan(st, sel, qt, g), [q, k, v]),
             "win": (ops._win_plan(st, False, g), [q, k, v])}
    pad0 = seg.DKV_PAD
    times = {}
    for r in range(rounds):
        for br, (plan, inputs) in plans.items():
            ref = None
            for label, (pad, kw) in DKV_VARIANTS.items():
                seg.DKV_PAD = pad
                launch = dict(plan.launch)
                launch["dkv"] = {**launch.get("dkv", {}), **kw}
                p = dataclasses.replace(plan, launch=launch)
                try:
                    out = seg.segment_attention(*inputs, p)[0]
                    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
                    f, b = time_fwd_bwd(lambda a, b_, c: seg.segment_attention(a, b_, c, p)[0], inputs, ms=100)
                except Exception as e:  # a setting that does not compile is an answer too
                    log(f"dkv {br} [{label}] failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                if ref is None:
                    ref = grads
                diffs = " ".join(f"{nm}={rel(g_, rg_):.1e}" for nm, g_, rg_ in zip(("dq", "dk", "dv"), grads, ref))
                times.setdefault((br, label), []).append(b)
                log(f"dkv round {r} N={n} {br} [{label}] bwd {b:.3f} ms (fwd {f:.3f}); vs default {diffs}")
    best = {br: min(DKV_VARIANTS, key=lambda lb: sum(times.get((br, lb), [float("inf")]))) for br in plans}
    log(f"dkv fastest per branch (sum over rounds): {best}")
    launch0 = {br: dict(ops.LAUNCH[br]) for br in ops.LAUNCH}
    rows = [(lb, {br: lb for br in plans}) for lb in DKV_VARIANTS] + [("fastest per branch", best)]
    for r in range(whole_rounds):
        for label, pick in rows:
            pads = {DKV_VARIANTS[lb][0] for lb in pick.values()}
            if len(pads) > 1:  # DKV_PAD is one switch: mixed picks run with it on (it is the only change)
                pick = {br: (lb if DKV_VARIANTS[lb][0] else "pad") for br, lb in pick.items()}
            seg.DKV_PAD = DKV_VARIANTS[next(iter(pick.values()))][0]
            for br, lb in pick.items():
                ops.LAUNCH[br] = {**launch0[br], "dkv": {**launch0[br].get("dkv", {}), **DKV_VARIANTS[lb][1]}}
            for n_ in (n, 8192):
                st2, t2 = workload(n_)  # a fresh structure: plans built with these settings
                x2 = [t2[s_].detach().requires_grad_(True) for s_ in ("q", "k", "v", "k_cmp", "v_cmp", "gates")]
                f, b = time_fwd_bwd(lambda *a: spatial_sparse_attention(*a, st2, top_k=8, q_tile=qt), x2)
                log(f"dkv whole round {r} N={n_} [{label}: {pick}] {f:.3f} / {b:.3f} ms")
    for br in ops.LAUNCH:
        ops.LAUNCH[br] = launch0[br]
    seg.DKV_PAD = pad0


def _timed_row(log, tag, n, qt, refs):
    """One whole-SSA row of an A/B: a fresh structure (plans built under the current settings), output and
    gradients against the first row of that size (``refs``), forward / backward ms; a row that fails is logged."""
    st, t = workload(n)
    x = [t[s_].detach().requires_grad_(True) for s_ in ("q", "k", "v", "k_cmp", "v_cmp", "gates")]
    try:
        out = spatial_sparse_attention(*x, st, top_k=8, q_tile=qt)
        go = torch.randn(out.shape, device=out.device,
                         generator=torch.Generator(out.device).manual_seed(1)).to(out.dtype)
        grads = torch.autograd.grad(out, x, go)
    except Exception as e:  # a variant that does not compile is an answer too
        log(f"{tag} failed: {type(e).__name__}: {str(e)[:300]}")
        return
    ref_out, ref = refs.setdefault(n, (out.detach(), grads))
    diffs = " ".join(f"{nm}={rel(g_, rg_):.1e}" for nm, g_, rg_ in
                     zip(("dq", "dk", "dv", "dkc", "dvc", "dg"), grads, ref))
    nan = any(bool(torch.isnan(g_).any()) for g_ in (out, *grads))
    f, b = time_fwd_bwd(lambda *a: spatial_sparse_attention(*a, st, top_k=8, q_tile=qt), x)
    log(f"{tag} {f:.3f} / {b:.3f} ms; vs first row: out {rel(out, ref_out):.1e} {diffs}{' NaN!' if nan else ''}")


def _ab_dict(log, tag, settings: dict, rows, sizes, qt, rounds):
    """Whole-SSA rows with ``settings`` (a dict of ops) updated to each row's values, rows alternated over
    ``rounds``, one process; gradients against the first row; the settings restored after."""
    keep = dict(settings)
    refs = {}
    for r in range(rounds):
        for label, cfg in rows:
            settings.update(cfg)
            for n in sizes:
                _timed_row(log, f"{tag} round {r} N={n} [{label}]", n, qt, refs)
    settings.update(keep)


def ab_cmp_chunk(log, sizes=(131072, 8192), qt=64, rounds=3):
    """The whole SSA with the compression dK/dV in 128-key programs of 8 warps (two warp groups sharing each
    row step's q, dO loads) against the default 64-key programs of 4 warps, rows alternated, one process."""
    from kernels.ssa import ops
    rows = [("defaults (64 keys, 4 warps)", dict(ops.CMP_DKV)), ("compression dK/dV 128 keys, 8 warps",
                                                                 dict(chunk_n=128, dkv_warps=8))]
    _ab_dict(log, "cmp-chunk", ops.CMP_DKV, rows, sizes, qt, rounds)


def ab_pieces(log, n=131072, qt=64, rounds=2):
    """The whole SSA under other dK/dV work sizes (selection work items of SELECT_DKV_STEPS row steps, query
    tokens per compression / window list entry), rows alternated, one process."""
    from kernels.ssa import ops
    steps0, pieces0 = ops.SELECT_DKV_STEPS, dict(ops.SHARED_DKV_PIECE)
    refs = {}
    rows = [("defaults", {}, {}), ("selection items of 32 steps", {"steps": 32}, {}),
            ("selection items of 128 steps", {"steps": 128}, {}), ("compression pieces of 1024", {}, {"shape": 1024}),
            ("compression pieces of 4096", {}, {"shape": 4096}), ("window pieces of 256", {}, {"window": 256}),
            ("window pieces of 1024", {}, {"window": 1024})]
    for r in range(rounds):
        for label, sel, pieces in rows:
            ops.SELECT_DKV_STEPS = sel.get("steps", steps0)
            ops.SHARED_DKV_PIECE.update({**pieces0, **pieces})
            _timed_row(log, f"pieces round {r} N={n} [{label}]", n, qt, refs)
    ops.SELECT_DKV_STEPS = steps0
    ops.SHARED_DKV_PIECE.update(pieces0)


def ab_seg_switch(log, name, sizes=(131072, 8192), qt=64, rounds=3):
    """The whole SSA with one of segment_attention's switches off and on (named), rows alternated, one process;
    gradients against the first row."""
    keep = getattr(seg, name)
    refs = {}
    for r in range(rounds):
        for on in (False, True):
            setattr(seg, name, on)
            for n in sizes:
                _timed_row(log, f"switch round {r} N={n} [{name}={on}]", n, qt, refs)
    setattr(seg, name, keep)


def ab_dkv_in_dq(log, sizes=(131072, 8192), qt=64, rounds=3):
    """The whole SSA with the selection's and / or the window's dK/dV added by their dQ kernels (float32 atomics per
    (query tile, key chunk), ops.DKV_IN_DQ: 1 keys as M, 2 queries as M) against the defaults, rows alternated,
    one process; gradients against the first row."""
    from kernels.ssa import ops
    rows = [("defaults", dict(ops.DKV_IN_DQ)), ("dK/dV kernels for both (before)", {"slc": 0, "win": 0}),
            ("selection only, queries as M", {"slc": 2, "win": 0})]  # keys as M (1): slower, RESULTS.md
    _ab_dict(log, "dkv-in-dq", ops.DKV_IN_DQ, rows, sizes, qt, rounds)


def ab_dq_warps(log, sizes=(131072, 8192), qt=64, rounds=3):
    """The whole SSA with the dQ kernels in 8 warps capped at 128 registers (two warp groups of 64 rows, 2
    programs = 16 warps per SM; 4 warps run at 210-250 registers, 8 warps per SM) against the defaults, rows
    alternated, one process; gradients against the first row."""
    from kernels.ssa import ops
    launch0 = {br: dict(ops.LAUNCH[br]) for br in ops.LAUNCH}
    wide = {"num_warps": 8, "maxnreg": 128}
    rows = [("defaults", ()), ("dQ 8 warps at 128 registers, all branches", ("cmp", "slc", "win")),
            ("dQ 8 warps at 128 registers, compression and selection", ("cmp", "slc"))]
    refs = {}
    for r in range(rounds):
        for label, brs in rows:
            for br in ops.LAUNCH:
                ops.LAUNCH[br] = {**launch0[br], **({"dq": {**launch0[br].get("dq", {}), **wide}} if br in brs else {})}
            for n in sizes:
                _timed_row(log, f"dq-warps round {r} N={n} [{label}]", n, qt, refs)
    for br in ops.LAUNCH:
        ops.LAUNCH[br] = launch0[br]


def host_cost(log, sizes=(8192,), qt=64, reps=30):
    """The whole SSA's backward with the host-side switches on and off: device launches per backward (kernels,
    memsets, copies; torch.profiler), host time to enqueue it (wall clock, no sync), device time (CUDA events)
    and the do_bench figure, same inputs, one process."""
    from kernels.ssa import ops
    keep = (ops.LEAN_HOST, ops.SELECT_LISTS_KERNEL)
    rows = [("current defaults", {}), ("lists by sort + tensor ops", {"lists": False}),
            ("gate, sums and casts as tensor ops", {"lean": False}),
            ("both (the previous backward)", {"lists": False, "lean": False}),
            ("current defaults again", {})]
    for n in sizes:
        st, t = workload(n)
        x = [t[s_].detach().requires_grad_(True) for s_ in ("q", "k", "v", "k_cmp", "v_cmp", "gates")]
        ref = None
        for label, sw in rows:
            ops.LEAN_HOST, ops.SELECT_LISTS_KERNEL = sw.get("lean", keep[0]), sw.get("lists", keep[1])
            out = spatial_sparse_attention(*x, st, top_k=8, q_tile=qt)
            go = torch.randn(out.shape, device="cuda", generator=torch.Generator("cuda").manual_seed(1)).to(out.dtype)
            grads = torch.autograd.grad(out, x, go, retain_graph=True)
            if ref is None:
                ref = grads
            for _ in range(5):
                torch.autograd.grad(out, x, go, retain_graph=True)
            torch.cuda.synchronize()
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                torch.autograd.grad(out, x, go, retain_graph=True)
                torch.cuda.synchronize()
            kinds = {}
            for e in prof.events():
                if e.device_type == torch.autograd.DeviceType.CUDA:
                    kinds[e.name] = kinds.get(e.name, 0) + 1
            launches = sum(kinds.values())
            host, dev = [], []
            for _ in range(reps):
                torch.cuda.synchronize()
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                t0 = time.perf_counter()
                a.record()
                torch.autograd.grad(out, x, go, retain_graph=True)
                b.record()
                host.append((time.perf_counter() - t0) * 1e3)
                torch.cuda.synchronize()
                dev.append(a.elapsed_time(b))
            host.sort()
            dev.sort()
            ms = bench(lambda: torch.autograd.grad(out, x, go, retain_graph=True))
            diffs = " ".join(f"{nm}={rel(g_, rg_):.1e}" for nm, g_, rg_ in
                             zip(("dq", "dk", "dv", "dkc", "dvc", "dg"), grads, ref))
            log(f"host N={n} [{label}] backward: {launches} device launches, host enqueue {host[reps // 2]:.3f} ms "
                f"(median of {reps}), events {dev[reps // 2]:.3f} ms, do_bench {ms:.3f} ms; vs first row: {diffs}")
    ops.LEAN_HOST, ops.SELECT_LISTS_KERNEL = keep


def tune(log, n=131072, qt=64, apply=True):
    """Launch settings (warps, pipeline stages, register cap, key-chunk widths) of every kernel of every branch
    at one size, one process, same inputs: each kernel's settings varied with the others at their defaults.
    With ``apply`` the fastest setting of each (branch, kernel) goes into ``ops.LAUNCH`` for the rest of the run."""
    import dataclasses

    from kernels.ssa import ops, scoring
    st, t = workload(n)
    x = {s_: t[s_].detach().requires_grad_(True) for s_ in t}
    q, k, v, kc, vc = (x[s_] for s_ in ("q", "k", "v", "k_cmp", "v_cmp"))
    lse = compression_attention(q.detach(), kc.detach(), vc.detach(), st)[1]
    sel = select_blocks(q.detach(), kc.detach(), lse, st, top_k=8, q_tile=qt)
    window_attention(q.detach(), k.detach(), v.detach(), st)
    f0, b0 = time_fwd_bwd(lambda *a: spatial_sparse_attention(*a, st, top_k=8, q_tile=qt), list(x.values()))
    log(f"tune N={n} whole SSA, default settings: {f0:.3f} / {b0:.3f} ms")
    bt = 128 // (q.shape[1] // k.shape[1])
    plans = {"cmp": (st.cached(("plan_cmp", bt), None), [q, kc, vc]),
             "slc": (ops._selection_plan(st, sel, qt, q.shape[1] // k.shape[1]), [q, k, v]),
             "win": (st.cached(("plan_win", "window0", bt), None), [q, k, v])}
    # (label, kernel, launch/constexpr overrides over the plan's own, plan field overrides)
    variants = [("default", None, {}, {})]
    for label, kw in (("nw=4 ns=3", dict(num_warps=4, num_stages=3, maxnreg=None)),
                      ("nw=8 ns=3 mr=80", dict(num_warps=8, num_stages=3, maxnreg=80)),
                      ("nw=8 ns=2 mr=80", dict(num_warps=8, num_stages=2, maxnreg=80)),
                      ("nw=4 ns=3 mr=128", dict(num_warps=4, num_stages=3, maxnreg=128))):
        variants.append((f"fwd {label}", "fwd", kw, {}))
    for label, kw in (("nw=4 ns=3", dict(num_warps=4, num_stages=3)), ("nw=8 ns=3", dict(num_warps=8, num_stages=3)),
                      ("nw=4 ns=3 mr=168", dict(num_warps=4, num_stages=3, maxnreg=168))):
        variants.append((f"dq {label}", "dq", kw, {}))
    for label, kw in (("queries as M (previous)", dict(KEYS_M=False)),
                      ("keys as M, ns=2", dict(num_stages=2)),
                      ("keys as M, ns=4", dict(num_stages=4)),
                      ("keys as M, 64-row steps", dict(STEP_R=64)),
                      ("keys as M, 64-row steps, mr=128", dict(STEP_R=64, maxnreg=128)),
                      ("keys as M, 32-row steps", dict(STEP_R=32)),
                      ("keys as M, mr=168", dict(maxnreg=168))):
        variants.append((f"dkv {label}", "dkv", kw, {}))
    best = {}
    for br, (plan, inputs) in plans.items():
        ref_out = None
        for label, kern, kw, fields in variants:
            launch = dict(plan.launch)
            if kern:
                launch[kern] = {**launch.get(kern, {}), **kw}
                launch[kern] = {k_: v_ for k_, v_ in launch[kern].items() if v_ is not None}
            p = dataclasses.replace(plan, launch=launch, **fields)
            try:
                out = seg.segment_attention(*inputs, p)[0]
                f, b = time_fwd_bwd(lambda a, b_, c: seg.segment_attention(a, b_, c, p)[0], inputs, ms=100)
            except Exception as e:  # a setting can exceed shared memory or registers; that is an answer too
                log(f"tune {br} [{label}] failed: {type(e).__name__}: {str(e)[:120]}")
                continue
            if ref_out is None:
                ref_out = out
            diff = rel(out, ref_out)
            log(f"tune N={n} {br:3s} [{label:30s}] fwd {f:.3f} bwd {b:.3f} ms  out vs default {diff:.1e}")
            for kk in ("fwd", "dq", "dkv"):  # forward settings judged by the forward, dq/dkv ones by the backward
                if kern in (None, kk) and not fields:
                    ms = f if kk == "fwd" else b
                    if ms < best.get((br, kk), (float("inf"),))[0]:
                        best[(br, kk)] = (ms, label, kw)
    gen = dict(q=t["q"], kc=t["k_cmp"])
    for km, nw, bn in ((True, 4, 64), (True, 8, 64), (True, 4, 128), (True, 8, 128), (False, 4, 64)):
        scoring.SCORE_KEYS_M, scoring.SCORE_WARPS, ops.SELECT_BLOCK_N = km, nw, bn
        ms = bench(lambda: select_blocks(gen["q"], gen["kc"], lse, st, top_k=8, q_tile=qt), 100)
        same = (select_blocks(gen["q"], gen["kc"], lse, st, top_k=8, q_tile=qt).sort(-1).values
                == sel.sort(-1).values).all(-1).float().mean().item()
        log(f"tune N={n} scoring keys-as-M={km} warps={nw} block_n={bn}: {ms:.3f} ms, same blocks {same:.4f}")
    scoring.SCORE_KEYS_M = True
    scoring.SCORE_WARPS, ops.SELECT_BLOCK_N = 0, 0
    for (br, kern), (ms, label, kw) in sorted(best.items()):
        log(f"tune best {br} {kern}: [{label}] {ms:.3f} ms")
        if apply and label != "default":
            merged = {**ops.LAUNCH[br].get(kern, {}), **kw}
            ops.LAUNCH[br][kern] = {k_: v_ for k_, v_ in merged.items() if v_ is not None}
    if apply:
        log(f"tune applied: LAUNCH = {ops.LAUNCH}")
        st2, t2 = workload(n)  # a fresh structure: its plans are built with the chosen settings
        x2 = [t2[s_].detach().requires_grad_(True) for s_ in ("q", "k", "v", "k_cmp", "v_cmp", "gates")]
        f, b = time_fwd_bwd(lambda *a: spatial_sparse_attention(*a, st2, top_k=8, q_tile=qt), x2)
        log(f"tune N={n} whole SSA with the chosen settings: {f:.3f} / {b:.3f} ms (defaults: {f0:.3f} / {b0:.3f})")


# ------------------------------------------------------------------------------------------------ main
def device_ceilings():
    x = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    t = bench(lambda: y.copy_(x))
    bw = 2 * x.numel() / t / 1e9  # TB/s
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    t = bench(lambda: a @ a)
    return bw, 2 * 8192 ** 3 / t / 1e9  # TFLOP/s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="run the correctness sweep first (exit 1 on failure)")
    ap.add_argument("--sizes", default="16384,32768,65536,131072")
    ap.add_argument("--q-tile", default="64", help="comma list of selection query tiles to time")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--sweep", action="store_true", help="time launch settings of the selection kernels first")
    ap.add_argument("--sweep-tiles", action="store_true", help="time launch settings of tile-level selection first")
    ap.add_argument("--sweep-bwd", action="store_true",
                    help="time launch settings of the tile-level kernels and profile the whole SSA first")
    ap.add_argument("--paths", action="store_true", help="fused against two-pass paths at 131,072 tokens first")
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--flex-sizes", default="", help="comma list: the FlexAttention baseline only at these sizes")
    ap.add_argument("--variants", action="store_true",
                    help="plain/lean softmax, score-sum and delta variants at 131,072 first")
    ap.add_argument("--profile", default="", help="comma list of sizes to profile kernel by kernel first")
    ap.add_argument("--ab", action="store_true", help="the whole SSA under each structural switch at 8k and 131k first")
    ap.add_argument("--ab-dkv", action="store_true",
                    help="dK/dV row step, register cap and padded loads per branch and as a whole SSA first")
    ap.add_argument("--ab-cmp-chunk", action="store_true",
                    help="the whole SSA with 128-key compression dK/dV programs against the default, alternated, first")
    ap.add_argument("--ab-pieces", action="store_true",
                    help="the whole SSA under other dK/dV work-item and list-piece sizes, alternated, first")
    ap.add_argument("--ab-switch", default="",
                    help="a segment_attention switch (e.g. DKV_PAD): the whole SSA with it off and on, first")
    ap.add_argument("--ab-dkv-in-dq", action="store_true",
                    help="the selection / window dK/dV from their dQ kernels (atomics) against the defaults first")
    ap.add_argument("--ab-dq-warps", action="store_true",
                    help="the whole SSA with 8-warp dQ kernels at 128 registers against the defaults first")
    ap.add_argument("--tune", action="store_true",
                    help="time launch settings of every kernel at 131,072 first and use the fastest for the rest")
    ap.add_argument("--host", default="", help="comma list of sizes: backward launches and host time first")
    ap.add_argument("--no-compare", action="store_true", help="skip the tile vs per-query selection comparison")
    ap.add_argument("--paper", action="store_true",
                    help="the paper's configuration (m_cmp 4, gates (N, 3)) at 131,072 tokens, q_tile 1 and 64, first")
    ap.add_argument("--paper-ab", action="store_true",
                    help="per-query scoring and selection settings of the paper's configuration, alternated, first")
    ap.add_argument("--base", default="",
                    help="a git revision (or a folder holding its kernels/ssa/): the whole SSA against it, first")
    ap.add_argument("--paper-brief", action="store_true", help="--paper without the branch rows and tile comparison")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    logf = open(os.path.join(args.out, "ssa_bench.log"), "a")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu (Triton interpreter)"
    log(f"{time.strftime('%Y-%m-%d %H:%M')} {card} torch {torch.__version__}")
    if args.check and not check(log):
        sys.exit(1)
    if args.base:
        ab_base(log, args.base)
    if args.paper_ab:
        paper_ab(log)
    if args.paper:
        paper(log, sdpa=not args.no_sdpa, detail=not args.paper_brief)
    if args.sweep:
        sweep(log)
    if args.sweep_tiles:
        sweep_tiles(log)
    if args.paths:
        compare_paths(log)
    if args.sweep_bwd:
        sweep_bwd(log)
    if args.variants:
        ab_variants(log)
    if args.ab:
        ab_whole(log)
    if args.ab_dkv:
        ab_dkv(log)
    if args.ab_cmp_chunk:
        ab_cmp_chunk(log)
    if args.ab_pieces:
        ab_pieces(log)
    if args.ab_dkv_in_dq:
        ab_dkv_in_dq(log)
    if args.ab_switch:
        ab_seg_switch(log, args.ab_switch)
    if args.ab_dq_warps:
        ab_dq_warps(log)
    if args.tune:
        tune(log)
    if args.host:
        host_cost(log, [int(s_) for s_ in args.host.split(",")])
    for n in [int(s_) for s_ in args.profile.split(",") if s_]:
        profile(log, n, cpu=n <= 16384)
    if not args.sizes:
        return
    bw, mm = device_ceilings()
    log(f"measured ceilings: copy {bw:.2f} TB/s, bf16 matmul {mm:.0f} TFLOP/s")
    rows = []
    hq, hkv, d = 32, 2, 32
    for n in [int(s) for s in args.sizes.split(",")]:
        st, t = workload(n)
        log(f"N={n}: {st.n_cmp} compression blocks, {st.n_slc} selection blocks, "
            f"{n / st.n_slc:.1f} tokens per block")
        for qt in [int(s) for s in args.q_tile.split(",")]:
            res, sel = ours(st, t, qt, log)
            pairs = pair_counts(st, sel, qt, hq, hkv)
            pairs["ssa"] = sum(pairs.values())
            pairs["win_shifted"] = pairs["win"]
            for br, (f, b) in res.items():
                p = pairs.get(br, 0)
                rows.append(dict(n=n, impl=f"ssa q_tile={qt}", branch=br, fwd_ms=f, bwd_ms=b,
                                 fwd_tflops=4 * d * p / f / 1e9 if p else 0.0,
                                 bwd_tflops=10 * d * p / b / 1e9 if (p and b) else 0.0))
            if qt != 1 and not args.no_compare:
                tile_vs_query(st, t, qt, "random q, k", log)
                tile_vs_query(st, smooth_inputs(st), qt, "smooth field", log)
        if not args.no_sdpa:
            for be in ("cudnn", "flash"):
                try:
                    f, b = sdpa_full(t, be)
                    p = n * n * hq
                    rows.append(dict(n=n, impl=f"sdpa-{be}", branch="full", fwd_ms=f, bwd_ms=b,
                                     fwd_tflops=4 * d * p / f / 1e9, bwd_tflops=10 * d * p / b / 1e9))
                except Exception as e:
                    log(f"sdpa {be} failed at N={n}: {type(e).__name__}: {str(e)[:200]}")
        if not args.no_flex and (not args.flex_sizes or str(n) in args.flex_sizes.split(",")):
            try:
                fres = flex_ssa(st, t, log)
                pf = pair_counts(st, sel, qt, hq, hkv)
                for br, (f, b) in fres.items():
                    p = {"cmp": pf["cmp"], "slc": n * hq * 8 * 128, "win": pf["win"]}[br]
                    rows.append(dict(n=n, impl="flex", branch=br, fwd_ms=f, bwd_ms=b,
                                     fwd_tflops=4 * d * p / f / 1e9 if p else 0.0,
                                     bwd_tflops=10 * d * p / b / 1e9 if p else 0.0))
            except Exception as e:  # the baseline failing must not hide our numbers
                log(f"flex baseline failed at N={n}: {type(e).__name__}: {str(e)[:300]}")
        for r in rows:
            if r["n"] == n:
                log(json.dumps(r))
        torch.cuda.empty_cache()
    log("")
    log(f"{'N':>7} {'impl':>14} {'branch':>12} {'fwd ms':>9} {'bwd ms':>9} {'fwd TF/s':>9} {'bwd TF/s':>9}")
    for r in rows:
        log(f"{r['n']:>7} {r['impl']:>14} {r['branch']:>12} {r['fwd_ms']:>9.3f} {r['bwd_ms']:>9.3f} "
            f"{r['fwd_tflops']:>9.1f} {r['bwd_tflops']:>9.1f}")


if __name__ == "__main__":
    main()
