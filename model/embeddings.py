"""Sinusoidal embeddings: diffusion timesteps and absolute 3D voxel positions (SS-DiT, DESIGN.md)."""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Map a float tensor (...,) to (..., dim) with interleaved cos/sin of geometric frequencies."""
    if dim % 2:
        raise ValueError(f"sinusoidal embedding dim must be even, got {dim}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[..., None] * freqs
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def position_embedding_3d(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Absolute 3D sinusoidal positions: (N, 3) integer voxel coords -> (N, dim).

    Each axis gets an equal, even share of the channels; leftover channels stay zero so any
    width works (1024 = 3 x 340 + 4).
    """
    if coords.ndim != 2 or coords.shape[1] != 3:
        raise ValueError(f"coords must be (N, 3), got {tuple(coords.shape)}")
    per_axis = (dim // 3) // 2 * 2
    parts = [sinusoidal(coords[:, i], per_axis) for i in range(3)]
    out = torch.cat(parts, dim=-1)
    if out.shape[1] < dim:
        out = torch.nn.functional.pad(out, (0, dim - out.shape[1]))
    return out


class TimestepEmbedder(nn.Module):
    """Timestep t in [0, 1] -> width-dim vector: sinusoid of 1000·t then a two-layer MLP (DiT adaLN input)."""

    def __init__(self, width: int, frequency_dim: int = 256):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        # Scaling by 1000 keeps the frequency range of the discrete-step DiT embeddings.
        emb = sinusoidal(t * 1000.0, self.frequency_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))
