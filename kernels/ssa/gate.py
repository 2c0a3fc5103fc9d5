"""The gated sum of the three SSA branches, o = g_cmp·o_cmp + g_slc·o_slc + g_win·o_win (Direct3D-S2 Sec. 3.3), in
one read of each branch output. Used after shifted windows (the unshifted window forward writes it itself); its
gradient comes from the branch kernels (ops._WholeSSA)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 64


@triton.jit
def _gate_fwd_kernel(O0, O1, O2, G, OUT, n_rows, D: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    m = r < n_rows
    off = r[:, None] * D + d[None, :]
    g0 = tl.load(G + r * 3, mask=m, other=0.0).to(tl.float32)
    g1 = tl.load(G + r * 3 + 1, mask=m, other=0.0).to(tl.float32)
    g2 = tl.load(G + r * 3 + 2, mask=m, other=0.0).to(tl.float32)
    acc = g0[:, None] * tl.load(O0 + off, mask=m[:, None], other=0.0).to(tl.float32)
    acc += g1[:, None] * tl.load(O1 + off, mask=m[:, None], other=0.0).to(tl.float32)
    acc += g2[:, None] * tl.load(O2 + off, mask=m[:, None], other=0.0).to(tl.float32)
    tl.store(OUT + off, acc.to(OUT.dtype.element_ty), mask=m[:, None])


def gate_forward(o0, o1, o2, gates):
    """The gated sum without autograd (contiguous inputs)."""
    d = o0.shape[-1]
    n = o0.numel() // d
    out = torch.empty_like(o0)
    _gate_fwd_kernel[(triton.cdiv(n, BLOCK_ROWS),)](o0, o1, o2, gates, out, n, D=d, BLOCK=BLOCK_ROWS)
    return out
