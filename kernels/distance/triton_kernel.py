"""Triton kernels: squared distance from points to one indexed triangle each, with the closest feature;
and the same for every voxel of a set of grid columns, packed for the narrow band's sort.

One program handles BLOCK (point, triangle) pairs or BLOCK columns; the region tests mirror
reference.point_triangle_sqdist_reference line for line.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl


@triton.jit
def _sqdist_feature(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz):
    """Squared distance from (px, py, pz) to the triangle and its closest feature code (int32)."""
    abx, aby, abz = bx - ax, by - ay, bz - az
    acx, acy, acz = cx - ax, cy - ay, cz - az
    apx, apy, apz = px - ax, py - ay, pz - az
    d1 = abx * apx + aby * apy + abz * apz
    d2 = acx * apx + acy * apy + acz * apz
    bpx, bpy, bpz = px - bx, py - by, pz - bz
    d3 = abx * bpx + aby * bpy + abz * bpz
    d4 = acx * bpx + acy * bpy + acz * bpz
    cpx, cpy, cpz = px - cx, py - cy, pz - cz
    d5 = abx * cpx + aby * cpy + abz * cpz
    d6 = acx * cpx + acy * cpy + acz * cpz
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2

    in_a = (d1 <= 0) & (d2 <= 0)
    in_b = (d3 >= 0) & (d4 <= d3)
    in_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    in_c = (d6 >= 0) & (d5 <= d6)
    in_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    in_bc = (va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0)

    denom = va + vb + vc
    safe = tl.where(denom != 0, denom, 1.0)
    wb = vb / safe
    wc = vc / safe
    den_bc = (d4 - d3) + (d5 - d6)
    t_bc = (d4 - d3) / tl.where(in_bc & (den_bc != 0), den_bc, 1.0)
    wb = tl.where(in_bc, 1.0 - t_bc, wb)
    wc = tl.where(in_bc, t_bc, wc)
    feat = tl.where(in_bc, 2, 0)
    t_ac = d2 / tl.where(in_ac & (d2 != d6), d2 - d6, 1.0)
    wb = tl.where(in_ac, 0.0, wb)
    wc = tl.where(in_ac, t_ac, wc)
    feat = tl.where(in_ac, 3, feat)
    wb = tl.where(in_c, 0.0, wb)
    wc = tl.where(in_c, 1.0, wc)
    feat = tl.where(in_c, 6, feat)
    t_ab = d1 / tl.where(in_ab & (d1 != d3), d1 - d3, 1.0)
    wb = tl.where(in_ab, t_ab, wb)
    wc = tl.where(in_ab, 0.0, wc)
    feat = tl.where(in_ab, 1, feat)
    wb = tl.where(in_b, 1.0, wb)
    wc = tl.where(in_b, 0.0, wc)
    feat = tl.where(in_b, 5, feat)
    wb = tl.where(in_a, 0.0, wb)
    wc = tl.where(in_a, 0.0, wc)
    feat = tl.where(in_a, 4, feat)

    dx = apx - wb * abx - wc * acx
    dy = apy - wb * aby - wc * acy
    dz = apz - wb * abz - wc * acz
    return dx * dx + dy * dy + dz * dz, feat


@triton.jit
def _load_triangle(tri_ptr, t, m):
    """The nine float32 coordinates of triangles t (rows of 9)."""
    t = t.to(tl.int64) * 9
    return (tl.load(tri_ptr + t + 0, mask=m, other=0.0), tl.load(tri_ptr + t + 1, mask=m, other=0.0),
            tl.load(tri_ptr + t + 2, mask=m, other=0.0), tl.load(tri_ptr + t + 3, mask=m, other=0.0),
            tl.load(tri_ptr + t + 4, mask=m, other=0.0), tl.load(tri_ptr + t + 5, mask=m, other=0.0),
            tl.load(tri_ptr + t + 6, mask=m, other=0.0), tl.load(tri_ptr + t + 7, mask=m, other=0.0),
            tl.load(tri_ptr + t + 8, mask=m, other=0.0))


@triton.jit
def _point_triangle_kernel(
    pts_ptr, tri_ptr, idx_ptr, d2_ptr, feat_ptr, n, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    px = tl.load(pts_ptr + offs * 3 + 0, mask=m, other=0.0)
    py = tl.load(pts_ptr + offs * 3 + 1, mask=m, other=0.0)
    pz = tl.load(pts_ptr + offs * 3 + 2, mask=m, other=0.0)
    ax, ay, az, bx, by, bz, cx, cy, cz = _load_triangle(tri_ptr, tl.load(idx_ptr + offs, mask=m, other=0), m)
    d2, feat = _sqdist_feature(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz)
    tl.store(d2_ptr + offs, d2, mask=m)
    tl.store(feat_ptr + offs, feat.to(tl.uint8), mask=m)


@triton.jit
def _column_candidates_kernel(
    tri_ptr, stride_ptr, col_ptr, iu_ptr, iv_ptr, w_ptr, count_ptr, start_ptr, key_ptr, word_ptr,
    n, num_tri, res, c0, h, r2, max_count, CLOSEST: tl.constexpr, BLOCK: tl.constexpr
):
    # One lane per grid column; its voxels (at most max_count) one after another along w.
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    t = tl.load(col_ptr + offs, mask=m, other=0).to(tl.int64)
    count = tl.load(count_ptr + offs, mask=m, other=0)
    at = tl.load(start_ptr + offs, mask=m, other=0)
    sw = tl.load(stride_ptr + 2 * num_tri + t, mask=m, other=0)
    key = (tl.load(iu_ptr + offs, mask=m, other=0) * tl.load(stride_ptr + t, mask=m, other=0)
           + tl.load(iv_ptr + offs, mask=m, other=0) * tl.load(stride_ptr + num_tri + t, mask=m, other=0)
           + tl.load(w_ptr + offs, mask=m, other=0) * sw)
    ax, ay, az, bx, by, bz, cx, cy, cz = _load_triangle(tri_ptr, t, m)
    owner = (t.to(tl.int32) << 3)
    for j in range(0, max_count):
        mj = m & (j < count)
        px = c0 + (key // (res * res)).to(tl.float32) * h
        py = c0 + ((key // res) % res).to(tl.float32) * h
        pz = c0 + (key % res).to(tl.float32) * h
        d2, feat = _sqdist_feature(px, py, pz, ax, ay, az, bx, by, bz, cx, cy, cz)
        marked = key | ((d2 >= r2).to(tl.int64) << 30)  # outside the band: at or after 2^30, past every key
        bits = d2.to(tl.int32, bitcast=True).to(tl.int64)
        if CLOSEST:
            tl.store(key_ptr + at + j, marked, mask=mj)
            tl.store(word_ptr + at + j, (bits << 32) | (owner | feat).to(tl.int64), mask=mj)
        else:
            tl.store(word_ptr + at + j, (marked << 32) | bits, mask=mj)
        key += sw


def point_triangle_sqdist_triton(
    points: torch.Tensor, triangles: torch.Tensor, tri_index: torch.Tensor, block: int = 1024
) -> tuple[torch.Tensor, torch.Tensor]:
    """points (N,3) float32, triangles (F,3,3) float32, tri_index (N,) int -> (d2 (N,), feature (N,) uint8)."""
    pts = points.contiguous()
    tri = triangles.reshape(-1, 9).contiguous()
    idx = tri_index.contiguous()
    n = pts.shape[0]
    d2 = torch.empty(n, dtype=torch.float32, device=pts.device)
    feat = torch.empty(n, dtype=torch.uint8, device=pts.device)
    if n:
        _point_triangle_kernel[(triton.cdiv(n, block),)](pts, tri, idx, d2, feat, n, BLOCK=block)
    return d2, feat


def column_candidates_triton(
    triangles: torch.Tensor, stride: torch.Tensor, col_t: torch.Tensor, iu: torch.Tensor, iv: torch.Tensor,
    w_lo: torch.Tensor, count: torch.Tensor, res: int, r2: float, max_count: int, closest: bool,
    block: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """See kernels.distance.column_candidates; one launch for every column. block: columns per program
    (default 256; 8192 in Triton's interpreter, which pays ~30 ms per program)."""
    block = block or (8192 if os.environ.get("TRITON_INTERPRET") == "1" else 256)
    tri = triangles.float().reshape(-1, 9).contiguous()
    n = col_t.numel()
    end = torch.cumsum(count, 0)
    total = int(end[-1]) if n else 0  # the one host read: the output's size
    start = end - count
    key = torch.empty(total if closest else 0, dtype=torch.int64, device=tri.device)
    word = torch.empty(total, dtype=torch.int64, device=tri.device)
    if total:
        h = 2.0 / res
        _column_candidates_kernel[(triton.cdiv(n, block),)](
            tri, stride.contiguous(), col_t.contiguous(), iu.contiguous(), iv.contiguous(), w_lo.contiguous(),
            count.contiguous(), start, key, word, n, tri.shape[0], res, -1.0 + 0.5 * h, h, r2, max_count,
            CLOSEST=closest, BLOCK=block)
    return (key if closest else None), word
