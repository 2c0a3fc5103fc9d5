"""Untrained networks at realistic token counts, for speed and memory measurements.

Random weights give random occupancy (about half of the 64³ structure grid) and random SDFs (sign
changes everywhere), so an untrained cascade would run its sparse stages on far more tokens than a
real shape has and march a meaningless surface. ``ShellCascade`` keeps every network's real work and
cost but fixes the geometry: the structure stage runs, then its occupancy is replaced by a sphere shell
holding about the paper's token count (10.7k latent voxels at 512, 46k at 1024, DESIGN.md); the
decoders run, then their SDF is replaced by the sphere's on the same voxels, so marching and clean-up
see a surface of realistic size. ``benchmarks/generate.py`` and the Serve app's ``shell_tokens`` use it.
"""
from __future__ import annotations

import math

import torch

from model.cascade import Cascade

TOKENS = {512: 10_700, 1024: 46_000}


def shell_radius(latent_res: int, tokens: int) -> float:
    """Radius (latent voxels) of a sphere whose surface area is about ``tokens`` voxels."""
    return min(math.sqrt(tokens / (4 * math.pi)), latent_res / 2 - 2)


def shell(latent_res: int, tokens: int) -> torch.Tensor:
    """Latent voxels (M, 3) int32 of a sphere shell about one voxel thick holding about ``tokens`` voxels."""
    r = shell_radius(latent_res, tokens)
    ax = torch.arange(latent_res)
    g = torch.stack(torch.meshgrid(ax, ax, ax, indexing="ij"), -1).reshape(-1, 3)
    d = ((g.float() + 0.5 - latent_res / 2).norm(dim=1) - r).abs()
    return g[d < 0.5 + 0.5 * max(0.0, tokens / (4 * math.pi * r * r) - 1)].int()


def sphere_values(coords: torch.Tensor, res: int, radius: float) -> torch.Tensor:
    """The sphere's SDF in band units (2 voxels) at the voxel centres; ``radius`` in the normalized cube."""
    p = -1 + (coords.float() + 0.5) * 2 / res
    return ((p.norm(dim=1) - radius) / (4.0 / res)).clamp(-1, 1)


class ShellCascade(Cascade):
    """A ``Cascade`` whose geometry is a sphere shell; every network still runs (see the module doc)."""

    tokens: dict[int, int] = TOKENS

    def _tokens(self, resolution: int) -> int:
        counts = {**TOKENS, **self.tokens}
        if resolution not in counts:
            raise ValueError(f"ShellCascade: no token count for resolution {resolution}; set .tokens[{resolution}]")
        return counts[resolution]

    def _radius(self, latent_res: int) -> float:
        """Sphere radius in the normalized cube [-1, 1]³ for the shell at ``latent_res``."""
        return shell_radius(latent_res, self._tokens(latent_res * 8)) * 2 / latent_res

    def structure_stage(self, cond, seeds):
        super().structure_stage(cond, seeds)  # its time and memory count; its occupancy does not
        latent_res = self.cfg.resolution // 8
        s = shell(latent_res, self._tokens(self.cfg.resolution)).to(self.device)
        return [s.clone() for _ in seeds]

    def refine_coords(self, sdf):
        latent_res = self.cfg.refine_resolution // 8
        return shell(latent_res, self._tokens(self.cfg.refine_resolution)).to(self.device)

    def decode(self, vae, coords_list, latents, latent_res, prune: bool = True):
        out = []
        for coords, _, res in super().decode(vae, coords_list, latents, latent_res, prune=False):
            values = sphere_values(coords, res, self._radius(latent_res))
            keep = values.abs() < 0.999 if prune else torch.ones_like(values, dtype=torch.bool)
            out.append((coords[keep], values[keep], res))
        return out
