"""SS-DiT (DESIGN.md): a diffusion transformer over packed sparse latent tokens.

Tokens of several shapes are packed into one (N, C) tensor with int coords (N, 3) and offsets
``cu_seqlens`` (B + 1,), so shapes of 2k and 100k tokens share a batch without padding. Each block:
adaLN-modulated self-attention (full or SSA, switched by ``attention``), cross-attention to image
tokens, adaLN-modulated MLP. Positions are absolute 3D sinusoids of the latent coords, added once.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from model.embeddings import TimestepEmbedder, position_embedding_3d


@dataclass(frozen=True)
class DiTConfig:
    depth: int = 24
    width: int = 1024
    heads: int = 32
    kv_heads: int = 2
    head_dim: int = 32
    mlp_ratio: float = 4.0
    in_channels: int = 16
    out_channels: int = 16
    cond_dim: int = 1024
    qk_norm: bool = True
    attention: str = "full"  # "full" | "ssa"
    grad_checkpointing: bool = False
    # > 0: tokens lie on a fixed g³ grid (the dense structure stage) and each grid cell also gets a
    # learned position vector. Sinusoids alone tell few cells apart at small widths (a width-64 network
    # has 10 frequencies per axis, 2–3 of which vary across 8 cells); a table lets every cell hold its own.
    grid_positions: int = 0
    # > 0 (with grid_positions): the image also reaches every grid cell directly. Each of the condition's
    # grid_condition_tokens tokens is projected to grid_condition_channels values, the flattened result
    # (which keeps the image's layout) goes through an MLP to one vector per cell, added to the input.
    # Cross-attention alone is too slow a path for a small network to learn which shape an image shows.
    grid_condition_tokens: int = 0
    grid_condition_channels: int = 8
    grid_condition_hidden: int = 256

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.attention not in ("full", "ssa"):
            raise ValueError(f"attention must be 'full' or 'ssa', got {self.attention!r}")
        for name in ("grid_positions", "grid_condition_tokens"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.grid_condition_tokens and (self.grid_condition_channels < 1 or self.grid_condition_hidden < 1):
            raise ValueError(f"grid_condition_channels and grid_condition_hidden must be >= 1, got "
                             f"{self.grid_condition_channels} and {self.grid_condition_hidden}")
        if self.grid_condition_tokens and not self.grid_positions:
            raise ValueError("grid_condition_tokens needs grid_positions (the fixed grid its vectors belong to)")

    @classmethod
    def named(cls, name: str, **overrides) -> "DiTConfig":
        if name not in DIT_CONFIGS:
            raise ValueError(f"unknown DiT config {name!r}; expected one of {sorted(DIT_CONFIGS)}")
        return with_overrides(DIT_CONFIGS[name], overrides)


def with_overrides(cfg, overrides: dict):
    """dataclasses.replace that names an unknown key instead of a TypeError about __init__."""
    known = {f.name for f in fields(cfg)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {type(cfg).__name__} key(s) {unknown}; known: {sorted(known)}")
    return replace(cfg, **overrides)


DIT_CONFIGS = {
    # Trains on a CPU in seconds; what the tests run.
    "debug": DiTConfig(depth=2, width=64, heads=4, kv_heads=2, head_dim=16, cond_dim=64),
    "small": DiTConfig(depth=12, width=512, heads=16, kv_heads=2, head_dim=32),
    # The paper's SS-DiT: 24 blocks, width 1024, 32 query heads, 2 KV heads, head dim 32.
    "paper": DiTConfig(),
}


def lengths_from_cu(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return cu_seqlens[1:] - cu_seqlens[:-1]


def batch_index(cu_seqlens: torch.Tensor) -> torch.Tensor:
    """Shape index of every packed token."""
    lengths = lengths_from_cu(cu_seqlens)
    return torch.repeat_interleave(torch.arange(len(lengths), device=cu_seqlens.device), lengths)


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     cu_q: torch.Tensor, cu_kv: torch.Tensor) -> torch.Tensor:
    """Attention of each shape's queries to that shape's keys only.

    q (Nq, Hq, D), k/v (Nk, Hkv, D) with Hq a multiple of Hkv (grouped-query attention).
    Equal lengths run as one batched SDPA call; ragged ones loop over shapes (no padding, no mask).
    """
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
    lq, lk = lengths_from_cu(cu_q), lengths_from_cu(cu_kv)
    b = len(lq)
    if bool((lq == lq[0]).all()) and bool((lk == lk[0]).all()):
        nq, nk = int(lq[0]), int(lk[0])
        qb = q.reshape(b, nq, *q.shape[1:]).transpose(1, 2)
        kb = k.reshape(b, nk, *k.shape[1:]).transpose(1, 2)
        vb = v.reshape(b, nk, *v.shape[1:]).transpose(1, 2)
        return F.scaled_dot_product_attention(qb, kb, vb).transpose(1, 2).reshape(q.shape)
    cq, ck = cu_q.tolist(), cu_kv.tolist()
    out = []
    for i in range(b):
        qi = q[cq[i]:cq[i + 1]].transpose(0, 1)[None]
        ki = k[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        vi = v[ck[i]:ck[i + 1]].transpose(0, 1)[None]
        out.append(F.scaled_dot_product_attention(qi, ki, vi)[0].transpose(0, 1))
    return torch.cat(out, dim=0)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        # Back to the input dtype after the weight: under autocast q/k/v must share one dtype (SSA kernels).
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.float()).to(x.dtype)


class FullSelfAttention(nn.Module):
    """Grouped-query self-attention over each shape's whole token set.

    The interface every self-attention of the SS-DiT shares (SSA included):
    forward(x (N, C), coords (N, 3) int, cu_seqlens (B + 1,)) -> (N, C); ``layer`` is the block index
    (SSA shifts its windows on alternate layers; full attention ignores it).
    """

    def __init__(self, cfg: DiTConfig, layer: int):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        self.q = nn.Linear(cfg.width, cfg.heads * cfg.head_dim)
        self.kv = nn.Linear(cfg.width, 2 * cfg.kv_heads * cfg.head_dim)
        self.out = nn.Linear(cfg.heads * cfg.head_dim, cfg.width)
        self.q_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()

    def forward(self, x, coords, cu_seqlens):
        n, c = self.cfg.head_dim, self.cfg
        q = self.q_norm(self.q(x).view(-1, c.heads, n))
        k, v = self.kv(x).view(-1, 2, c.kv_heads, n).unbind(1)
        o = varlen_attention(q, self.k_norm(k), v, cu_seqlens, cu_seqlens)
        return self.out(o.reshape(x.shape[0], -1))


def make_self_attention(cfg: DiTConfig, layer: int) -> nn.Module:
    if cfg.attention == "full":
        return FullSelfAttention(cfg, layer)
    try:
        from model.ssa import SpatialSparseAttention  # written beside this module; optional until present
    except ImportError as e:
        raise ImportError(f"attention='ssa' needs model.ssa.SpatialSparseAttention ({e})") from e
    return SpatialSparseAttention.from_dit_config(cfg, layer)


class CrossAttention(nn.Module):
    """Tokens of shape b attend to the image tokens of condition b (every block, DESIGN.md)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        self.q = nn.Linear(cfg.width, cfg.heads * cfg.head_dim)
        self.kv = nn.Linear(cfg.cond_dim, 2 * cfg.heads * cfg.head_dim)
        self.out = nn.Linear(cfg.heads * cfg.head_dim, cfg.width)
        self.q_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()
        self.k_norm = RMSNorm(cfg.head_dim) if cfg.qk_norm else nn.Identity()

    def forward(self, x, cu_seqlens, cond):
        c = self.cfg
        b, l, _ = cond.shape
        q = self.q_norm(self.q(x).view(-1, c.heads, c.head_dim))
        k, v = self.kv(cond).view(b * l, 2, c.heads, c.head_dim).unbind(1)
        cu_kv = torch.arange(b + 1, device=cond.device) * l
        o = varlen_attention(q, self.k_norm(k), v, cu_seqlens, cu_kv)
        return self.out(o.reshape(x.shape[0], -1))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, layer: int):
        super().__init__()
        w = cfg.width
        self.norm1 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.attn = make_self_attention(cfg, layer)
        self.norm2 = nn.LayerNorm(w, elementwise_affine=True, eps=1e-6)
        self.cross = CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        hidden = int(w * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(w, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, w))
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w))

    def forward(self, x, coords, cu_seqlens, token_shape, t_emb, cond):
        mod = self.ada(t_emb)
        # One shape broadcasts; several gather their row per token.
        mod = mod if mod.shape[0] == 1 else mod[token_shape]
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        x = x + g1 * self.attn(modulate(self.norm1(x), sh1, sc1), coords, cu_seqlens)
        x = x + self.cross(self.norm2(x), cu_seqlens, cond)
        return x + g2 * self.mlp(modulate(self.norm3(x), sh2, sc2))


class SparseDiT(nn.Module):
    """Velocity network v(x_t, t, image tokens) over packed sparse tokens."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.input = nn.Linear(cfg.in_channels, w)
        self.t_embed = TimestepEmbedder(w)
        g = cfg.grid_positions
        self.grid_pos = nn.Parameter(torch.zeros(g ** 3, w)) if g else None
        self.grid_cond = None
        if cfg.grid_condition_tokens:
            ch, hid = cfg.grid_condition_channels, cfg.grid_condition_hidden
            self.grid_cond = nn.Sequential(nn.Linear(cfg.cond_dim, ch), nn.Flatten(),
                                           nn.Linear(cfg.grid_condition_tokens * ch, hid), nn.SiLU(),
                                           nn.Linear(hid, g ** 3 * w))
        self.cond_norm = nn.LayerNorm(cfg.cond_dim)
        self.blocks = nn.ModuleList([DiTBlock(cfg, i) for i in range(cfg.depth)])
        self.final_norm = nn.LayerNorm(w, elementwise_affine=False, eps=1e-6)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(w, 2 * w))
        self.output = nn.Linear(w, cfg.out_channels)
        self.reset_parameters()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        # adaLN-Zero: every block starts as the identity and the output as zero velocity.
        for blk in self.blocks:
            nn.init.zeros_(blk.ada[-1].weight)
            nn.init.zeros_(blk.ada[-1].bias)
        for lin in (self.final_ada[-1], self.output):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.grid_pos is not None:
            nn.init.normal_(self.grid_pos, std=0.02)
        if self.grid_cond is not None:  # starts small next to the input and the positions
            nn.init.normal_(self.grid_cond[-1].weight, std=0.02 / 16)

    def forward(self, x: torch.Tensor, coords: torch.Tensor, cu_seqlens: torch.Tensor,
                t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x (N, in_channels), coords (N, 3) int, cu_seqlens (B + 1,), t (B,) in [0, 1], cond (B, L, cond_dim)."""
        b = cu_seqlens.numel() - 1
        if x.shape[0] != coords.shape[0] or int(cu_seqlens[-1]) != x.shape[0]:
            raise ValueError(f"packed tokens disagree: x {tuple(x.shape)}, coords {tuple(coords.shape)}, "
                             f"cu_seqlens ends at {int(cu_seqlens[-1])}")
        if t.shape != (b,) or cond.shape[0] != b:
            raise ValueError(f"expected t ({b},) and cond ({b}, L, C); got {tuple(t.shape)}, {tuple(cond.shape)}")
        dtype = self.input.weight.dtype
        h = self.input(x.to(dtype)) + position_embedding_3d(coords, self.cfg.width).to(dtype)
        t_emb = self.t_embed(t)
        cond = self.cond_norm(cond.to(dtype))
        token_shape = batch_index(cu_seqlens)
        if self.grid_pos is not None:
            g = self.cfg.grid_positions
            lo, hi = (int(v) for v in coords.aminmax()) if coords.numel() else (0, 0)  # one host read
            if lo < 0 or hi >= g:
                raise ValueError(f"coords outside the {g}³ grid of the learned positions (range {lo}..{hi})")
            c = coords.long()
            cell = (c[:, 0] * g + c[:, 1]) * g + c[:, 2]
            h = h + self.grid_pos[cell].to(dtype)
            if self.grid_cond is not None:
                if cond.shape[1] != self.cfg.grid_condition_tokens:
                    raise ValueError(f"the condition has {cond.shape[1]} tokens; this network's grid condition "
                                     f"reads {self.cfg.grid_condition_tokens} (grid_condition_tokens)")
                per_cell = self.grid_cond(cond).view(b, g ** 3, self.cfg.width)
                h = h + per_cell[token_shape, cell]
        for blk in self.blocks:
            if self.cfg.grad_checkpointing and self.training:
                h = checkpoint(blk, h, coords, cu_seqlens, token_shape, t_emb, cond, use_reentrant=False)
            else:
                h = blk(h, coords, cu_seqlens, token_shape, t_emb, cond)
        shift, scale = self.final_ada(t_emb).chunk(2, dim=-1)
        if b > 1:
            shift, scale = shift[token_shape], scale[token_shape]
        return self.output(modulate(self.final_norm(h), shift, scale))


def pack(coords_list: list[torch.Tensor], feats_list: list[torch.Tensor]):
    """Pack per-shape (coords, feats) into (coords, feats, cu_seqlens)."""
    lengths = torch.tensor([c.shape[0] for c in coords_list])
    cu = torch.zeros(len(lengths) + 1, dtype=torch.long)
    cu[1:] = torch.cumsum(lengths, 0)
    return torch.cat(coords_list), torch.cat(feats_list), cu
