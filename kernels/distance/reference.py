"""Plain PyTorch reference for point-to-triangle squared distance with the closest feature.

Region logic follows the Voronoi-region test of Ericson, Real-Time Collision
Detection, 5.1.5, written branch-free so it vectorizes over pairs.
"""

from __future__ import annotations

import torch

# Closest-feature codes shared by the reference, the Triton kernel and the sign code.
FACE, EDGE_AB, EDGE_BC, EDGE_CA, VERT_A, VERT_B, VERT_C = range(7)


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x * y).sum(-1)


def point_triangle_sqdist_reference(
    points: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance from points[n] to triangle (a[n], b[n], c[n]) and the closest feature code.

    All inputs are (N, 3) of one float dtype; returns (d2 (N,), feature (N,) uint8).
    """
    diff, feature = point_triangle_offset_reference(points, a, b, c)
    return _dot(diff, diff), feature


def point_triangle_offset_reference(
    points: torch.Tensor, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """points minus their closest points on the triangles (N,3), and the closest feature code."""
    ab, ac, ap = b - a, c - a, points - a
    d1, d2 = _dot(ab, ap), _dot(ac, ap)
    bp = points - b
    d3, d4 = _dot(ab, bp), _dot(ac, bp)
    cp = points - c
    d5, d6 = _dot(ab, cp), _dot(ac, cp)
    va = d3 * d6 - d5 * d4
    vb = d5 * d2 - d1 * d6
    vc = d1 * d4 - d3 * d2

    in_a = (d1 <= 0) & (d2 <= 0)
    in_b = (d3 >= 0) & (d4 <= d3)
    in_ab = (vc <= 0) & (d1 >= 0) & (d3 <= 0)
    in_c = (d6 >= 0) & (d5 <= d6)
    in_ac = (vb <= 0) & (d2 >= 0) & (d6 <= 0)
    in_bc = (va <= 0) & ((d4 - d3) >= 0) & ((d5 - d6) >= 0)

    # Face region by default; the earlier tests in Ericson's order take priority.
    denom = va + vb + vc
    safe = torch.where(denom != 0, denom, torch.ones_like(denom))
    v = vb / safe
    w = vc / safe
    t_ab = d1 / torch.where(in_ab & (d1 != d3), d1 - d3, torch.ones_like(d1))
    t_ac = d2 / torch.where(in_ac & (d2 != d6), d2 - d6, torch.ones_like(d2))
    den_bc = (d4 - d3) + (d5 - d6)
    t_bc = (d4 - d3) / torch.where(in_bc & (den_bc != 0), den_bc, torch.ones_like(den_bc))

    # Barycentric weights (on b, on c) of the closest point; a gets the rest.
    wb = v
    wc = w
    feature = torch.full_like(d1, FACE, dtype=torch.uint8)
    for mask, nb, nc, code in (
        (in_bc, 1 - t_bc, t_bc, EDGE_BC),
        (in_ac, torch.zeros_like(t_ac), t_ac, EDGE_CA),
        (in_c, torch.zeros_like(d1), torch.ones_like(d1), VERT_C),
        (in_ab, t_ab, torch.zeros_like(t_ab), EDGE_AB),
        (in_b, torch.ones_like(d1), torch.zeros_like(d1), VERT_B),
        (in_a, torch.zeros_like(d1), torch.zeros_like(d1), VERT_A),
    ):
        wb = torch.where(mask, nb, wb)
        wc = torch.where(mask, nc, wc)
        feature = torch.where(mask, torch.full_like(feature, code), feature)
    return ap - wb.unsqueeze(-1) * ab - wc.unsqueeze(-1) * ac, feature


def column_candidates_reference(
    triangles: torch.Tensor, stride: torch.Tensor, col_t: torch.Tensor, iu: torch.Tensor, iv: torch.Tensor,
    w_lo: torch.Tensor, count: torch.Tensor, res: int, r2: float, closest: bool,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """See kernels.distance.column_candidates."""
    n = col_t.numel()
    col = torch.repeat_interleave(torch.arange(n, device=count.device), count)
    step = torch.arange(col.numel(), device=count.device) - (torch.cumsum(count, 0) - count)[col]
    t = col_t[col]
    st = stride[:, t]
    key = iu[col] * st[0] + iv[col] * st[1] + (w_lo[col] + step) * st[2]
    h = 2.0 / res
    xyz = torch.stack([key // (res * res), key // res % res, key % res], 1)
    pts = (-1.0 + 0.5 * h) + xyz.to(torch.float32) * h
    tri = triangles.float()[t]
    d2, feat = point_triangle_sqdist_reference(pts, tri[:, 0], tri[:, 1], tri[:, 2])
    key = key | ((d2 >= r2).to(torch.int64) << 30)
    bits = d2.view(torch.int32).to(torch.int64)
    if closest:
        return key, (bits << 32) | ((t.to(torch.int32) << 3) | feat.to(torch.int32)).to(torch.int64)
    return None, (key << 32) | bits
