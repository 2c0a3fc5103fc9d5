"""Dense structure stage (DESIGN.md): 64³ occupancy <-> 16³×8 latent VAE and a DiT over that latent.

The networks are the released ones (model/dense_vae.py, model/dense_dit.py); this module names them
for the cascade and the trainer and holds the stage's grid helpers. The DiT samples the latent in the
VAE's normalised space (``StructureVAE.unscale`` maps it back); the decoded occupancy
(sigmoid >= 0.1) gives the sparse latent voxels of the sparse stage.
"""
from __future__ import annotations

import torch

from model.dense_dit import DENSE_DIT_CONFIGS, DenseDiT, DenseDiTConfig
from model.dense_vae import DENSE_VAE_CONFIGS, DenseShapeVAE, DenseVAEConfig

GRID = 64
LATENT_GRID = 16
LATENT_CHANNELS = 8

StructureVAE = DenseShapeVAE
StructureVAEConfig = DenseVAEConfig
StructureDiT = DenseDiT
STRUCTURE_VAE_CONFIGS = DENSE_VAE_CONFIGS
STRUCTURE_DIT_CONFIGS = DENSE_DIT_CONFIGS


def structure_dit_config(name: str, **overrides) -> DenseDiTConfig:
    return DenseDiTConfig.named(name, **overrides)


def check_structure_pair(vae_cfg: DenseVAEConfig, dit_cfg: DenseDiTConfig) -> None:
    """The DiT's latent must be the VAE's: same channels, grid = 64 / the VAE's downsampling."""
    grid = GRID // vae_cfg.downsample
    if dit_cfg.in_channels != vae_cfg.latent_channels or dit_cfg.out_channels != vae_cfg.latent_channels:
        raise ValueError(f"structure DiT has {dit_cfg.in_channels}/{dit_cfg.out_channels} channels, the structure "
                         f"VAE's latent {vae_cfg.latent_channels}")
    if dit_cfg.resolution != grid:
        raise ValueError(f"structure DiT works on a {dit_cfg.resolution}³ latent, the structure VAE's is {grid}³")


def occupancy_grid(coords: torch.Tensor, resolution: int, grid: int = GRID) -> torch.Tensor:
    """Voxel coords (N, 3) of a ``resolution``³ grid -> bool occupancy (grid, grid, grid)."""
    if resolution % grid:
        raise ValueError(f"resolution {resolution} is not a multiple of the occupancy grid {grid}")
    c = (coords.long() // (resolution // grid)).clamp_(0, grid - 1)
    occ = torch.zeros(grid, grid, grid, dtype=torch.bool)
    occ[c[:, 0], c[:, 1], c[:, 2]] = True
    return occ


def occupancy_to_latent_coords(logits: torch.Tensor, latent_resolution: int, threshold: float = 0.1) -> torch.Tensor:
    """Decoded 64³ occupancy logits -> int coords (M, 3) of the sparse stage's latent grid.

    sigmoid >= ``threshold`` marks a voxel (DESIGN.md); each 64³ voxel covers (latent_resolution / 64)³
    latent voxels (1 at 512³, as released) or several voxels merge when the latent grid is coarser.
    """
    return grid_to_latent_coords(occupancy_probabilities(logits) >= threshold, latent_resolution)


def occupancy_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Decoded 64³ occupancy logits (any shape of 64³ elements) -> float32 probabilities (64, 64, 64)."""
    return torch.sigmoid(logits.float().reshape(GRID, GRID, GRID))


def grid_to_latent_coords(occ: torch.Tensor, latent_resolution: int) -> torch.Tensor:
    """Bool 64³ occupancy -> int coords (M, 3) of the latent voxels it touches (see occupancy_to_latent_coords)."""
    idx = occ.nonzero()
    if latent_resolution >= GRID:
        f = latent_resolution // GRID
        sub = torch.stack(torch.meshgrid(*[torch.arange(f, device=idx.device)] * 3, indexing="ij"), -1).reshape(-1, 3)
        return (idx[:, None, :] * f + sub[None]).reshape(-1, 3).int()
    return torch.unique(idx // (GRID // latent_resolution), dim=0).int()


def subcell_side(latent_resolution: int) -> int:
    """Structure voxels along each axis of one latent voxel: 64 / the latent grid (1 at 512³ as released)."""
    if latent_resolution < 1 or latent_resolution > GRID or GRID % latent_resolution:
        raise ValueError(f"a {latent_resolution}³ latent grid does not divide the {GRID}³ structure grid into "
                         "whole sub-cells (it must be a divisor of 64)")
    return GRID // latent_resolution


def subcell_occupancy(occ: torch.Tensor, coords: torch.Tensor, latent_resolution: int) -> torch.Tensor:
    """The 64³ occupancy inside each latent voxel: bool (64, 64, 64) and latent coords (M, 3) -> float
    (M, s³) of 0/1, s = 64 / ``latent_resolution``, the sub-voxels in (x, y, z) order, z fastest.

    A latent grid coarser than the structure grid (the 64³ demo's 16³) keeps the structure stage's finer
    picture for the sparse DiT this way; at the release's sizes s = 1 and every latent voxel reads 1."""
    s = subcell_side(latent_resolution)
    blocks = occ.reshape(latent_resolution, s, latent_resolution, s, latent_resolution, s)
    blocks = blocks.permute(0, 2, 4, 1, 3, 5).reshape(latent_resolution ** 3, s ** 3)
    c = coords.long().to(occ.device)
    if len(c) and (int(c.min()) < 0 or int(c.max()) >= latent_resolution):
        raise ValueError(f"latent coords outside the {latent_resolution}³ grid")
    cell = (c[:, 0] * latent_resolution + c[:, 1]) * latent_resolution + c[:, 2]
    return blocks[cell].float()


def sort_block(coords: torch.Tensor, block_size: int) -> torch.Tensor:
    """Latent voxels (M, 3) in the released order of the sparse stage's tokens: by block of ``block_size``³
    (x, y, z), then by position in the block (x, y, z); the sampler's noise rows follow this order."""
    c = coords.long()
    blk, inb = torch.div(c, block_size, rounding_mode="floor"), c % block_size
    side = int(c.max()) + 1 if len(c) else 1
    key = ((blk[:, 0] * side + blk[:, 1]) * side + blk[:, 2]) * block_size ** 3
    key = key + (inb[:, 0] * block_size + inb[:, 1]) * block_size + inb[:, 2]
    return coords[torch.argsort(key, stable=True)]
