"""Spatial Sparse Attention on one GPU: correctness sweep, per-branch timings, and two baselines.

    python benchmarks/ssa.py --check                       # bf16/fp16 sweep against the float64 reference
    python benchmarks/ssa.py --sizes 16384,131072          # timings (ms, effective TFLOP/s) and baselines
    python benchmarks/ssa.py --base REV --sizes ""         # the working tree against git revision REV, same run
    TRITON_INTERPRET=1 python benchmarks/ssa.py --base REV --tokens 200 --sizes ""   # its CPU smoke run
    python benchmarks/ssa.py --sass REV --sizes ""         # same sm_90 SASS as REV, launch by launch (CPU)
    python benchmarks/ssa.py --select-candidate --sizes "" # per-query select: today's against select_pooled

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
def shell(n, grid=128, device=None):
    """n voxels of a thick sphere shell (the n closest to radius 0.4·grid) on a grid³ lattice."""
    device = device or _device()
    ax = torch.arange(grid, device=device, dtype=torch.float32)
    c = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    dist = ((c - (grid - 1) / 2).norm(dim=1) - 0.4 * grid).abs()
    return c[torch.argsort(dist)[:n]].int()


def _device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def workload(n, hq=32, hkv=2, d=32, m=8, dtype=torch.bfloat16, shared_gate=False):
    """shared_gate: gates (N, 3), one per token and branch for every head, as the released layer makes them.
    Without CUDA (the Triton interpreter): float32 on a 16³ grid, for smoke runs at a few hundred tokens."""
    dev = _device()
    if dev == "cpu":
        dtype = torch.float32
    coords = shell(n, grid=128 if dev == "cuda" else 16)
    cu = torch.tensor([0, n], device=dev)
    coords = coords[block_order(coords, cu, m, 8)]
    st = SSAStructure(coords, cu, m, 8)
    torch.manual_seed(n)  # the same tensors for every run and code version at this size
    mk = lambda *s: torch.randn(*s, device=dev, dtype=dtype)  # noqa: E731
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
    if not torch.cuda.is_available():
        rounds = 1
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


def select_candidate(log, n=131072, rounds=3):
    """Per-query block selection in the paper's configuration: today's select_blocks (score matrix + rank_blocks)
    against the fused candidate scoring.select_pooled at its default launch and two other (tokens per program,
    key chunk) pairs, same inputs (random, and the smooth field on CUDA), rows alternated: ms per round, the
    median's ratio to today, and the share of (token, kv head) rows whose selected sets equal today's."""
    import dataclasses

    from kernels.ssa import scoring
    from kernels.ssa.scoring import SCORING, select_pooled
    st, t = workload(n, m=4, shared_gate=True)
    cuda = torch.cuda.is_available()
    if not cuda:
        rounds = 1
    g = t["q"].shape[1] // t["k"].shape[1]
    default = (SCORING.pooled_rows // g, SCORING.pooled_block_n)
    variants = [default] + [v for v in ((8, 64), (4, 64)) if v != default]
    log(f"select candidate N={n}: {st.n_cmp} compression blocks, {st.n_slc} selection blocks; pooled P=tokens "
        f"per program, N=key chunk (default P={default[0]} N={default[1]})")
    for label, inputs in [("random", t)] + ([("smooth field", smooth_inputs(st))] if cuda else []):
        q, kc = inputs["q"], inputs["k_cmp"]
        lse = compression_attention(q, kc, inputs["v_cmp"], st)[1]
        fns = {"today": lambda: select_blocks(q, kc, lse, st, top_k=8, q_tile=1)}
        for p, bn in variants:
            fns[f"pooled P={p} N={bn}"] = lambda p=p, bn=bn: select_pooled(q, kc, lse, st, 8, p, bn)
        times = {k: [] for k in fns}
        for _ in range(rounds):
            for name, fn in fns.items():
                if cuda:
                    times[name].append(bench(fn))
                else:  # the Triton interpreter: one call (a smoke run)
                    t0 = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - t0) * 1e3)
        ref_sel = fns["today"]().sort(-1).values
        log(f"{label:>22} " + " ".join(f"{'round ' + str(r):>9}" for r in range(rounds))
            + f" {'median':>9} {'/ today':>8} {'same sets':>10}")
        med_today = sorted(times["today"])[rounds // 2]
        for name, fn in fns.items():
            med = sorted(times[name])[rounds // 2]
            same = (fn().sort(-1).values == ref_sel).all(-1).float().mean().item()
            log(f"{name:>22} " + " ".join(f"{x:>9.3f}" for x in times[name])
                + f" {med:>9.3f} {med / med_today:>8.3f} {same:>10.4f}")
    # the whole per-query SSA (forward, and forward + backward) with each selection path, rows alternated
    x = [t[k].detach().requires_grad_(True) for k in ("q", "k", "v", "k_cmp", "v_cmp", "gates")]
    fn = lambda *a: spatial_sparse_attention(*a, st, top_k=8, q_tile=1)  # noqa: E731
    whole, outs = {False: [], True: []}, {}
    try:
        for _ in range(rounds):
            for pooled in (False, True):
                scoring.SCORING = dataclasses.replace(SCORING, pooled_select=pooled)
                whole[pooled].append(time_fwd_bwd(fn, x))
                with torch.no_grad():
                    outs[pooled] = fn(*x).float()
    finally:
        scoring.SCORING = SCORING
    diff = ((outs[True] - outs[False]).norm() / outs[False].norm()).item()
    med = {p: [sorted(r[i] for r in whole[p])[rounds // 2] for i in (0, 1)] for p in whole}
    for p, label in ((False, "score matrix (today)"), (True, "select_pooled")):
        log(f"whole SSA q_tile=1, {label:>21}: forward {med[p][0]:.3f} ms, backward {med[p][1]:.3f} ms "
            f"(rounds: {', '.join(f'{a:.2f}/{b:.2f}' for a, b in whole[p])})")
    log(f"whole SSA forward select_pooled / today {med[True][0] / med[False][0]:.3f}; outputs' relative "
        f"difference {diff:.2e}")


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
    if not torch.cuda.is_available():  # the Triton interpreter: one forward and one backward (a smoke run)
        t0 = time.perf_counter()
        out = fn(*inputs)
        t1 = time.perf_counter()
        torch.autograd.grad(out, inputs, torch.randn_like(out))
        return (t1 - t0) * 1e3, (time.perf_counter() - t1) * 1e3
    f = bench(lambda: fn(*inputs), ms)
    out = fn(*inputs)
    go = torch.randn_like(out)
    b = bench(lambda: torch.autograd.grad(out, inputs, go, retain_graph=True), ms)
    return f, b


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


# ------------------------------------------------------------------------------------------- sass
SASS_CASES = [(32, 2, 32, 8, 1, False), (32, 2, 32, 4, 1, True), (32, 2, 32, 4, 64, False), (32, 2, 32, 8, 64, True),
              (32, 2, 32, 8, 16, True), (32, 2, 64, 4, 1, True), (8, 2, 32, 8, 4, False), (4, 2, 16, 4, 1, True)]


def _record_launches(mod, cases):
    """Every Triton launch (kernel, signature, constexprs, attributes, options) of the whole SSA's forward and
    backward and of the public branch functions, bf16 on the CPU, bound as for an sm_90 launch but not run."""
    from ssa_cases import random_shapes
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime import jit
    backend = make_backend(GPUTarget("cuda", 90, 32))
    launches = []

    def record(self, *args, grid, warmup, **kwargs):
        bound, spec, opts = jit.create_function_from_signature(self.signature, self.params, backend)(*args, **kwargs)
        launches.append((self, *self._pack_args(backend, kwargs, bound, spec, opts)))

    run, check = jit.JITFunction.run, mod.ops._check
    jit.JITFunction.run, mod.ops._check = record, (lambda *a, **k: None)
    try:
        for hq, hkv, d, m, qt, shifted in cases:
            coords, cu = random_shapes([300, 1, 3, 90, 9], 14, seed=0)
            st = mod.SSAStructure(coords[block_order(coords, cu, m, 8)], cu, m, 8)
            mk = lambda *s_: torch.randn(*s_, dtype=torch.bfloat16).requires_grad_(True)  # noqa: E731
            q, k, v = mk(st.n_tokens, hq, d), mk(st.n_tokens, hkv, d), mk(st.n_tokens, hkv, d)
            kc, vc = mk(st.n_cmp, hkv, d), mk(st.n_cmp, hkv, d)
            gates = torch.rand(st.n_tokens, 3, dtype=torch.bfloat16).requires_grad_(True)
            for out, ins in ((mod.spatial_sparse_attention(q, k, v, kc, vc, gates, st, top_k=8, q_tile=qt,
                                                           shifted=shifted), (q, k, v, kc, vc, gates)),
                             (mod.compression_attention(q, kc, vc, st)[0], (q, kc, vc)),
                             (mod.selection_attention(q, k, v, st, torch.randint(-1, st.n_slc, (
                                 st.n_tiles("shape", qt), hkv, 8)), q_tile=qt), (q, k, v)),
                             (mod.window_attention(q, k, v, st, shifted=shifted), (q, k, v))):
                torch.autograd.grad(out, ins, torch.randn_like(out))
            mod.select_blocks(q.detach(), kc.detach(), torch.zeros(q.shape[:2]), st, top_k=8, q_tile=qt)
    finally:
        jit.JITFunction.run, mod.ops._check = run, check
    return launches


def _sass(launch, cache):
    """SASS of one recorded launch compiled for sm_90, parameter slots masked (runtime parameters move them)."""
    import re
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    fn, options, signature, constexprs, attrs = launch
    key = (id(fn), repr(signature), repr(sorted((repr(k), repr(v)) for k, v in constexprs.items())), repr(options))
    if key not in cache:
        c = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", 90, 32),
                           options=options.__dict__)
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(c.asm["cubin"])
            f.flush()
            nvdisasm = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm")
            text = subprocess.run([nvdisasm, "-c", f.name], capture_output=True, text=True, check=True).stdout
        lines = [re.sub(r"c\[0x0\]\[0x[0-9a-f]+\]", "c[P]", re.sub(r"/\*.*?\*/", "", ln)).strip(" ;")
                 for ln in text.splitlines()]
        cache[key] = [ln for ln in lines if ln and not ln.startswith((".", "//")) and not ln.endswith(":")]
    return cache[key]


def sass_base(log, base: str, cases=SASS_CASES):
    """Whether the working tree's kernels compile to the same sm_90 SASS as ``base``'s (load_base), launch by
    launch, on the CPU: the check for a change that must leave the generated code as it is. Run without
    TRITON_INTERPRET (the kernels are compiled, never run)."""
    import kernels.ssa as tree
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("--sass compiles the kernels: run it without TRITON_INTERPRET=1")
    rec = {name: _record_launches(m, cases) for name, m in (("base", load_base(base)), ("tree", tree))}
    if [r[0].__name__ for r in rec["base"]] != [r[0].__name__ for r in rec["tree"]]:
        log(f"sass: the launch sequences differ ({len(rec['base'])} base, {len(rec['tree'])} tree launches)")
        return False
    cache, same = {}, 0
    for b, t in zip(rec["base"], rec["tree"]):
        if _sass(b, cache) == _sass(t, cache):
            same += 1
        else:
            log(f"sass: {t[0].__name__} differs (constexprs {t[3]})")
    log(f"sass: {same} of {len(rec['tree'])} launches compile to the same SASS as {base} "
        f"({len(cache)} compiles)")
    return same == len(rec["tree"])


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
    ap.add_argument("--no-sdpa", action="store_true")
    ap.add_argument("--flex-sizes", default="", help="comma list: the FlexAttention baseline only at these sizes")
    ap.add_argument("--profile", default="", help="comma list of sizes to profile kernel by kernel first")
    ap.add_argument("--no-compare", action="store_true", help="skip the tile vs per-query selection comparison")
    ap.add_argument("--paper", action="store_true",
                    help="the paper's configuration (m_cmp 4, gates (N, 3)) at 131,072 tokens, q_tile 1 and 64, first")
    ap.add_argument("--base", default="",
                    help="a git revision (or a folder holding its kernels/ssa/): the whole SSA against it, first")
    ap.add_argument("--tokens", type=int, default=131072, help="tokens of --base and --select-candidate")
    ap.add_argument("--sass", default="", help="a git revision: whether the kernels compile (sm_90, on the CPU) to "
                                                "the same SASS as its, launch by launch (exit 1 if not)")
    ap.add_argument("--select-candidate", action="store_true",
                    help="per-query select at --tokens (paper configuration): today's against scoring.select_pooled")
    ap.add_argument("--paper-brief", action="store_true", help="--paper without the branch rows and tile comparison")
    ap.add_argument("--out", default=os.environ.get("OUT", "."))
    args = ap.parse_args()
    logf = open(os.path.join(args.out, "ssa_bench.log"), "a")

    def log(s):
        print(s, flush=True)
        logf.write(s + "\n")
        logf.flush()

    card = torch.cuda.get_device_name() if torch.cuda.is_available() else (
        "cpu (Triton interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "cpu")
    log(f"{time.strftime('%Y-%m-%d %H:%M')} {card} torch {torch.__version__}")
    if args.check and not check(log):
        sys.exit(1)
    if args.sass and not sass_base(log, args.sass):
        sys.exit(1)
    if args.base:
        ab_base(log, args.base, n=args.tokens)
    if args.select_candidate:
        select_candidate(log, n=args.tokens)
    if args.paper:
        paper(log, sdpa=not args.no_sdpa, detail=not args.paper_brief)
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
