"""A fixed (parameter-free) sparse latent: each /8 latent voxel holds 2³ sub-cell statistics of the SDF.

16 channels per latent voxel, like the SS-VAE's latent: for each of the 2³ sub-cells (4³ voxels) the
mean clipped SDF of its band voxels (+1 where it has none) and its band fill (fraction, mapped to
[-1, 1]). It lets the SS-DiT train and sample on real shapes without a trained SS-VAE (debug runs,
tests, the demo); its decoder returns surface points, which is what a Chamfer check needs.
"""
from __future__ import annotations

import torch

DOWN = 8
SUB = 2  # sub-cells per axis inside one latent voxel
CHANNELS = 2 * SUB ** 3


def encode(coords: torch.Tensor, sdf: torch.Tensor):
    """Voxel coords (N, 3) int and clipped SDF (N,) -> latent coords (M, 3) int32, feats (M, 16)."""
    coords = coords.long()
    latent, inverse = torch.unique(coords // DOWN, dim=0, return_inverse=True)
    sub = (coords % DOWN) // (DOWN // SUB)
    cell = inverse * SUB ** 3 + (sub[:, 0] * SUB + sub[:, 1]) * SUB + sub[:, 2]
    m = latent.shape[0] * SUB ** 3
    count = torch.zeros(m).index_add_(0, cell, torch.ones(len(cell)))
    total = torch.zeros(m).index_add_(0, cell, sdf.float())
    mean_sdf = torch.where(count > 0, total / count.clamp(min=1), torch.ones(m))
    fill = 2 * (count / (DOWN // SUB) ** 3).clamp(max=1) - 1
    feats = torch.cat([mean_sdf.view(-1, SUB ** 3), fill.view(-1, SUB ** 3)], dim=1)
    return latent.int(), feats


def decode_points(latent_coords: torch.Tensor, feats: torch.Tensor, resolution: int,
                  level: float = 0.5) -> torch.Tensor:
    """Surface points (P, 3) in the normalized cube: sub-cells with |mean SDF| < ``level`` and some fill."""
    mean_sdf, fill = feats[:, :SUB ** 3], feats[:, SUB ** 3:]
    keep = (mean_sdf.abs() < level) & (fill > -1 + 1e-3)
    r = torch.arange(SUB)
    offs = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    centers = latent_coords.long()[:, None, :] * DOWN + offs[None] * (DOWN // SUB) + (DOWN // SUB) / 2
    return (-1 + centers[keep].float() * 2 / resolution)


def chamfer(a: torch.Tensor, b: torch.Tensor, chunk: int = 4096) -> float:
    """Symmetric mean nearest-neighbour distance between point sets (P, 3) and (Q, 3)."""
    if len(a) == 0 or len(b) == 0:
        return float("inf")

    def one_way(x, y):
        return torch.cat([torch.cdist(x[i:i + chunk], y).min(dim=1).values for i in range(0, len(x), chunk)]).mean()

    return float(one_way(a, b) + one_way(b, a)) / 2
