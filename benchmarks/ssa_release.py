"""Our SSA against the released Direct3D-S2 ops on the same inputs (not part of CI; needs the release).

    TRITON_INTERPRET=1 python benchmarks/ssa_release.py                # CPU, Triton interpreter
    python benchmarks/ssa_release.py                                   # on a GPU

The released attention ops (get_block_score, spatial_selection_attention, sparse_window_attention) are
imported through the parity harness (benchmarks/parity: stand-ins for flash_attn and torchsparse; on CUDA
the release's own SSA Triton kernels, elsewhere the harness's PyTorch references of them) and called on
our inputs, rounded to bfloat16 (the release's kernels take bf16/fp16 only); ours run on the same values.

Printed per case: the share of (query, kv head) selections that equal the release's, the relative
difference of each branch and of the gated sum against the release (our float64 reference given the
release's own block choice, and our Triton path with its own choice), and of the selection branch's
gradients against the release's Triton backward.
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys

import torch

_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path[:0] = [_ROOT, os.path.join(_ROOT, "tests")]

from kernels.ssa import SSAStructure, block_order, select_blocks, spatial_sparse_attention  # noqa: E402
from kernels.ssa import reference as ref  # noqa: E402
from ssa_cases import shell_shapes  # noqa: E402

# ---------------------------------------------------------------------------------------- release
class SparseTensorStandIn:
    """The few members of the release's SparseTensor that its attention ops read."""

    def __init__(self, feats, coords):
        self.feats, self.coords = feats, coords

    @property
    def device(self):
        return self.feats.device

    def replace(self, feats):
        return SparseTensorStandIn(feats, self.coords)

    def get_spatial_cache(self, name):
        return None

    def register_spatial_cache(self, name, value):
        pass


def load_release(device, official=None):
    """(get_block_score, spatial_selection_attention, sparse_window_attention, flash_attn stand-in), imported
    through the parity harness (benchmarks/parity: its flash_attn / torchsparse stand-ins; the release's SSA
    Triton kernels on CUDA in bfloat16 with a Triton that has block pointers, its PyTorch references else)."""
    from benchmarks.parity import common
    common.import_release(official, device, "auto", torch.bfloat16)
    pkg = "direct3d_s2.modules.sparse.attention.spatial_sparse_attention"
    scoring = importlib.import_module(f"{pkg}.ops.compressed_attention")
    module = importlib.import_module(f"{pkg}.module.spatial_sparse_attention")
    window = importlib.import_module(f"{pkg}.ops.window_attention")
    print(f"release SSA ops: {common._IMPORTED['ssa_ops']}")
    return (scoring.get_block_score, module.spatial_selection_attention, window.sparse_window_attention,
            sys.modules["flash_attn"], common._IMPORTED["ssa_ops"] == "torch")


# ------------------------------------------------------------------------------------------ inputs
def make_case(sizes, hq, hkv, d, grid, seed, device):
    coords, cu = shell_shapes(sizes, grid, seed)
    coords = coords[block_order(coords, cu, 4, 8)]
    st = SSAStructure(coords.to(device), cu.to(device), 4, 8)
    g = torch.Generator().manual_seed(seed + 1)
    n = coords.shape[0]
    mk = lambda *s: torch.randn(*s, generator=g).to(torch.bfloat16).to(device)  # noqa: E731
    t = dict(q=mk(n, hq, d), k=mk(n, hkv, d), v=mk(n, hkv, d), k_cmp=mk(st.n_cmp, hkv, d),
             v_cmp=mk(st.n_cmp, hkv, d))
    t["gates"] = torch.sigmoid(torch.randn(n, 3, generator=g)).to(torch.bfloat16).to(device)  # one per token
    return st, t


def rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------------------- compare
def release_ssa(rel_ops, st, t, shift, resolution):
    """The release's SpatialSparseAttention.forward after its projections, on our inputs."""
    get_block_score, selection, window, fa, _ = rel_ops
    dev = t["q"].device
    cu = st.cu_seqlens.to(torch.int32)
    cu_cmp = st.cmp_shape_offsets.to(torch.int32)
    shape = st.shape_of_token
    coords = torch.cat([shape[:, None].int(), st._coords.int()], 1)  # (N, 4): batch, x, y, z
    cmp_shape = shape[st.cmp_offsets[:-1]]
    cmp_coords = torch.cat([cmp_shape[:, None].int(), st._coords[st.cmp_offsets[:-1]].int() // st.cmp_block], 1)
    q = SparseTensorStandIn(t["q"], coords)
    k = SparseTensorStandIn(t["k"], coords)
    v = SparseTensorStandIn(t["v"], coords)
    kc = SparseTensorStandIn(t["k_cmp"], cmp_coords)
    o_cmp, lse, _ = fa.flash_attn_varlen_func(t["q"], t["k_cmp"], t["v_cmp"], cu, cu_cmp, 0, 0, causal=False,
                                              return_attn_probs=True)
    with torch.no_grad():
        topk, cu_blocks, cu_block_tokens = get_block_score(
            q, kc, lse, resolution, st.cmp_block, st.slc_block, 8, cu, cu_cmp, cu[1:] - cu[:-1],
            cu_cmp[1:] - cu_cmp[:-1], None)
    qs, ks, vs = (t[s].detach().requires_grad_(True) for s in ("q", "k", "v"))
    o_slc = selection(qs, ks, vs, topk.to(dev), cu_blocks.to(dev).to(torch.int32),
                      cu_block_tokens.to(dev).to(torch.int32), st.slc_block, cu, None)
    o_win = window(q, k, v, window_size=8, shift_window=shift).feats
    g = t["gates"]
    out = g[:, 0:1, None] * o_cmp + g[:, 1:2, None] * o_slc + g[:, 2:3, None] * o_win
    # block ids local to the shape -> our global ids, (N, Hkv, k)
    sel = topk.to(dev).long().permute(1, 0, 2)
    sel = torch.where(sel >= 0, sel + st.slc_shape_offsets[shape][:, None, None], -1)
    return dict(cmp=o_cmp, slc=o_slc, win=o_win, out=out, sel=sel, slc_inputs=(qs, ks, vs))


def compare(rel_ops, sizes, hq, hkv, d, grid, seed, shifted, device, log):
    st, t = make_case(sizes, hq, hkv, d, grid, seed, device)
    r = release_ssa(rel_ops, st, t, 4 if shifted else 0, grid)
    # ours, float64 reference on the same bf16 values, given the release's choice (isolates the attention)
    x = {s: v.double() for s, v in t.items()}
    gates = x["gates"][:, None, :].expand(-1, hq, 3)
    o_cmp, _, probs = ref.compression_attention_ref(x["q"], x["k_cmp"], x["v_cmp"], st)
    own_sel = ref.select_blocks_ref(probs, st, hkv, 8, 1)
    o_slc, _ = ref.selection_attention_ref(x["q"], x["k"], x["v"], st, r["sel"], 1)
    o_win = ref.window_attention_ref(x["q"], x["k"], x["v"], st, shifted)
    out = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win
    same = lambda a, b: (a.sort(-1).values == b.sort(-1).values).all(-1).float().mean().item()  # noqa: E731
    line = (f"N={st.n_tokens} shapes={len(sizes)} hq={hq} hkv={hkv} d={d} shifted={shifted}: "
            f"selection = release {same(own_sel, r['sel']):.4f} (float64 reference)")
    # our Triton path (float32 in the interpreter, bf16 on a GPU) with its own selection
    tdt = torch.float32 if device == "cpu" else torch.bfloat16
    y = {s: v.to(tdt) for s, v in t.items()}
    lse = None
    if device != "cpu" or os.environ.get("TRITON_INTERPRET") == "1":
        from kernels.ssa import compression_attention
        lse = compression_attention(y["q"], y["k_cmp"], y["v_cmp"], st)[1]
        tsel = select_blocks(y["q"], y["k_cmp"], lse, st, top_k=8, q_tile=1)
        tout = spatial_sparse_attention(y["q"], y["k"], y["v"], y["k_cmp"], y["v_cmp"], y["gates"], st,
                                        top_k=8, q_tile=1, shifted=shifted)
        line += f", triton {same(tsel, r['sel']):.4f}"
    line += (f" | release vs reference: cmp {rel(r['cmp'], o_cmp):.2e} slc {rel(r['slc'], o_slc):.2e} "
             f"win {rel(r['win'], o_win):.2e} out {rel(r['out'], out):.2e}")
    if lse is not None:
        line += f" | release vs triton out {rel(r['out'], tout):.2e}"
    log(line + f" | bf16 rounding of the reference itself {rel(out.to(torch.bfloat16), out):.2e}")
    if rel_ops[4]:  # the PyTorch references of the release's kernels: their gradients are not the release's
        return same(own_sel, r["sel"]), rel(r["out"], out)
    # gradients of the selection branch: the release's Triton backward against the reference's autograd
    w = torch.randn(r["slc"].shape, generator=torch.Generator().manual_seed(seed)).to(r["slc"])
    gr = torch.autograd.grad(r["slc"], r["slc_inputs"], w)
    xs = [x[s].detach().requires_grad_(True) for s in ("q", "k", "v")]
    o_ref, _ = ref.selection_attention_ref(*xs, st, r["sel"], 1)
    gref = torch.autograd.grad(o_ref, xs, w.double())
    log("  selection gradients, release vs reference: " + " ".join(
        f"d{s} {rel(a, b):.2e}" for s, a, b in zip("qkv", gr, gref)))
    return same(own_sel, r["sel"]), rel(r["out"], out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--official", default=None, help="folder holding direct3d_s2/ (default: <repo>/.official)")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rel_ops = load_release(device, args.official)
    worst_sel, worst_out = 1.0, 0.0
    cases = [([300, 5, 170], 32, 2, 32, 32, False), ([420, 90], 32, 2, 32, 32, True),
             ([260, 1, 33], 8, 2, 16, 24, True)]
    if device == "cuda":
        cases += [([6000, 2500], 32, 2, 32, 64, False), ([9000], 32, 2, 32, 64, True)]
    for i, (sizes, hq, hkv, d, grid, shifted) in enumerate(cases):
        s, o = compare(rel_ops, sizes, hq, hkv, d, grid, args.seed + i, shifted, device, print)
        worst_sel, worst_out = min(worst_sel, s), max(worst_out, o)
    print(f"release parity: lowest share of equal selections {worst_sel:.4f}, "
          f"largest relative difference of the output {worst_out:.2e}")


if __name__ == "__main__":
    main()
