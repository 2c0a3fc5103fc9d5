"""Fused elementwise passes of SSA: the gated sum of the three branches and the backward's row dots.

o = g_cmp·o_cmp + g_slc·o_slc + g_win·o_win (Direct3D-S2 Sec. 3.3) in one read of each branch
output instead of five PyTorch passes; its backward gives every dO_b and dg_b in one pass too.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK_ROWS = 64


@triton.jit
def _row_dot_kernel(A, B, OUT, n_rows, D: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    m = r < n_rows
    a = tl.load(A + r[:, None] * D + d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    b = tl.load(B + r[:, None] * D + d[None, :], mask=m[:, None], other=0.0).to(tl.float32)
    tl.store(OUT + r, tl.sum(a * b, 1), mask=m)


def row_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b, -1) in float32 for (N, H, D) tensors, without float32 copies of the inputs."""
    a, b = a.contiguous(), b.contiguous()
    d = a.shape[-1]
    n = a.numel() // d
    out = torch.empty(a.shape[:-1], dtype=torch.float32, device=a.device)
    _row_dot_kernel[(triton.cdiv(n, BLOCK_ROWS),)](a, b, out, n, D=d, BLOCK=BLOCK_ROWS)
    return out


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


@triton.jit
def _gate_bwd_branch(O, DB, G, DG, do, r, m, off, b: tl.constexpr):
    g = tl.load(G + r * 3 + b, mask=m, other=0.0).to(tl.float32)
    o = tl.load(O + off, mask=m[:, None], other=0.0).to(tl.float32)
    tl.store(DB + off, (g[:, None] * do).to(DB.dtype.element_ty), mask=m[:, None])
    tl.store(DG + r * 3 + b, tl.sum(o * do, 1), mask=m)


@triton.jit
def _gate_bwd_kernel(O0, O1, O2, G, DO, D0, D1, D2, DG, n_rows, D: tl.constexpr, BLOCK: tl.constexpr):
    r = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    d = tl.arange(0, D)
    m = r < n_rows
    off = r[:, None] * D + d[None, :]
    do = tl.load(DO + off, mask=m[:, None], other=0.0).to(tl.float32)
    _gate_bwd_branch(O0, D0, G, DG, do, r, m, off, 0)
    _gate_bwd_branch(O1, D1, G, DG, do, r, m, off, 1)
    _gate_bwd_branch(O2, D2, G, DG, do, r, m, off, 2)


def gate_forward(o0, o1, o2, gates):
    """The gated sum without autograd (contiguous inputs)."""
    d = o0.shape[-1]
    n = o0.numel() // d
    out = torch.empty_like(o0)
    _gate_fwd_kernel[(triton.cdiv(n, BLOCK_ROWS),)](o0, o1, o2, gates, out, n, D=d, BLOCK=BLOCK_ROWS)
    return out


class _GateMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o0, o1, o2, gates):
        o0, o1, o2, gates = o0.contiguous(), o1.contiguous(), o2.contiguous(), gates.contiguous()
        out = gate_forward(o0, o1, o2, gates)
        ctx.save_for_backward(o0, o1, o2, gates)
        return out

    @staticmethod
    def backward(ctx, do):
        o0, o1, o2, gates = ctx.saved_tensors
        do = do.contiguous()
        d = o0.shape[-1]
        n = o0.numel() // d
        d0, d1, d2 = (torch.empty_like(o0) for _ in range(3))
        dg = torch.empty(gates.shape, dtype=torch.float32, device=gates.device)
        _gate_bwd_kernel[(triton.cdiv(n, BLOCK_ROWS),)](o0, o1, o2, gates, do, d0, d1, d2, dg, n, D=d,
                                                        BLOCK=BLOCK_ROWS)
        return d0, d1, d2, dg.to(gates.dtype)


def gate_mix(o_cmp, o_slc, o_win, gates):
    """gates (N, Hq, 3) after the sigmoid; returns sum_b gates[..., b] · o_b in the outputs' dtype."""
    return _GateMix.apply(o_cmp, o_slc, o_win, gates)
