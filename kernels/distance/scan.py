"""Triton kernels of the narrow band's scan conversion, one launch per stage instead of dozens of
small PyTorch ops: per triangle its column frame and tables, per (triangle, u) row the v interval of
columns near the projected triangle, per column its slab of voxels along w.

The float steps mirror the PyTorch code of pipeline/geometry/band.py (`_tables`, `_columns`) op for
op, which is their reference; every bound keeps the same index slack, so rounding differences
(fused multiply-adds on a GPU) can only add or drop candidates the exact distance test rejects.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@functools.lru_cache(maxsize=256)
def constants(values: tuple[float, ...], device: torch.device) -> torch.Tensor:
    """float64 constants for a kernel (Triton passes Python floats as float32), copied to the device once
    per process: PyTorch's host-to-device copy waits for the GPU's queue."""
    return torch.tensor(values, dtype=torch.float64, device=device)


def _block(n_default: int) -> int:
    # Triton's interpreter pays ~30 ms per program: bigger blocks there.
    return 8192 if os.environ.get("TRITON_INTERPRET") == "1" else n_default


@triton.jit
def _pick(axis, x, y, z):
    """The coordinate of (x, y, z) along `axis` (0, 1 or 2)."""
    return tl.where(axis == 0, x, tl.where(axis == 1, y, z))


@triton.jit
def _triangle_tables_kernel(
    tri_ptr, const_ptr, rows_ptr, row_i_ptr, lines_ptr, slab_ptr, stride_ptr, count_ptr,
    n, res, r, c0, h, eps, two_r, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    p = tri_ptr + offs * 9
    ax, ay, az = tl.load(p + 0, mask=m, other=0.0), tl.load(p + 1, mask=m, other=0.0), tl.load(p + 2, mask=m, other=0.0)
    bx, by, bz = tl.load(p + 3, mask=m, other=0.0), tl.load(p + 4, mask=m, other=0.0), tl.load(p + 5, mask=m, other=0.0)
    cx, cy, cz = tl.load(p + 6, mask=m, other=0.0), tl.load(p + 7, mask=m, other=0.0), tl.load(p + 8, mask=m, other=0.0)
    e1x, e1y, e1z = bx - ax, by - ay, bz - az
    e2x, e2y, e2z = cx - ax, cy - ay, cz - az
    nx = e1y * e2z - e1z * e2y
    ny = e1z * e2x - e1x * e2z
    nz = e1x * e2y - e1y * e2x
    # Dominant axis w (the first of equal ones, as argmax); u = (w + 1) % 3, v = (w + 2) % 3.
    mx, my, mz = tl.abs(nx), tl.abs(ny), tl.abs(nz)
    w_ax = tl.where((mx >= my) & (mx >= mz), 0, tl.where(my >= mz, 1, 2))
    u_ax = (w_ax + 1) % 3
    v_ax = (w_ax + 2) % 3
    au, bu, cu = _pick(u_ax, ax, ay, az), _pick(u_ax, bx, by, bz), _pick(u_ax, cx, cy, cz)
    av, bv, cv = _pick(v_ax, ax, ay, az), _pick(v_ax, bx, by, bz), _pick(v_ax, cx, cy, cz)
    aw, bw, cw = _pick(w_ax, ax, ay, az), _pick(w_ax, bx, by, bz), _pick(w_ax, cx, cy, cz)
    n_u, n_v, n_w = _pick(u_ax, nx, ny, nz), _pick(v_ax, nx, ny, nz), _pick(w_ax, nx, ny, nz)
    # Index ranges of the box dilated by r (band._index_range).
    lo_u = tl.minimum(tl.minimum(au, bu), cu)
    lo_v = tl.minimum(tl.minimum(av, bv), cv)
    lo_w = tl.minimum(tl.minimum(aw, bw), cw)
    hi_u = tl.maximum(tl.maximum(au, bu), cu)
    hi_v = tl.maximum(tl.maximum(av, bv), cv)
    hi_w = tl.maximum(tl.maximum(aw, bw), cw)
    top = res - 1.0
    iu_lo = tl.minimum(tl.maximum(tl.ceil((lo_u - r - c0) / h - eps), 0.0), top).to(tl.int64)
    iv_lo = tl.minimum(tl.maximum(tl.ceil((lo_v - r - c0) / h - eps), 0.0), top).to(tl.int64)
    iw_lo = tl.minimum(tl.maximum(tl.ceil((lo_w - r - c0) / h - eps), 0.0), top).to(tl.int64)
    iu_hi = tl.minimum(tl.maximum(tl.floor((hi_u + r - c0) / h + eps), -1.0), top).to(tl.int64)
    iv_hi = tl.minimum(tl.maximum(tl.floor((hi_v + r - c0) / h + eps), -1.0), top).to(tl.int64)
    iw_hi = tl.minimum(tl.maximum(tl.floor((hi_w + r - c0) / h + eps), -1.0), top).to(tl.int64)
    nu = tl.maximum(iu_hi - iu_lo + 1, 0)
    tl.store(rows_ptr + offs, nu, mask=m)
    tl.store(row_i_ptr + offs, iu_lo, mask=m)
    tl.store(row_i_ptr + n + offs, iv_lo, mask=m)
    tl.store(row_i_ptr + 2 * n + offs, iv_hi, mask=m)
    # Candidate bound (band.candidate_counts): rows x columns x the slab's voxels.
    norm = tl.sqrt(n_u * n_u + n_v * n_v + n_w * n_w)
    slab = tl.ceil(two_r / (h * tl.abs(n_w) / norm)).to(tl.int64) + 2
    count = nu * tl.maximum(iv_hi - iv_lo + 1, 0) * tl.minimum(slab, tl.maximum(iw_hi - iw_lo + 1, 0))
    tl.store(count_ptr + offs, count, mask=m)
    # Edge lines a u + b v + c >= 0 offset outward by r, in float64 (const: r (1 + eps) + eps h, 1e-300).
    off = tl.load(const_ptr + 0)
    tiny = tl.load(const_ptr + 1)
    orient = tl.where(n_w > 0, 1.0, tl.where(n_w < 0, -1.0, 0.0)).to(tl.float64)
    pu0, pu1, pu2 = au.to(tl.float64), bu.to(tl.float64), cu.to(tl.float64)
    pv0, pv1, pv2 = av.to(tl.float64), bv.to(tl.float64), cv.to(tl.float64)
    for k in tl.static_range(3):
        if k == 0:
            su, sv, eu, ev = pu0, pv0, pu1 - pu0, pv1 - pv0
        elif k == 1:
            su, sv, eu, ev = pu1, pv1, pu2 - pu1, pv2 - pv1
        else:
            su, sv, eu, ev = pu2, pv2, pu0 - pu2, pv0 - pv2
        inv_len = orient / tl.maximum(tl.sqrt(eu * eu + ev * ev), 1e-30)
        la = -ev * inv_len
        lb = eu * inv_len
        lc = -(la * su + lb * sv) + off
        lc = lc + tl.load(const_ptr + 2)
        tl.store(lines_ptr + k * n + offs, la, mask=m)
        tl.store(lines_ptr + (3 + k) * n + offs, tl.where(lb == 0, tiny, lb), mask=m)
        tl.store(lines_ptr + (6 + k) * n + offs, lc, mask=m)
    # The plane as w = w0 + gu u + gv v, the slab's half width and the triangle's own w range.
    gu = -n_u / n_w
    gv = -n_v / n_w
    tl.store(slab_ptr + offs, gu, mask=m)
    tl.store(slab_ptr + n + offs, gv, mask=m)
    tl.store(slab_ptr + 2 * n + offs, aw - gu * au - gv * av, mask=m)
    tl.store(slab_ptr + 3 * n + offs, r * norm / tl.abs(n_w), mask=m)
    tl.store(slab_ptr + 4 * n + offs, iw_lo.to(tl.float32), mask=m)
    tl.store(slab_ptr + 5 * n + offs, iw_hi.to(tl.float32), mask=m)
    rr = res * res
    tl.store(stride_ptr + offs, tl.where(u_ax == 0, rr, tl.where(u_ax == 1, res, 1)).to(tl.int64), mask=m)
    tl.store(stride_ptr + n + offs, tl.where(v_ax == 0, rr, tl.where(v_ax == 1, res, 1)).to(tl.int64), mask=m)
    tl.store(stride_ptr + 2 * n + offs, tl.where(w_ax == 0, rr, tl.where(w_ax == 1, res, 1)).to(tl.int64), mask=m)


def triangle_tables(tri: torch.Tensor, res: int, band: float, eps: float):
    """Per triangle (T,3,3) float32: rows (T,), row_i (3,T), lines (9,T) float64, slab (6,T) float32,
    stride (3,T) and the candidate bound (T,), as band._tables and band.candidate_counts give them."""
    n = tri.shape[0]
    dev = tri.device
    h = 2.0 / res
    r = band * h
    rows = torch.empty(n, dtype=torch.int64, device=dev)
    row_i = torch.empty(3, n, dtype=torch.int64, device=dev)
    lines = torch.empty(9, n, dtype=torch.float64, device=dev)
    slab = torch.empty(6, n, dtype=torch.float32, device=dev)
    stride = torch.empty(3, n, dtype=torch.int64, device=dev)
    count = torch.empty(n, dtype=torch.int64, device=dev)
    const = constants((r * (1 + eps), 1e-300, eps * h), dev)
    if n:
        block = _block(128)
        _triangle_tables_kernel[(triton.cdiv(n, block),)](
            tri.float().contiguous(), const, rows, row_i, lines, slab, stride, count,
            n, res, r, -1.0 + 0.5 * h, h, eps, 2 * r, BLOCK=block)
    return rows, row_i, lines, slab, stride, count


@triton.jit
def _row_spans_kernel(row_t_ptr, local_ptr, row_i_ptr, lines_ptr, const_ptr, iu_ptr, iv_lo_ptr, ncol_ptr, n,
                      num_tri, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    t = tl.load(row_t_ptr + offs, mask=m, other=0)
    iu = tl.load(row_i_ptr + t, mask=m, other=0) + tl.load(local_ptr + offs, mask=m, other=0)
    c0 = tl.load(const_ptr + 0)
    h = tl.load(const_ptr + 1)
    eps = tl.load(const_ptr + 2)
    xu = c0 + iu.to(tl.float64) * h
    v_lo = tl.full([BLOCK], -3.0, tl.float64)
    v_hi = tl.full([BLOCK], 3.0, tl.float64)
    for k in tl.static_range(3):
        a = tl.load(lines_ptr + k * num_tri + t, mask=m, other=0.0)
        b = tl.load(lines_ptr + (3 + k) * num_tri + t, mask=m, other=1.0)
        c = tl.load(lines_ptr + (6 + k) * num_tri + t, mask=m, other=0.0)
        bound = -(a * xu + c) / b  # v on the line; b > 0: v >= bound, b < 0: v <= bound
        v_lo = tl.where(b < 0, v_lo, tl.maximum(v_lo, bound))
        v_hi = tl.where(b < 0, tl.minimum(v_hi, bound), v_hi)
    v_lo = tl.minimum(tl.maximum(v_lo, -3.0), 3.0)
    v_hi = tl.minimum(tl.maximum(v_hi, -3.0), 3.0)
    iv_lo = tl.ceil((v_lo - c0) / h - eps).to(tl.int64)
    iv_hi = tl.floor((v_hi - c0) / h + eps).to(tl.int64)
    iv_lo = tl.maximum(tl.load(row_i_ptr + num_tri + t, mask=m, other=0), iv_lo)
    iv_hi = tl.minimum(tl.load(row_i_ptr + 2 * num_tri + t, mask=m, other=0), iv_hi)
    tl.store(iu_ptr + offs, iu, mask=m)
    tl.store(iv_lo_ptr + offs, iv_lo, mask=m)
    tl.store(ncol_ptr + offs, tl.maximum(iv_hi - iv_lo + 1, 0), mask=m)


def row_spans(row_t: torch.Tensor, local: torch.Tensor, row_i: torch.Tensor, lines: torch.Tensor, res: int,
              eps: float):
    """Per (triangle, u) row (triangle row_t, u = row_i[0, t] + local): u, the first column v and the
    number of columns whose v lies inside the three offset edge lines (as band._columns scans them)."""
    n = row_t.numel()
    h = 2.0 / res
    iu = torch.empty(n, dtype=torch.int64, device=row_t.device)
    iv_lo = torch.empty(n, dtype=torch.int64, device=row_t.device)
    ncol = torch.empty(n, dtype=torch.int64, device=row_t.device)
    const = constants((-1.0 + 0.5 * h, h, eps), row_t.device)
    if n:
        block = _block(256)
        _row_spans_kernel[(triton.cdiv(n, block),)](row_t, local, row_i, lines, const, iu, iv_lo, ncol, n,
                                                    row_i.shape[1], BLOCK=block)
    return iu, iv_lo, ncol


@triton.jit
def _column_slabs_kernel(col_t_ptr, iu_ptr, iv_ptr, slab_ptr, w_lo_ptr, count_ptr, n, num_tri, res, c0, h, eps,
                         BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    t = tl.load(col_t_ptr + offs, mask=m, other=0)
    xu = c0 + tl.load(iu_ptr + offs, mask=m, other=0).to(tl.float32) * h
    xv = c0 + tl.load(iv_ptr + offs, mask=m, other=0).to(tl.float32) * h
    gu = tl.load(slab_ptr + t, mask=m, other=0.0)
    gv = tl.load(slab_ptr + num_tri + t, mask=m, other=0.0)
    w_mid = tl.load(slab_ptr + 2 * num_tri + t, mask=m, other=0.0) + gu * xu + gv * xv
    half = tl.load(slab_ptr + 3 * num_tri + t, mask=m, other=0.0)
    top = res - 1.0
    w_lo = tl.minimum(tl.maximum(tl.ceil((w_mid - half - 0.0 - c0) / h - eps), 0.0), top)
    w_hi = tl.minimum(tl.maximum(tl.floor((w_mid + half + 0.0 - c0) / h + eps), -1.0), top)
    w_lo = tl.maximum(w_lo.to(tl.int64), tl.load(slab_ptr + 4 * num_tri + t, mask=m, other=0.0).to(tl.int64))
    w_hi = tl.minimum(w_hi.to(tl.int64), tl.load(slab_ptr + 5 * num_tri + t, mask=m, other=0.0).to(tl.int64))
    tl.store(w_lo_ptr + offs, w_lo, mask=m)
    tl.store(count_ptr + offs, tl.maximum(w_hi - w_lo + 1, 0), mask=m)


def column_slabs(col_t: torch.Tensor, iu: torch.Tensor, iv: torch.Tensor, slab: torch.Tensor, res: int, eps: float):
    """Per column (triangle col_t, u = iu, v = iv): the first voxel along w and the voxel count of its
    slab |w - plane| <= half width, within the triangle's own dilated w range."""
    n = col_t.numel()
    h = 2.0 / res
    w_lo = torch.empty(n, dtype=torch.int64, device=col_t.device)
    count = torch.empty(n, dtype=torch.int64, device=col_t.device)
    if n:
        block = _block(256)
        _column_slabs_kernel[(triton.cdiv(n, block),)](col_t, iu, iv, slab, w_lo, count, n, slab.shape[1], res,
                                                       -1.0 + 0.5 * h, h, eps, BLOCK=block)
    return w_lo, count
