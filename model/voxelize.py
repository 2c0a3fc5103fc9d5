"""Latent voxels of the 1024 stage from the 512 stage's mesh (Direct3D-S2 §3.4, the release's ``mesh2index``).

The released generator normalises the first mesh (bounding-box centre to the origin, longest side
2·0.95), halves it into [-0.5, 0.5]³, and keeps the grid points x = i/(R−1) − 0.5 (i = 0..R−1) whose
unsigned distance to the surface is below ``threshold``/R (4 voxels at R = 1024); each kept point's
index divided by 8 is a latent voxel. Here each triangle visits only the grid points of its bounding
box grown by ⌊threshold⌋ + 1, the distances come from the point-to-triangle kernel, and the work goes
in chunks of bounded size, so no R³ array is ever made.
"""
from __future__ import annotations

import numpy as np
import torch

from kernels.distance import point_triangle_sqdist


def normalize_vertices(vertices: np.ndarray, scale: float = 0.95) -> np.ndarray:
    """Bounding-box centre to the origin, longest side to 2·scale (the release's normalize_mesh)."""
    lo, hi = vertices.min(0), vertices.max(0)
    extent = float((hi - lo).max())
    if extent <= 0:
        raise ValueError("the mesh has no extent (all vertices coincide)")
    return ((vertices - (lo + hi) / 2) * (2.0 * scale / extent)).astype(np.float32)


@torch.no_grad()
def surface_latent_index(vertices: torch.Tensor, faces: torch.Tensor, size: int = 1024, factor: int = 8,
                         threshold: float = 4.0, max_pairs: int = 1 << 24, backend: str = "auto") -> torch.Tensor:
    """Unique latent coords (M, 3) int32, sorted by key, of the grid points within ``threshold``/size of
    the surface. ``vertices`` (V, 3) in the normalised frame ([-1, 1]³), ``faces`` (F, 3)."""
    if faces.numel() == 0:
        return torch.zeros((0, 3), dtype=torch.int32, device=vertices.device)
    dev = vertices.device
    tri = (vertices.float() * 0.5)[faces.long()]  # (F, 3, 3) in [-0.5, 0.5]³
    reach = int(threshold + 1)
    lo = torch.floor((tri.amin(1) + 0.5) * (size - 1)).long().clamp(0, size - 1) - reach
    hi = torch.floor((tri.amax(1) + 0.5) * (size - 1)).long().clamp(0, size - 1) + reach
    lo, hi = lo.clamp(0, size - 1), hi.clamp(0, size - 1)
    ext = hi - lo + 1  # (F, 3)
    counts = ext.prod(1)
    limit = (threshold / size) ** 2
    lat = size // factor
    keys = []
    start = 0
    ends = torch.cumsum(counts, 0)
    while start < len(counts):
        # as many triangles as fit in max_pairs (at least one)
        base = int(ends[start - 1]) if start else 0
        stop = int(torch.searchsorted(ends, torch.tensor(base + max_pairs, device=ends.device), right=True))
        stop = max(stop, start + 1)
        cnt = counts[start:stop]
        tri_id = torch.repeat_interleave(torch.arange(start, stop, device=dev), cnt)
        first = torch.cumsum(cnt, 0) - cnt
        local = torch.arange(int(cnt.sum()), device=dev) - torch.repeat_interleave(first, cnt)
        e = ext[tri_id]
        k = local % e[:, 2]
        j = (local // e[:, 2]) % e[:, 1]
        i = local // (e[:, 2] * e[:, 1])
        ijk = lo[tri_id] + torch.stack([i, j, k], 1)
        points = ijk.float() / (size - 1) - 0.5
        d2, _ = point_triangle_sqdist(points, tri, tri_id, backend=backend)
        near = ijk[d2 < limit] // factor
        keys.append(torch.unique((near[:, 0] * lat + near[:, 1]) * lat + near[:, 2]))
        start = stop
    key = torch.unique(torch.cat(keys))
    return torch.stack([key // (lat * lat), (key // lat) % lat, key % lat], 1).int()
