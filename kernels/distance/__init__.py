"""Point-to-triangle squared distance with the closest feature (face, edge or vertex).

`point_triangle_sqdist` and `column_candidates` (the narrow band's voxels of whole grid columns)
are the public, autograd-free entries: the Triton kernel on CUDA tensors (or anywhere when
TRITON_INTERPRET=1 and backend="triton"), the plain PyTorch reference otherwise.
"""

from __future__ import annotations

import torch

from kernels.distance.reference import (
    EDGE_AB,
    EDGE_BC,
    EDGE_CA,
    FACE,
    VERT_A,
    VERT_B,
    VERT_C,
    column_candidates_reference,
    point_triangle_sqdist_reference,
)

__all__ = [
    "FACE", "EDGE_AB", "EDGE_BC", "EDGE_CA", "VERT_A", "VERT_B", "VERT_C",
    "column_candidates", "column_candidates_reference", "point_triangle_sqdist", "point_triangle_sqdist_reference",
]


@torch.no_grad()
def point_triangle_sqdist(
    points: torch.Tensor, triangles: torch.Tensor, tri_index: torch.Tensor, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Squared distance from points[n] (N,3) to triangles[tri_index[n]] ((F,3,3)) and its feature code.

    backend: "auto" (Triton on CUDA, PyTorch elsewhere), "triton" or "torch".
    Returns d2 (N,) float32 and feature (N,) uint8 (see the FACE/EDGE_*/VERT_* codes).
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown distance backend {backend!r}: expected auto, triton or torch")
    if points.ndim != 2 or points.shape[1] != 3 or triangles.shape[1:] != (3, 3):
        raise ValueError(
            f"expected points (N,3) and triangles (F,3,3), got {tuple(points.shape)} and {tuple(triangles.shape)}"
        )
    if tri_index.shape != points.shape[:1]:
        raise ValueError(f"tri_index must have shape ({points.shape[0]},), got {tuple(tri_index.shape)}")
    use_triton = backend == "triton" or (backend == "auto" and points.is_cuda)
    points = points.float()
    triangles = triangles.float()
    if use_triton:
        from kernels.distance.triton_kernel import point_triangle_sqdist_triton

        return point_triangle_sqdist_triton(points, triangles, tri_index)
    tri = triangles[tri_index]
    return point_triangle_sqdist_reference(points, tri[:, 0], tri[:, 1], tri[:, 2])


@torch.no_grad()
def column_candidates(
    triangles: torch.Tensor, stride: torch.Tensor, col_t: torch.Tensor, iu: torch.Tensor, iv: torch.Tensor,
    w_lo: torch.Tensor, count: torch.Tensor, res: int, band: float, closest: bool = True, backend: str = "auto",
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Squared distances from the voxel centres of grid columns to one triangle each, packed for a sort.

    Column c holds the voxels iu[c] * stride[0, t] + iv[c] * stride[1, t] + (w_lo[c] + j) * stride[2, t],
    j < count[c], of the res^3 grid (linear keys (i*res + j)*res + k < 2^30; centres -1 + (i + 0.5) 2/res),
    against triangle t = col_t[c] of triangles (F,3,3); stride (3, F) int64. count[c] must not exceed
    max_column_voxels(band). Returns per voxel, columns in order, with key | 2^30 where d2 >= (band * 2/res)^2:
    closest: (key, d2 bits << 32 | t << 3 | feature); else (None, key << 32 | d2 bits), all int64.
    """
    if backend not in ("auto", "triton", "torch"):
        raise ValueError(f"unknown distance backend {backend!r}: expected auto, triton or torch")
    r = band * 2.0 / res
    if backend == "triton" or (backend == "auto" and col_t.is_cuda):
        from kernels.distance.triton_kernel import column_candidates_triton

        return column_candidates_triton(triangles, stride, col_t, iu, iv, w_lo, count, res, r * r,
                                        max_column_voxels(band), closest)
    return column_candidates_reference(triangles, stride, col_t, iu, iv, w_lo, count, res, r * r, closest)


def max_column_voxels(band: float) -> int:
    """Most voxels a column of the band search holds: its slab along the dominant axis w is
    2 * band * |n| / |n_w| <= 2 * band * sqrt(3) voxels wide (with a margin for rounding), plus one."""
    return int(2 * band * 3 ** 0.5 * (1 + 1e-6) + 1e-3) + 2
