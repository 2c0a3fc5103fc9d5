"""Dense structure stage (DESIGN.md): 64³ occupancy <-> 16³×8 latent VAE and a DiT over its 4,096 tokens.

The structure DiT is the SS-DiT run on the full 16³ grid (every shape has the same tokens, so
attention runs batched): one token per latent voxel (8 channels, 4,096 tokens: the paper's network)
or one per p³ patch of latent voxels (8·p³ channels, (16/p)³ tokens; the debug network uses p = 2,
512 tokens, which trains several times faster per step on a CPU). The patch follows from the
network's input width, so checkpoints need no extra field. Decoded occupancy (sigmoid >= 0.1) gives
the sparse latent voxels of the sparse stage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from model.dit import DiTConfig, with_overrides

GRID = 64
LATENT_GRID = 16
LATENT_CHANNELS = 8


@dataclass(frozen=True)
class StructureVAEConfig:
    channels: tuple = (32, 128, 256)
    latent_channels: int = LATENT_CHANNELS
    kl_weight: float = 1e-3
    dice_weight: float = 1.0
    # The decoder's output bias starts at logit(prior): the first steps need not move every logit of the
    # ~88% empty voxels from 0 (sigmoid 0.5, above the 0.1 threshold) down to the class prior.
    occupancy_prior: float = 0.12
    # The posterior starts narrow (std e^(-3/2)) so the decoder sees the encoder's mean, not unit noise.
    logvar_init: float = -3.0

    @classmethod
    def named(cls, name: str, **overrides) -> "StructureVAEConfig":
        if name not in STRUCTURE_VAE_CONFIGS:
            raise ValueError(f"unknown structure VAE config {name!r}; expected one of {sorted(STRUCTURE_VAE_CONFIGS)}")
        return with_overrides(STRUCTURE_VAE_CONFIGS[name], overrides)


STRUCTURE_VAE_CONFIGS = {"debug": StructureVAEConfig(channels=(4, 8, 16)), "paper": StructureVAEConfig()}

STRUCTURE_DIT_CONFIGS = {
    # 2³ patches: 512 tokens of 64 channels (see the module docstring), on an 8³ grid with learned positions
    # and the image's 64 tokens (the built-in encoder's) mapped to every cell (DiTConfig; docs/generate.md)
    "debug": DiTConfig(depth=2, width=64, heads=4, kv_heads=2, head_dim=16, cond_dim=64,
                       in_channels=LATENT_CHANNELS * 8, out_channels=LATENT_CHANNELS * 8, grid_positions=8,
                       grid_condition_tokens=64),
    "paper": DiTConfig(depth=24, width=1024, heads=16, kv_heads=16, head_dim=64,
                       in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS),
}


def structure_dit_config(name: str, **overrides) -> DiTConfig:
    if name not in STRUCTURE_DIT_CONFIGS:
        raise ValueError(f"unknown structure DiT config {name!r}; expected one of {sorted(STRUCTURE_DIT_CONFIGS)}")
    return with_overrides(STRUCTURE_DIT_CONFIGS[name], overrides)


class ResBlock3d(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.body = nn.Sequential(nn.GroupNorm(min(8, c), c), nn.SiLU(), nn.Conv3d(c, c, 3, padding=1),
                                  nn.GroupNorm(min(8, c), c), nn.SiLU(), nn.Conv3d(c, c, 3, padding=1))

    def forward(self, x):
        return x + self.body(x)


class StructureVAE(nn.Module):
    """64³ occupancy (B, 1, 64, 64, 64) <-> latent (B, 8, 16, 16, 16); decoder returns logits."""

    def __init__(self, cfg: StructureVAEConfig = StructureVAEConfig()):
        super().__init__()
        self.cfg = cfg
        c0, c1, c2 = cfg.channels
        self.encoder = nn.Sequential(
            nn.Conv3d(1, c0, 3, padding=1), ResBlock3d(c0),
            nn.Conv3d(c0, c1, 4, stride=2, padding=1), ResBlock3d(c1),
            nn.Conv3d(c1, c2, 4, stride=2, padding=1), ResBlock3d(c2),
            nn.GroupNorm(min(8, c2), c2), nn.SiLU(), nn.Conv3d(c2, 2 * cfg.latent_channels, 1))
        self.decoder = nn.Sequential(
            nn.Conv3d(cfg.latent_channels, c2, 3, padding=1), ResBlock3d(c2),
            nn.ConvTranspose3d(c2, c1, 4, stride=2, padding=1), ResBlock3d(c1),
            nn.ConvTranspose3d(c1, c0, 4, stride=2, padding=1), ResBlock3d(c0),
            nn.GroupNorm(min(8, c0), c0), nn.SiLU(), nn.Conv3d(c0, 1, 3, padding=1))
        if not 0 < cfg.occupancy_prior < 1:
            raise ValueError(f"occupancy_prior: must be in (0, 1), got {cfg.occupancy_prior}")
        with torch.no_grad():
            self.decoder[-1].bias.fill_(math.log(cfg.occupancy_prior / (1 - cfg.occupancy_prior)))
            self.encoder[-1].bias[cfg.latent_channels:].fill_(cfg.logvar_init)

    def encode(self, occ: torch.Tensor, sample: bool = False):
        mean, logvar = self.encoder(occ.to(self.encoder[0].weight.dtype)).chunk(2, dim=1)
        logvar = logvar.clamp(-30, 20)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return z, mean, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z)

    def loss(self, occ: torch.Tensor):
        """Binary cross-entropy + soft Dice (the shell is ~1% of the grid) + KL; returns (loss, parts)."""
        z, mean, logvar = self.encode(occ, sample=True)
        logits = self.decode(z).float()
        target = occ.float()
        bce = F.binary_cross_entropy_with_logits(logits, target)
        p = torch.sigmoid(logits)
        dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
        kl = 0.5 * torch.mean(mean.float() ** 2 + logvar.float().exp() - 1 - logvar.float())
        total = bce + self.cfg.dice_weight * dice + self.cfg.kl_weight * kl
        return total, {"bce": bce.detach(), "dice": dice.detach(), "kl": kl.detach()}


def occupancy_grid(coords: torch.Tensor, resolution: int, grid: int = GRID) -> torch.Tensor:
    """Voxel coords (N, 3) of a ``resolution``³ grid -> bool occupancy (grid, grid, grid)."""
    if resolution % grid:
        raise ValueError(f"resolution {resolution} is not a multiple of the occupancy grid {grid}")
    c = (coords.long() // (resolution // grid)).clamp_(0, grid - 1)
    occ = torch.zeros(grid, grid, grid, dtype=torch.bool)
    occ[c[:, 0], c[:, 1], c[:, 2]] = True
    return occ


def structure_patch(cfg: DiTConfig, latent_channels: int = LATENT_CHANNELS) -> int:
    """Latent voxels per token side of a structure DiT: p with in_channels = latent_channels·p³ (p divides 16)."""
    for p in (1, 2, 4, 8, 16):
        if cfg.in_channels == latent_channels * p ** 3 and cfg.out_channels == cfg.in_channels:
            if cfg.grid_positions and cfg.grid_positions != LATENT_GRID // p:
                raise ValueError(f"structure DiT: grid_positions {cfg.grid_positions} does not match its token grid "
                                 f"({LATENT_GRID // p}³ tokens of {p}³ latent voxels)")
            return p
    raise ValueError(f"structure DiT: in/out channels {cfg.in_channels}/{cfg.out_channels} are not "
                     f"{latent_channels}·p³ (the structure latent's channels times a patch p³, p dividing {LATENT_GRID})")


def tokens_per_shape(patch: int = 1) -> int:
    return (LATENT_GRID // patch) ** 3


def latent_grid_coords(device=None, patch: int = 1) -> torch.Tensor:
    """Token coords of the 16³ latent in p³ patches ((16/p)³ of them), in the order of ``latent_to_tokens``."""
    r = torch.arange(LATENT_GRID // patch, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


def latent_to_tokens(z: torch.Tensor, patch: int = 1) -> torch.Tensor:
    """(B, C, 16, 16, 16) -> (B·(16/p)³, C·p³) packed tokens, a p³ patch per token."""
    b, c, g = z.shape[0], z.shape[1], LATENT_GRID // patch
    z = z.reshape(b, c, g, patch, g, patch, g, patch)
    # token (i, j, k) holds channels in (c, di, dj, dk) order
    return z.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b * g ** 3, c * patch ** 3)


def tokens_to_latent(tokens: torch.Tensor, batch: int, patch: int = 1) -> torch.Tensor:
    """Inverse of ``latent_to_tokens``."""
    g = LATENT_GRID // patch
    c = tokens.shape[-1] // patch ** 3
    z = tokens.reshape(batch, g, g, g, c, patch, patch, patch)
    return z.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(batch, c, LATENT_GRID, LATENT_GRID, LATENT_GRID)


def occupancy_to_latent_coords(logits: torch.Tensor, latent_resolution: int, threshold: float = 0.1) -> torch.Tensor:
    """Decoded 64³ occupancy logits -> int coords (M, 3) of the sparse stage's latent grid.

    sigmoid >= ``threshold`` marks a voxel (DESIGN.md); each 64³ voxel covers (latent_resolution / 64)³
    latent voxels (64³ at 512³, 128³ at 1024³) or several voxels merge when the latent grid is coarser.
    """
    occ = torch.sigmoid(logits.float().reshape(GRID, GRID, GRID)) >= threshold
    idx = occ.nonzero()
    if latent_resolution >= GRID:
        f = latent_resolution // GRID
        sub = torch.stack(torch.meshgrid(*[torch.arange(f, device=idx.device)] * 3, indexing="ij"), -1).reshape(-1, 3)
        return (idx[:, None, :] * f + sub[None]).reshape(-1, 3).int()
    return torch.unique(idx // (GRID // latent_resolution), dim=0).int()
