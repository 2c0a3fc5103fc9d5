"""Sinusoidal embeddings of the released Direct3D-S2 networks: diffusion timesteps and absolute 3D positions.

The one module for both: the DiTs (sparse and dense) and the SS-VAE's transformers take their positions
from ``position_embedding_3d``. Both follow the published networks channel for channel, so released
weights see the inputs they were trained on: the timestep embedding is [cos | sin] of geometric
frequencies, the position embedding is [sin | cos] per axis, the three axes side by side, zero-padded
to the width.
"""
from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal(x: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Timestep sinusoid: (...,) -> (..., dim) as [cos(x·f) | sin(x·f)], f_i = max_period^(-i/half).

    An odd ``dim`` gets one zero channel at the end (as the release's timestep embedder)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=x.device, dtype=torch.float32) / half)
    args = x.float()[..., None] * freqs
    out = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        out = torch.nn.functional.pad(out, (0, 1))
    return out


def position_embedding_3d(coords: torch.Tensor, dim: int, factor: float = 1.0, max_period: float = 10000.0
                          ) -> torch.Tensor:
    """Absolute sinusoidal positions: (N, A) coordinates (A = 3 axes) -> (N, dim) float32.

    Each axis gets f = dim // A // 2 frequencies 1 / max_period^(i/f) and contributes [sin(c·f) | cos(c·f)] in axis
    order; the channels left over (1024 = 3 · 340 + 4) stay zero. ``factor`` scales the
    coordinates first: the released 1024³ stage runs its 128³ latent grid at 0.5 so positions span
    the same range as at 512³.
    """
    if coords.ndim != 2:
        raise ValueError(f"coords must be (N, axes), got {tuple(coords.shape)}")
    n, axes = coords.shape
    nf = dim // axes // 2
    freqs = 1.0 / (max_period ** (torch.arange(nf, dtype=torch.float32, device=coords.device) / nf))
    x = coords.float() * factor if factor != 1.0 else coords.float()
    args = torch.outer(x.reshape(-1), freqs)
    out = torch.cat([torch.sin(args), torch.cos(args)], dim=-1).reshape(n, axes * 2 * nf)
    if out.shape[1] < dim:
        out = torch.nn.functional.pad(out, (0, dim - out.shape[1]))
    return out


class TimestepEmbedder(nn.Module):
    """Timestep -> width-dim vector: sinusoid of ``scale``·t, then Linear, SiLU, Linear (keys mlp.0 / mlp.2).

    Our flows run t in [0, 1]; the released networks were trained on t·1000 (their scheduler's
    timesteps), hence ``scale`` = 1000."""

    def __init__(self, width: int, frequency_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.frequency_dim, self.scale = frequency_dim, scale
        self.mlp = nn.Sequential(nn.Linear(frequency_dim, width), nn.SiLU(), nn.Linear(width, width))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal(t.float() * self.scale, self.frequency_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))
