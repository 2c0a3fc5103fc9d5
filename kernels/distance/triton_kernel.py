"""Triton kernel: squared distance from points to one indexed triangle each, with the closest feature.

One program handles BLOCK (point, triangle) pairs; the region tests mirror
reference.point_triangle_sqdist_reference line for line.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _point_triangle_kernel(
    pts_ptr, tri_ptr, idx_ptr, d2_ptr, feat_ptr, n, BLOCK: tl.constexpr
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    px = tl.load(pts_ptr + offs * 3 + 0, mask=m, other=0.0)
    py = tl.load(pts_ptr + offs * 3 + 1, mask=m, other=0.0)
    pz = tl.load(pts_ptr + offs * 3 + 2, mask=m, other=0.0)
    t = tl.load(idx_ptr + offs, mask=m, other=0).to(tl.int64) * 9
    ax = tl.load(tri_ptr + t + 0, mask=m, other=0.0)
    ay = tl.load(tri_ptr + t + 1, mask=m, other=0.0)
    az = tl.load(tri_ptr + t + 2, mask=m, other=0.0)
    bx = tl.load(tri_ptr + t + 3, mask=m, other=0.0)
    by = tl.load(tri_ptr + t + 4, mask=m, other=0.0)
    bz = tl.load(tri_ptr + t + 5, mask=m, other=0.0)
    cx = tl.load(tri_ptr + t + 6, mask=m, other=0.0)
    cy = tl.load(tri_ptr + t + 7, mask=m, other=0.0)
    cz = tl.load(tri_ptr + t + 8, mask=m, other=0.0)

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
    feat = tl.zeros([BLOCK], dtype=tl.int32)
    den_bc = (d4 - d3) + (d5 - d6)
    t_bc = (d4 - d3) / tl.where(in_bc & (den_bc != 0), den_bc, 1.0)
    wb = tl.where(in_bc, 1.0 - t_bc, wb)
    wc = tl.where(in_bc, t_bc, wc)
    feat = tl.where(in_bc, 2, feat)
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
    tl.store(d2_ptr + offs, dx * dx + dy * dy + dz * dz, mask=m)
    tl.store(feat_ptr + offs, feat.to(tl.uint8), mask=m)


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
