"""Point-to-triangle squared distance with the closest feature (face, edge or vertex).

`point_triangle_sqdist` is the public, autograd-free entry: the Triton kernel on
CUDA tensors (or anywhere when TRITON_INTERPRET=1 and backend="triton"), the
plain PyTorch reference otherwise.
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
    point_triangle_sqdist_reference,
)

__all__ = [
    "FACE", "EDGE_AB", "EDGE_BC", "EDGE_CA", "VERT_A", "VERT_B", "VERT_C",
    "point_triangle_sqdist", "point_triangle_sqdist_reference",
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
