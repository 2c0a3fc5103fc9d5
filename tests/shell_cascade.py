"""Untrained networks at realistic token counts, for speed and memory measurements (a benchmark fixture).

Random weights give random occupancy (about half of the 64³ structure grid) and random SDFs (sign
changes everywhere), so an untrained cascade would run its sparse stages on far more tokens than a
real shape has and march a meaningless surface. ``ShellCascade`` keeps every network's real work and
cost but fixes the geometry: the structure stage runs, then its occupancy is replaced by a sphere shell
holding about the paper's token count (10.7k latent voxels at 512, 46k at 1024, DESIGN.md); the
decoders run, then their SDF is replaced by the sphere's on the same voxels, so marching and clean-up
see a surface of realistic size. ``benchmarks/generate.py`` uses it; nothing the Serve app or the
``s2`` command loads can reach it (it lives with the tests, outside the installed packages).
"""
from __future__ import annotations

import math

import torch

from model.cascade import Cascade, pooled_sdf
from model.sparse import SparseTensor

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

    def refine_coords(self, mesh):
        latent_res = self.cfg.refine_resolution // 8
        return shell(latent_res, self._tokens(self.cfg.refine_resolution)).to(self.device)

    @torch.no_grad()
    def decode(self, vae, coords_list, latents, latent_res, refiner=None, refiner_level=None):
        """Every decoder and refiner runs on its real input size; the field they hand on is the shell's."""
        radius = self._radius(latent_res)
        if vae is None:
            decoded = [pooled_sdf(c, z, latent_res) for c, z in zip(coords_list, latents)]
        else:
            decoded = []
            for c, z in zip(coords_list, latents):
                st = SparseTensor.from_samples([c], [vae.unscale(z.to(self.device, torch.float32))], latent_res,
                                               self.device)
                wants_feat = refiner is not None and refiner.config.kind == "sdf"
                dec = vae.decode(st, chunk=self.cfg.decode_chunk, return_feat=wants_feat)
                sdf, feat = dec if wants_feat else (dec, None)
                coords, res = sdf.coords[:, 1:], sdf.resolution
                if refiner is not None:  # the refiner's networks run on the shell's field; their output is dropped
                    values = sphere_values(coords, res, radius)
                    if refiner.config.kind == "sdf":
                        refiner.refine_sdf(coords, values, feat.feats)
                    else:
                        refiner.refine_sign(coords, values)
                    res = refiner.config.output_res
                    coords = shell_band(res, radius, device=coords.device)
                decoded.append((coords, None, res))
        out = []
        for coords, _, res in decoded:
            values = sphere_values(coords, res, radius)
            keep = values.abs() < 0.999
            out.append((coords[keep], values[keep], res, 0.0, None))
        return out


def shell_band(res: int, radius: float, band: float = 2.0, device=None) -> torch.Tensor:
    """Voxel coords (N, 3) within ``band`` voxels of the sphere of ``radius`` (normalised units) at ``res``."""
    h = 2.0 / res
    lo = max(0, int((1 - radius - band * h) / h) - 1)
    hi = min(res, int((1 + radius + band * h) / h) + 2)
    r = torch.arange(lo, hi, device=device)
    out = []
    for i in r:  # one slab at a time: no res³ array
        jk = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2)
        c = torch.cat([torch.full((len(jk), 1), int(i), device=device), jk], 1)
        d = sphere_values(c, res, radius) * band  # in voxels, clipped to the band
        out.append(c[d.abs() < band])
    return torch.cat(out).int()
