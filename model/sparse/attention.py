"""Sparse 3D shifted-window self-attention and the transformer block built on it (the SS-VAE's).

Voxels are grouped by the window (``window``³ voxels) they fall in after the
grid is shifted by ``shift`` voxels, ``(coords + shift) // window``, so that
alternate blocks mix across window borders (Direct3D-S2 §3.2: windows of 8
latent voxels, shift 4 on odd blocks). The block is pre-norm with LayerNorms
without affine parameters (eps 1e-6, float32), a fused qkv projection laid out
(3, heads, head_dim), and a tanh-GELU MLP; parameter names follow the release
(``attn.to_qkv``, ``attn.to_out``, ``mlp.mlp.0``, ``mlp.mlp.2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kernels.sparse_conv import coord_keys

from .tensor import SparseTensor


def window_partition(x: SparseTensor, window: int, shift: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(W, L) row index of each window's voxels padded with -1, and a (W, L) validity mask; cached per structure."""
    key = ("window", window, shift)
    if key not in x.cache:
        wc = x.coords.clone()
        wc[:, 1:] = torch.div(wc[:, 1:] + shift, window, rounding_mode="floor")
        wkeys = coord_keys(wc, (x.resolution + shift) // window + 1)
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
        self.to_qkv = nn.Linear(dim, 3 * dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: SparseTensor) -> SparseTensor:
        if x.num_channels != self.dim:
            raise ValueError(f"SparseWindowAttention: input has {x.num_channels} channels, layer expects {self.dim}")
        rows, valid = window_partition(x, self.window, self.shift)
        w, length = rows.shape
        hd = self.dim // self.num_heads
        qkv = self.to_qkv(x.feats)
        padded = qkv[rows.clamp(min=0)] * valid[..., None].to(qkv.dtype)
        q, k, v = padded.reshape(w, length, 3, self.num_heads, hd).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
        out = out.transpose(1, 2).reshape(w, length, self.dim)[valid]
        result = torch.zeros((len(x), self.dim), dtype=out.dtype, device=out.device).index_copy(0, rows[valid], out)
        return x.replace(self.to_out(result))


def _layer_norm32(x: torch.Tensor, eps: float) -> torch.Tensor:
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps).to(x.dtype)


# Inference on CUDA: the MLP's first bias and its GELU (tanh) run in the matrix product's epilogue (cuBLASLt), which
# removes a pass over the (N, 4·width) hidden rows and rounds them once; training keeps the separate ops, whose
# backward needs the pre-activation. With the other two kernels of benchmarks/sample_step.py --on, the paper SS-DiT's
# replayed step fell 107.2 -> 94.8 ms at 10,704 tokens (H100, RESULTS "One sampling step"); False restores the two ops.
FUSED_GELU = True


def gelu_mlp(mlp: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` for a Sequential(Linear, GELU(tanh), Linear)."""
    fc1, _, fc2 = mlp
    if (FUSED_GELU and x.is_cuda and not torch.is_grad_enabled() and x.dtype == fc1.weight.dtype
            and fc1.bias is not None):
        h = torch._addmm_activation(fc1.bias, x.reshape(-1, x.shape[-1]), fc1.weight.t(), use_gelu=True)
        return fc2(h.reshape(*x.shape[:-1], h.shape[-1]))
    return mlp(x)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_mlp(self.mlp, x)


class SparseTransformerBlock(nn.Module):
    """Pre-norm block: x + attention(LN x), x + MLP(LN x); LayerNorms without parameters, eps 1e-6, in float32."""

    eps = 1e-6

    def __init__(self, dim: int, num_heads: int, window: int = 8, shift: int = 0, mlp_ratio: float = 4.0):
        super().__init__()
        self.attn = SparseWindowAttention(dim, num_heads, window, shift)
        self.mlp = FeedForward(dim, mlp_ratio)

    def forward(self, x: SparseTensor) -> SparseTensor:
        x = x.replace(x.feats + self.attn(x.replace(_layer_norm32(x.feats, self.eps))).feats)
        return x.replace(x.feats + self.mlp(_layer_norm32(x.feats, self.eps)))
