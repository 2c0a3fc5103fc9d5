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
    occ = torch.sigmoid(logits.float().reshape(GRID, GRID, GRID)) >= threshold
    idx = occ.nonzero()
    if latent_resolution >= GRID:
        f = latent_resolution // GRID
        sub = torch.stack(torch.meshgrid(*[torch.arange(f, device=idx.device)] * 3, indexing="ij"), -1).reshape(-1, 3)
        return (idx[:, None, :] * f + sub[None]).reshape(-1, 3).int()
    return torch.unique(idx // (GRID // latent_resolution), dim=0).int()


def sort_block(coords: torch.Tensor, block_size: int) -> torch.Tensor:
    """Latent voxels (M, 3) in the released order of the sparse stage's tokens: by block of ``block_size``³
    (x, y, z), then by position in the block (x, y, z); the sampler's noise rows follow this order."""
    c = coords.long()
    blk, inb = torch.div(c, block_size, rounding_mode="floor"), c % block_size
    side = int(c.max()) + 1 if len(c) else 1
    key = ((blk[:, 0] * side + blk[:, 1]) * side + blk[:, 2]) * block_size ** 3
    key = key + (inb[:, 0] * block_size + inb[:, 1]) * block_size + inb[:, 2]
    return coords[torch.argsort(key, stable=True)]
