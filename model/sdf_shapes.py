"""Analytic shapes as narrow-band sparse SDFs, in the preprocess stage's convention.

Exact signed distance functions (sphere, torus, box, capsule) give test and
training fixtures that cost no mesh processing: voxel coords (N, 3) int32 in
[0, R), sorted by key (i·R + j)·R + k, centre x = −1 + (i + ½)·2/R, value
clip(d / (band·h), −1, 1) with h = 2/R, negative inside.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class AnalyticShape:
    kind: str  # "sphere" | "torus" | "box" | "capsule"
    size: tuple[float, ...]
    rotation: tuple[float, float, float] = (0.0, 0.0, 0.0)  # Euler angles, radians
    offset: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def sdf(self, p: torch.Tensor) -> torch.Tensor:
        """Signed distance of points (N, 3) in the normalised [-1, 1]³ frame."""
        q = (p - torch.tensor(self.offset, dtype=p.dtype, device=p.device)) @ _rotation(self.rotation, p)
        if self.kind == "sphere":
            return q.norm(dim=1) - self.size[0]
        if self.kind == "torus":
            ring = torch.stack([q[:, [0, 2]].norm(dim=1) - self.size[0], q[:, 1]], dim=1)
            return ring.norm(dim=1) - self.size[1]
        if self.kind == "box":
            d = q.abs() - torch.tensor(self.size, dtype=p.dtype, device=p.device)
            return d.clamp(min=0).norm(dim=1) + d.max(dim=1).values.clamp(max=0)
        if self.kind == "capsule":
            half, radius = self.size
            y = q[:, 1].clamp(-half, half)
            return (q - torch.stack([torch.zeros_like(y), y, torch.zeros_like(y)], dim=1)).norm(dim=1) - radius
        raise ValueError(f"AnalyticShape: unknown kind {self.kind!r} (sphere, torus, box, capsule)")


def _rotation(angles: tuple[float, float, float], like: torch.Tensor) -> torch.Tensor:
    a, b, c = angles
    rx = torch.tensor([[1, 0, 0], [0, math.cos(a), -math.sin(a)], [0, math.sin(a), math.cos(a)]])
    ry = torch.tensor([[math.cos(b), 0, math.sin(b)], [0, 1, 0], [-math.sin(b), 0, math.cos(b)]])
    rz = torch.tensor([[math.cos(c), -math.sin(c), 0], [math.sin(c), math.cos(c), 0], [0, 0, 1]])
    return (rz @ ry @ rx).to(like)


def voxel_centres(coords: torch.Tensor, resolution: int) -> torch.Tensor:
    return -1.0 + (coords.double() + 0.5) * (2.0 / resolution)


def narrow_band(shape: AnalyticShape, resolution: int, band: float = 2.0, block: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse SDF of ``shape``: (coords (N, 3) int32 sorted by key, values (N,) float32).

    Blocks of ``block``³ voxels are kept only where the distance at the block
    centre allows a band voxel inside (SDFs are 1-Lipschitz), so no dense R³
    array is built.
    """
    if resolution % block:
        raise ValueError(f"narrow_band: resolution {resolution} is not a multiple of block {block}")
    h = 2.0 / resolution
    nb = resolution // block
    r = torch.arange(nb)
    blocks = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    centres = -1.0 + (blocks.double() + 0.5) * (2.0 / nb)
    reach = math.sqrt(3) * block * h / 2 + band * h
    blocks = blocks[shape.sdf(centres).abs() < reach]
    o = torch.arange(block)
    inner = torch.stack(torch.meshgrid(o, o, o, indexing="ij"), -1).reshape(-1, 3)
    coords = (blocks[:, None, :] * block + inner).reshape(-1, 3)
    d = shape.sdf(voxel_centres(coords, resolution))
    keep = d.abs() < band * h
    coords, d = coords[keep], d[keep]
    order = torch.argsort((coords[:, 0] * resolution + coords[:, 1]) * resolution + coords[:, 2])
    values = (d[order] / (band * h)).clamp(-1, 1).float()
    return coords[order].to(torch.int32).contiguous(), values


def random_shape(generator: torch.Generator) -> AnalyticShape:
    """A random sphere, torus, box or capsule that fits inside [-0.95, 0.95]³."""
    u = lambda lo, hi: float(lo + (hi - lo) * torch.rand((), generator=generator))  # noqa: E731
    kind = ["sphere", "torus", "box", "capsule"][int(torch.randint(4, (), generator=generator))]
    rot = (u(0, math.pi), u(0, math.pi), u(0, math.pi))
    off = (u(-0.1, 0.1), u(-0.1, 0.1), u(-0.1, 0.1))
    if kind == "sphere":
        return AnalyticShape(kind, (u(0.4, 0.8),), rot, off)
    if kind == "torus":
        return AnalyticShape(kind, (u(0.4, 0.55), u(0.12, 0.25)), rot, off)
    if kind == "box":
        return AnalyticShape(kind, (u(0.25, 0.45), u(0.25, 0.45), u(0.25, 0.45)), rot, off)
    return AnalyticShape(kind, (u(0.2, 0.4), u(0.15, 0.3)), rot, off)
