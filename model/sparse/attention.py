"""Sparse 3D shifted-window self-attention and the transformer block built on it.

Voxels are grouped by the window (``window``³ voxels) they fall in, after an
optional shift of the grid by ``shift`` voxels so that alternate blocks mix
across window borders (Direct3D-S2 §3.2: windows of 8 latent voxels).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kernels.sparse_conv import coord_keys

from .layers import SparseLayerNorm
from .tensor import SparseTensor


def window_partition(x: SparseTensor, window: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, L) row index of each window's voxels padded with -1, and a (W, L) validity mask; cached per structure."""
    key = ("window", window, shift)
    if key not in x.cache:
        wc = x.coords.clone()
        wc[:, 1:] = torch.div(wc[:, 1:] + shift, window, rounding_mode="floor")
        wkeys = coord_keys(wc, x.resolution // window + 2)
        wkeys, order = torch.sort(wkeys, stable=True)
        _, counts = torch.unique_consecutive(wkeys, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        win = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
        slot = torch.arange(order.numel(), device=order.device) - starts[win]
        rows = torch.full((counts.numel(), int(counts.max())), -1, dtype=torch.long, device=order.device)
        rows[win, slot] = order
        x.cache[key] = (rows, rows >= 0)
    return x.cache[key]


class SparseWindowAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int, window: int = 8, shift: int = 0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"SparseWindowAttention: dim {dim} is not divisible by num_heads {num_heads}")
        self.dim, self.num_heads, self.window, self.shift = dim, num_heads, window, shift
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.num_channels != self.dim:
            raise ValueError(f"SparseWindowAttention: input has {x.num_channels} channels, layer expects {self.dim}")
        rows, valid = window_partition(x, self.window, self.shift)
        w, length = rows.shape
        hd = self.dim // self.num_heads
        qkv = self.qkv(x.feats)
        padded = qkv[rows.clamp(min=0)] * valid[..., None].to(qkv.dtype)
        q, k, v = padded.reshape(w, length, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        out = out.transpose(1, 2).reshape(w, length, self.dim)[valid]
        result = torch.zeros((len(x), self.dim), dtype=out.dtype, device=out.device).index_copy(0, rows[valid], out)
        return x.replace(self.proj(result))


def sinusoidal_positions(coords: torch.Tensor, dim: int) -> torch.Tensor:
    """Absolute 3D sinusoidal embedding of integer voxel coordinates (N, 3) -> (N, dim)."""
    per_axis = dim // 6 * 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(per_axis // 2, device=coords.device) / max(1, per_axis // 2))
    ang = coords.float()[:, :, None] * freqs  # (N, 3, F)
    emb = torch.cat([ang.sin(), ang.cos()], dim=2).reshape(coords.shape[0], -1)
    return F.pad(emb, (0, dim - emb.shape[1]))


class SparseTransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN x), x + MLP(LN x)."""

    def __init__(self, dim: int, num_heads: int, window: int = 8, shift: int = 0, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = SparseLayerNorm(dim)
        self.attn = SparseWindowAttention(dim, num_heads, window, shift)
        self.norm2 = SparseLayerNorm(dim)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = x.replace(x.feats + self.attn(self.norm1(x)).feats)
        return x.replace(x.feats + self.mlp(self.norm2(x).feats))
