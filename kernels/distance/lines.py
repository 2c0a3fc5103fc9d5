"""Triton kernels of the grid-line crossing count (pipeline/geometry/winding.LineCrossings on the GPU):
per triangle the grid columns under its x extent, per (triangle, column) the rows its cut can cover,
per (triangle, line) the exact crossing test and the packed crossing.

float64 throughout, op for op as LineCrossings' PyTorch code (the reference), compiled without fused
multiply-adds, so the CPU and the GPU count the same crossings. The two faces of an edge compute their
edge function from the same ordered ends, negated, so a line through an edge is inside exactly one of
them. Constants that float32 cannot hold come from a float64 tensor.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.distance.scan import _block, constants

MISS = 1 << 62  # key of a (triangle, line) pair that does not cross: sorts after every crossing
# No fused multiply-adds: every float64 step rounds as in the PyTorch code, so the crossings' heights (and
# the voxel centres counted below them) are the CPU's to the bit, also where a face meets a centre exactly.
_EXACT = {"enable_fp_fusion": False}
_MISS = tl.constexpr(MISS)


@triton.jit
def _triangle_columns_kernel(tri_ptr, const_ptr, c_lo_ptr, ncol_ptr, n, i0, i1, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    h = tl.load(const_ptr + 0)
    slack = tl.load(const_ptr + 1)
    x0 = tl.load(tri_ptr + offs * 9 + 0, mask=m, other=0.0)
    x1 = tl.load(tri_ptr + offs * 9 + 3, mask=m, other=0.0)
    x2 = tl.load(tri_ptr + offs * 9 + 6, mask=m, other=0.0)
    lo = tl.minimum(tl.minimum(x0, x1), x2)
    hi = tl.maximum(tl.maximum(x0, x1), x2)
    c_lo = tl.maximum(tl.ceil((lo + 1) / h - 0.5 - slack), i0 * 1.0).to(tl.int64)
    c_hi = tl.minimum(tl.floor((hi + 1) / h - 0.5 + slack), i1 - 1.0).to(tl.int64)
    tl.store(c_lo_ptr + offs, c_lo, mask=m)
    tl.store(ncol_ptr + offs, tl.maximum(c_hi - c_lo + 1, 0), mask=m)


def triangle_columns(tri: torch.Tensor, resolution: int, i0: int, i1: int):
    """Per triangle (F,3,3) float64: the first grid column x_i under its x extent and how many (i0 <= i < i1)."""
    n = tri.shape[0]
    c_lo = torch.empty(n, dtype=torch.int64, device=tri.device)
    ncol = torch.empty(n, dtype=torch.int64, device=tri.device)
    const = constants((2.0 / resolution, 1e-6), tri.device)
    if n:
        block = _block(256)
        _triangle_columns_kernel[(triton.cdiv(n, block),)](tri, const, c_lo, ncol, n, i0, i1, BLOCK=block,
                                                           **_EXACT)
    return c_lo, ncol


@triton.jit
def _column_rows_kernel(tri_ptr, owner_ptr, col_ptr, const_ptr, r_lo_ptr, nrow_ptr, n, j0, j1,
                        BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    h = tl.load(const_ptr + 0)
    slack = tl.load(const_ptr + 1)
    tiny = tl.load(const_ptr + 2)
    p = tri_ptr + tl.load(owner_ptr + offs, mask=m, other=0) * 9
    xc = -1 + (tl.load(col_ptr + offs, mask=m, other=0).to(tl.float64) + 0.5) * h
    lo = tl.full([BLOCK], float("inf"), tl.float64)
    hi = tl.full([BLOCK], float("-inf"), tl.float64)
    for k in tl.static_range(3):  # the y span of the cut x = xc, edge by edge (winding._column_spans)
        x = tl.load(p + 3 * k, mask=m, other=0.0)
        y = tl.load(p + 3 * k + 1, mask=m, other=0.0)
        xb = tl.load(p + 3 * ((k + 1) % 3), mask=m, other=0.0)
        yb = tl.load(p + 3 * ((k + 1) % 3) + 1, mask=m, other=0.0)
        dx = xb - x
        flat = dx == 0
        tt = tl.minimum(tl.maximum((xc - x) / tl.where(flat, 1.0, dx), 0.0), 1.0)
        yc = y + tt * (yb - y)
        covers = (tl.minimum(x, xb) <= xc) & (xc <= tl.maximum(x, xb))
        lo = tl.where(covers, tl.minimum(lo, tl.where(flat, tl.minimum(y, yb), yc)), lo)
        hi = tl.where(covers, tl.maximum(hi, tl.where(flat, tl.maximum(y, yb), yc)), hi)
    lo = lo - tiny
    hi = hi + tiny
    empty = ~(lo <= hi)  # a slack column that no edge reaches
    lo = tl.where(empty, 0.0, lo)
    hi = tl.where(empty, -1.0, hi)
    r_lo = tl.maximum(tl.ceil((lo + 1) / h - 0.5 - slack), j0 * 1.0).to(tl.int64)
    r_hi = tl.minimum(tl.floor((hi + 1) / h - 0.5 + slack), j1 - 1.0).to(tl.int64)
    tl.store(r_lo_ptr + offs, r_lo, mask=m)
    tl.store(nrow_ptr + offs, tl.maximum(r_hi - r_lo + 1, 0), mask=m)


def column_rows(tri: torch.Tensor, owner: torch.Tensor, col: torch.Tensor, resolution: int, j0: int, j1: int):
    """Per (triangle owner, column col): the first row y_j whose line can pass through the triangle and
    how many (j0 <= j < j1)."""
    n = owner.numel()
    r_lo = torch.empty(n, dtype=torch.int64, device=tri.device)
    nrow = torch.empty(n, dtype=torch.int64, device=tri.device)
    const = constants((2.0 / resolution, 1e-6, 1e-9), tri.device)
    if n:
        block = _block(256)
        _column_rows_kernel[(triton.cdiv(n, block),)](tri, owner, col, const, r_lo, nrow, n, j0, j1, BLOCK=block,
                                                      **_EXACT)
    return r_lo, nrow


@triton.jit
def _edge_side(p, k: tl.constexpr, px, py, m):
    """The side of (px, py) from edge k (vertex k -> k + 1) of the triangles at p, as winding._edge_lines
    defines it: coefficients from the ends in lexicographic order, negated when the triangle runs the
    other way; an exact zero takes the tie sign. Returns (edge function, side)."""
    ux = tl.load(p + 3 * k, mask=m, other=0.0)
    uy = tl.load(p + 3 * k + 1, mask=m, other=0.0)
    wx = tl.load(p + 3 * ((k + 1) % 3), mask=m, other=0.0)
    wy = tl.load(p + 3 * ((k + 1) % 3) + 1, mask=m, other=0.0)
    swap = (ux > wx) | ((ux == wx) & (uy > wy))
    ax = tl.where(swap, wx, ux)
    ay = tl.where(swap, wy, uy)
    dx = tl.where(swap, ux, wx) - ax
    dy = tl.where(swap, uy, wy) - ay
    flip = tl.where(swap, -1.0, 1.0).to(tl.float64)
    sgn_dy = tl.where(dy > 0, 1.0, tl.where(dy < 0, -1.0, 0.0)).to(tl.float64)
    sgn_dx = tl.where(dx > 0, 1.0, tl.where(dx < 0, -1.0, 0.0)).to(tl.float64)
    tie = tl.where(dy != 0, -sgn_dy, sgn_dx) * flip
    o = ((-dy) * flip * px + (dy * ax - dx * ay) * flip) + (dx * flip) * py
    return o, tl.where(o == 0, tie, o)


@triton.jit
def _line_hits_kernel(tri_ptr, owner_ptr, col_ptr, rep_ptr, j_ptr, const_ptr, key_ptr, sign_ptr, n, res,
                      BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    h = tl.load(const_ptr + 0)
    rep = tl.load(rep_ptr + offs, mask=m, other=0)
    j = tl.load(j_ptr + offs, mask=m, other=0)
    col = tl.load(col_ptr + rep, mask=m, other=0)
    p = tri_ptr + tl.load(owner_ptr + rep, mask=m, other=0) * 9
    px = -1 + (col.to(tl.float64) + 0.5) * h
    py = -1 + (j.to(tl.float64) + 0.5) * h
    o0, s0 = _edge_side(p, 0, px, py, m)
    o1, s1 = _edge_side(p, 1, px, py, m)
    o2, s2 = _edge_side(p, 2, px, py, m)
    pos = (s0 > 0) & (s1 > 0) & (s2 > 0)
    neg = (s0 < 0) & (s1 < 0) & (s2 < 0)
    # Height of the crossing, barycentric: o(b->c) weighs a, o(c->a) weighs b, o(a->b) weighs c.
    z0 = tl.load(p + 2, mask=m, other=0.0)
    z1 = tl.load(p + 5, mask=m, other=0.0)
    z2 = tl.load(p + 8, mask=m, other=0.0)
    den = o0 + o1 + o2
    zc = tl.where(den != 0, (o1 * z0 + o2 * z1 + o0 * z2) / tl.where(den != 0, den, 1.0), (z0 + z1 + z2) / 3.0)
    below = tl.minimum(tl.maximum(tl.ceil((zc + 1) / h - 0.5), 0.0), res * 1.0).to(tl.int64)
    key = (col * res + j) * (res + 1) + below
    hit = pos | neg
    tl.store(key_ptr + offs, tl.where(hit, key, _MISS), mask=m)
    tl.store(sign_ptr + offs, tl.where(pos, 1, tl.where(neg, -1, 0)).to(tl.int64), mask=m)


def line_hits(tri: torch.Tensor, owner: torch.Tensor, col: torch.Tensor, rep: torch.Tensor, j: torch.Tensor,
              resolution: int):
    """Per (triangle, line) pair (the (owner, col) pair rep, row j): the crossing key
    (col * R + j) * (R + 1) + voxel centres below the crossing, and its sign (+1 where the normal
    points to +z); key MISS and sign 0 where the line does not cross the triangle."""
    n = rep.numel()
    key = torch.empty(n, dtype=torch.int64, device=tri.device)
    sign = torch.empty(n, dtype=torch.int64, device=tri.device)
    const = constants((2.0 / resolution,), tri.device)
    if n:
        block = _block(256)
        _line_hits_kernel[(triton.cdiv(n, block),)](tri, owner, col, rep, j, const, key, sign, n, resolution,
                                                    BLOCK=block, **_EXACT)
    return key, sign
