"""SS-DiT (DESIGN.md) as the released Direct3D-S2 SparseDiT computes it, over packed sparse latent tokens.

The tokens of several shapes are one ``SparseTensor`` (ordered, or packed with each shape's tokens in
any order; ``SparseTensor.packed`` / ``from_samples(..., ordered=False)``), so shapes of 2k and 100k
tokens share a batch without padding; its ``cu_seqlens`` and SSA block structure are built once and
kept on it, for every block and every sampler step that ``replace``s its features. Input: a
linear layer plus absolute 3D sinusoids of the coords. Each block: adaLN-modulated self-attention
(SSA, or full attention as our baseline), cross-attention to the image tokens (per-head q/k RMS
norms), adaLN-modulated MLP. Output: a plain layer norm and a linear layer. State-dict keys are the
release's; ``official_to_ours`` / ``ours_to_official`` only reorder the sparse convs' kernels.
"""
from __future__ import annotations

import re
import weakref
from dataclasses import dataclass, fields, replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.norm_modulate import gated_residual_segments, norm_modulate_segments
from kernels.ssa import attention_reuse, selection_reuse
from model.dense_dit import FeedForward, MultiHeadRMSNorm  # the released transformers share these
from model.dense_dit import grid_condition_layers
from model.embeddings import TimestepEmbedder, position_embedding_3d
from model.sparse import SparseConv3d, SparseTensor, kernel_from_torchsparse, kernel_to_torchsparse
from model.ssa import SSAConfig, SpatialSparseAttention, ssa_structure, varlen_attention

__all__ = ["DiTConfig", "SparseDiT", "PackedCondition", "official_to_ours", "ours_to_official", "varlen_attention"]


@dataclass(frozen=True)
class DiTConfig:
    depth: int = 24
    width: int = 1024
    heads: int = 32
    kv_heads: int = 2  # key/value heads of the self-attention (cross-attention has ``heads``)
    head_dim: int = 32  # width // heads, as in the release
    mlp_ratio: float = 4.0
    in_channels: int = 16
    out_channels: int = 16
    cond_dim: int = 1024
    # the latent grid side the released network was built for (64 at 512³, 128 at 1024³); the release
    # numbers selection blocks with it, ours finds them from the coordinates and only records it
    resolution: int = 64
    cmp_block: int = 4
    slc_block: int = 8
    top_k: int = 8
    window: int = 8
    # windows shifted by window // 2 on odd blocks; False: shifted on every block (the release's use_shift)
    alternate_shift: bool = True
    compression: str = "v2"  # SSAConfig.compression
    cross_qk_norm: bool = True  # per-head RMS norms of the cross-attention's q and k (qk_rms_norm_cross)
    positions: bool = True  # absolute 3D sinusoids added to the input (pe_mode "ape")
    position_factor: float = 1.0  # coords scaled before the sinusoids (0.5 in the released 1024³ stage)
    # the image tokens come as a PackedCondition (a subset with 3D coords), through a linear layer plus sinusoids
    sparse_conditions: bool = False
    share_mod: bool = False  # one adaLN modulation for all blocks
    use_fp16: bool = False  # linear and conv weights in float16 and the trunk run in it, as the release's
    # "ssa" (the release; the named configs) | "full" (SDPA over each shape: our baseline, no SSA parameters)
    attention: str = "full"
    q_tile: int = 1  # SSAConfig.q_tile: 1 = per-query selection (the release)
    ssa_backend: str = "auto"  # SSAConfig.backend
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
    # > 0: the MLP ends in grid_condition_rank values per cell, mapped to the width by one linear shared by
    # every cell (a 16³ grid at width 64: 8.4 M parameters at rank 8 instead of 67 M for the full last layer).
    grid_condition_rank: int = 0
    # > 0: each latent token also reads the structure stage's 64³ occupancy inside its latent voxel, s³
    # bits (s = this value = 64 / the latent grid) through a linear layer added to the input. Where the
    # latent grid is coarser than the structure grid (the 64³ demo: 16³ latents, s = 4) the bits keep what
    # the structure stage knows about where the surface runs inside a latent voxel; at the release's sizes
    # the grids are equal (s = 1) and the release has no such input.
    occupancy_subcells: int = 0

    def __post_init__(self):
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.heads * self.head_dim != self.width:
            raise ValueError(f"heads × head_dim ({self.heads} × {self.head_dim}) must equal width ({self.width})")
        if self.attention not in ("full", "ssa"):
            raise ValueError(f"attention must be 'full' or 'ssa', got {self.attention!r}")
        if self.sparse_conditions and self.cond_dim != self.width:
            raise ValueError(f"sparse_conditions adds width-{self.width} positions to the condition tokens: "
                             f"cond_dim ({self.cond_dim}) must equal it")
        for name in ("grid_positions", "grid_condition_tokens", "grid_condition_rank", "occupancy_subcells"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.grid_condition_tokens and (self.grid_condition_channels < 1 or self.grid_condition_hidden < 1):
            raise ValueError(f"grid_condition_channels and grid_condition_hidden must be >= 1, got "
                             f"{self.grid_condition_channels} and {self.grid_condition_hidden}")
        if self.grid_condition_tokens and not self.grid_positions:
            raise ValueError("grid_condition_tokens needs grid_positions (the fixed grid its vectors belong to)")
        self.ssa_config()  # its own checks (block sizes, compressor groups)

    @classmethod
    def named(cls, name: str, **overrides) -> "DiTConfig":
        if name not in DIT_CONFIGS:
            raise ValueError(f"unknown DiT config {name!r}; expected one of {sorted(DIT_CONFIGS)}")
        return with_overrides(DIT_CONFIGS[name], overrides)

    def ssa_config(self) -> SSAConfig:
        return SSAConfig(dim=self.width, num_heads=self.heads, num_kv_heads=self.kv_heads, head_dim=self.head_dim,
                         cmp_block=self.cmp_block, slc_block=self.slc_block, top_k=self.top_k, window=self.window,
                         window_shift=self.window // 2, compression=self.compression, q_tile=self.q_tile,
                         attention="sparse" if self.attention == "ssa" else "full", backend=self.ssa_backend)

    def layer_shifted(self, layer: int) -> bool:
        return layer % 2 == 1 if self.alternate_shift else True

    @classmethod
    def from_official(cls, params: dict) -> "DiTConfig":
        """Our config from the ``params:`` of the released SparseDiT in its config.yaml."""
        unknown = sorted(set(params) - set(_OFFICIAL_DEFAULTS) - set(_OFFICIAL_REQUIRED))
        if unknown:
            raise ValueError(f"unknown SparseDiT parameter(s) {unknown}")
        missing = sorted(set(_OFFICIAL_REQUIRED) - set(params))
        if missing:
            raise ValueError(f"SparseDiT parameter(s) {missing} missing (the released class has no default)")
        p = {**_OFFICIAL_DEFAULTS, **params}
        width = int(p["model_channels"])
        heads = int(p["num_heads"] or width // p["num_head_channels"])
        if p["pe_mode"] not in ("ape", "rope"):
            raise ValueError(f"SparseDiT pe_mode must be 'ape' or 'rope', got {p['pe_mode']!r}")
        if p["window_size"] is None:
            raise ValueError("SparseDiT window_size None is not supported (the release needs a window)")
        # qk_rms_norm acts on the release's non-SSA self-attention only: its SSA blocks have no q/k norm
        return cls(depth=int(p["num_blocks"]), width=width, heads=heads, kv_heads=int(p["num_kv_heads"]),
                   head_dim=width // heads, mlp_ratio=float(p["mlp_ratio"]), in_channels=int(p["in_channels"]),
                   out_channels=int(p["out_channels"]), cond_dim=int(p["cond_channels"]),
                   resolution=int(p["resolution"]), cmp_block=int(p["compression_block_size"]),
                   slc_block=int(p["selection_block_size"]), top_k=int(p["topk"]), window=int(p["window_size"]),
                   alternate_shift=bool(p["use_shift"]), compression=str(p["compression_version"]),
                   cross_qk_norm=bool(p["qk_rms_norm_cross"]),
                   # the release's SSA blocks ignore rope: with pe_mode "rope" the network sees no positions
                   positions=p["pe_mode"] == "ape", position_factor=float(p["factor"]),
                   sparse_conditions=bool(p["sparse_conditions"]), share_mod=bool(p["share_mod"]),
                   use_fp16=bool(p["use_fp16"]), grad_checkpointing=bool(p["use_checkpoint"]), attention="ssa")


_OFFICIAL_REQUIRED = ("resolution", "in_channels", "model_channels", "cond_channels", "out_channels", "num_blocks")
_OFFICIAL_DEFAULTS = dict(num_heads=None, num_head_channels=64, num_kv_heads=2, compression_block_size=4,
                          selection_block_size=8, topk=8, compression_version="v2", mlp_ratio=4, pe_mode="ape",
                          use_fp16=False, use_checkpoint=False, share_mod=False, qk_rms_norm=False,
                          qk_rms_norm_cross=False, sparse_conditions=False, factor=1.0, window_size=8, use_shift=True)


def with_overrides(cfg, overrides: dict):
    """dataclasses.replace that names an unknown key instead of a TypeError about __init__."""
    known = {f.name for f in fields(cfg)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {type(cfg).__name__} key(s) {unknown}; known: {sorted(known)}")
    return replace(cfg, **overrides)


DIT_CONFIGS = {
    # The released layout at a width that runs on a CPU in seconds; what the tests run.
    "debug": DiTConfig(depth=2, width=64, heads=4, kv_heads=2, head_dim=16, cond_dim=64, attention="ssa"),
    # debug with a learned vector per cell of a 16³ latent grid and the image reaching every cell directly
    # (the structure DiT's recipe) through 8 values a cell: the 64³ demo's SS-DiT over a two-level SS-VAE's
    # latents (docs/demo.md; rank 8 scores as the full 16³·64 layer with an eighth of its parameters). Each
    # token also reads the structure's 4³ occupancy inside its latent voxel (band sign error 26% → 12%).
    "debug_grid16": DiTConfig(depth=2, width=64, heads=4, kv_heads=2, head_dim=16, cond_dim=64, attention="ssa",
                              grid_positions=16, grid_condition_tokens=64, grid_condition_rank=8,
                              occupancy_subcells=4),
    "small": DiTConfig(depth=12, width=512, heads=16, kv_heads=2, head_dim=32, attention="ssa"),
    # The released SS-DiT: 24 blocks, width 1024, 32 query heads, 2 KV heads, head dim 32, SSA (m_cmp 4).
    "paper": DiTConfig(attention="ssa"),
}


class PackedCondition(NamedTuple):
    """Image tokens of a batch packed like the latent tokens (``sparse_conditions``): tokens (M, cond_dim),
    coords (M, 3) of each token (patch column, row, 0; the class and register tokens at (0, 0, 1)),
    cu_seqlens (B + 1,)."""
    tokens: torch.Tensor
    coords: torch.Tensor
    cu_seqlens: torch.Tensor


def _host_offsets(xs: SparseTensor, cu_cond) -> tuple[list[int], list[int]]:
    """The attention layers' token and condition offsets as host lists.

    A sampler's steps share ``xs.cache`` (``x.replace``) and one condition object, so the offsets are read
    from the device on the first step only: the token offsets belong to the cached structure, and a packed
    condition's offsets are kept beside a weak reference to their tensor, used while it is the same tensor.
    A dense condition's offsets come as a host list already."""
    cache = xs.cache
    cu_x = cache.get("cu_seqlens_host")
    if cu_x is None:
        cu_x = cache["cu_seqlens_host"] = xs.cu_seqlens.tolist()
    if isinstance(cu_cond, list):
        return cu_x, cu_cond
    kept = cache.get("cu_cond_host")
    if kept is not None and kept[0]() is cu_cond:
        return cu_x, kept[1]
    cu_c = cu_cond.tolist()
    cache["cu_cond_host"] = (weakref.ref(cu_cond), cu_c)
    return cu_x, cu_c


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input and weight dtypes, returned in the input's."""

    def forward(self, x):
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class CrossAttention(nn.Module):
    """Tokens of shape b attend to the condition tokens of shape b (every block, DESIGN.md)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.to_q = nn.Linear(w, w)
        self.to_kv = nn.Linear(cfg.cond_dim, 2 * w)
        if cfg.cross_qk_norm:
            self.q_rms_norm = MultiHeadRMSNorm(cfg.heads, cfg.head_dim)
            self.k_rms_norm = MultiHeadRMSNorm(cfg.heads, cfg.head_dim)
        self.to_out = nn.Linear(w, w)

    def forward(self, x, cu_seqlens, cond, cu_cond):
        """x (N, width) packed, cond (M, cond_dim) packed with offsets cu_cond."""
        c = self.cfg
        q = self.to_q(x).view(-1, c.heads, c.head_dim)
        k, v = self.to_kv(cond).view(-1, 2, c.heads, c.head_dim).unbind(1)
        if c.cross_qk_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        o = varlen_attention(q, k, v, cu_seqlens, cu_cond)
        return self.to_out(o.reshape(x.shape[0], -1))


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


# On CUDA, in inference and training: each norm and its modulation as one kernel (kernels/norm_modulate, by
# shape segments, with a backward) instead of LayerNorm32, a per-token gather of the shapes' modulation and
# separate multiply-adds. On an H100 a sampling step 1.18-1.21x with the q/k norm kernel
# (benchmarks/sample_step.py --fused-norms), a 46k-token training step 1.07x (train_dit.py --unfused-norms);
# the results differ from the unfused path at bf16 rounding.
FUSED_NORMS = True

# With FUSED_NORMS: the two gated residuals x + h · g[shape] as one kernel by shape segments (no per-token gate
# gather; a one-kernel backward, the gate's gradient summed in float32) instead of an addcmul over the gathered
# gates. With the other two switches of sample_step.py, a 46k-token training step 1.126 -> 1.040 s (median of three
# alternated pairs) on an H100 (train_dit.py --unfused-residuals --group-norm-torch gives the baseline).
FUSED_RESIDUALS = True

# Under gradient checkpointing, keep each SSA layer's attention outputs from the forward for its backward
# (kernels.ssa.attention_reuse): no attention kernel in the recomputation, for four (N, Hq, D) tensors a
# layer (~0.4 GB a layer at 46k tokens in bf16). Off: not yet timed on a GPU (train_dit.py --keep-attention).
CHECKPOINT_KEEPS_ATTENTION = False


class DiTBlock(nn.Module):
    def __init__(self, cfg: DiTConfig, layer: int):
        super().__init__()
        w = cfg.width
        self.norm1 = LayerNorm32(w, elementwise_affine=False, eps=1e-6)
        self.norm2 = LayerNorm32(w, elementwise_affine=True, eps=1e-6)
        self.norm3 = LayerNorm32(w, elementwise_affine=False, eps=1e-6)
        self.self_attn = SpatialSparseAttention.from_dit_config(cfg, layer)
        self.cross_attn = CrossAttention(cfg)
        self.mlp = FeedForward(w, cfg.mlp_ratio)
        if not cfg.share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w))

    def forward(self, x, st, cu_seqlens, token_shape, mod, cond, cu_cond):
        """x in block order when ``st`` (the SSA structure) is given; mod (B, width) = t_emb or (B, 6·width) shared."""
        if hasattr(self, "adaLN_modulation"):
            mod = self.adaLN_modulation(mod)
        if FUSED_NORMS and x.is_cuda and isinstance(cu_seqlens, list):
            return self._forward_fused(x, st, cu_seqlens, token_shape, mod, cond, cu_cond)
        # One shape broadcasts; several gather their row per token (an embedding lookup, whose backward sums
        # each shape's many duplicate rows by segments rather than one index_put at a time)
        mod = mod if mod.shape[0] == 1 else F.embedding(token_shape, mod)
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        h = modulate(self.norm1(x), sh1, sc1)
        h = self.self_attn.forward_sorted(h, st) if st is not None else self.self_attn.full_attention(h, cu_seqlens)
        x = x + h * g1
        x = x + self.cross_attn(self.norm2(x), cu_seqlens, cond, cu_cond)
        return x + self.mlp(modulate(self.norm3(x), sh2, sc2)) * g2

    def _forward_fused(self, x, st, cu_seqlens, token_shape, mod, cond, cu_cond):
        """forward() with kernels/norm_modulate: each shape's modulation row is read by the kernel's programs
        over that shape's rows (host offsets), only the gates are gathered per token. Differentiable; under
        autocast the normalised rows are stored in its dtype, which the linear layers reading them cast to."""
        sh1, sc1, g1, sh2, sc2, g2 = mod.chunk(6, dim=-1)
        out = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
        h = norm_modulate_segments(x, 1 + sc1, sh1, cu_seqlens, self.norm1.eps, out)
        h = self.self_attn.forward_sorted(h, st) if st is not None else self.self_attn.full_attention(h, cu_seqlens)
        x = self._gated(x, h, g1, cu_seqlens, token_shape)
        n2 = self.norm2
        x = x + self.cross_attn(norm_modulate_segments(x, n2.weight[None], n2.bias[None], cu_seqlens, n2.eps, out),
                                cu_seqlens, cond, cu_cond)
        h = self.mlp(norm_modulate_segments(x, 1 + sc2, sh2, cu_seqlens, self.norm3.eps, out))
        return self._gated(x, h, g2, cu_seqlens, token_shape)

    @staticmethod
    def _gated(x, h, g, cu_seqlens, token_shape):
        """x + h · g of each token's shape: kernels/norm_modulate by shape segments, or with FUSED_RESIDUALS off
        one addcmul over the gates gathered per token."""
        if FUSED_RESIDUALS:
            return gated_residual_segments(x, h, g, cu_seqlens)
        return torch.addcmul(x, h, g if g.shape[0] == 1 else F.embedding(token_shape, g))


class SparseDiT(nn.Module):
    """Velocity network v(x_t, t, image tokens) over packed sparse tokens (the released SparseDiT)."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.cfg = cfg
        w = cfg.width
        self.t_embedder = TimestepEmbedder(w)
        if cfg.share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(w, 6 * w))
        if cfg.sparse_conditions:
            self.cond_proj = nn.Linear(cfg.cond_dim, cfg.cond_dim)
        self.input_layer = nn.Linear(cfg.in_channels, w)
        g = cfg.grid_positions
        self.grid_pos = nn.Parameter(torch.zeros(g ** 3, w)) if g else None
        self.grid_cond = self.grid_cond_up = None
        if cfg.grid_condition_tokens:
            self.grid_cond, self.grid_cond_up = grid_condition_layers(
                cfg.cond_dim, cfg.grid_condition_tokens, cfg.grid_condition_channels, cfg.grid_condition_hidden,
                g ** 3, w, cfg.grid_condition_rank)
        s = cfg.occupancy_subcells
        self.occupancy_in = nn.Linear(s ** 3, w) if s else None
        self.blocks = nn.ModuleList([DiTBlock(cfg, i) for i in range(cfg.depth)])
        self.out_layer = nn.Linear(w, cfg.out_channels)
        self.reset_parameters()
        if cfg.use_fp16:  # the release's convert_to_fp16: linear and conv weights only, norms stay float32
            for m in self.modules():
                if isinstance(m, (nn.Linear, SparseConv3d)):
                    m.half()

    def reset_parameters(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-Zero: every block starts as the identity and the output as zero velocity.
        for mod in [self.adaLN_modulation] if self.cfg.share_mod else [b.adaLN_modulation for b in self.blocks]:
            nn.init.zeros_(mod[-1].weight)
            nn.init.zeros_(mod[-1].bias)
        nn.init.zeros_(self.out_layer.weight)
        nn.init.zeros_(self.out_layer.bias)
        if self.grid_pos is not None:
            nn.init.normal_(self.grid_pos, std=0.02)
        if self.grid_cond is not None:  # starts small next to the input and the positions
            nn.init.normal_(self.grid_cond[-1].weight, std=0.02 / 16)

    def _condition(self, cond, b: int, dtype):
        """(tokens (M, cond_dim), offsets (B + 1)) of the image condition, dense (B, L, C) or packed; a dense
        condition's offsets are a host list (no device read), a packed one's its cu_seqlens tensor."""
        if self.cfg.sparse_conditions:
            if not isinstance(cond, PackedCondition):
                raise ValueError("this network has sparse_conditions: cond must be a PackedCondition")
            if len(cond.cu_seqlens) != b + 1:
                raise ValueError(f"expected a condition for each of {b} shapes, got {len(cond.cu_seqlens) - 1}")
            tokens = self.cond_proj(cond.tokens.to(dtype))
            return tokens + position_embedding_3d(cond.coords, self.cfg.width).to(dtype), cond.cu_seqlens
        if isinstance(cond, PackedCondition) or cond.ndim != 3 or cond.shape[0] != b:
            raise ValueError(f"expected cond ({b}, L, C), got {type(cond).__name__} "
                             f"{tuple(getattr(cond, 'shape', ()))}")
        return cond.to(dtype).reshape(-1, cond.shape[-1]), list(range(0, (b + 1) * cond.shape[1], cond.shape[1]))

    def forward(self, x: SparseTensor, t: torch.Tensor, cond, occupancy: torch.Tensor | None = None) -> SparseTensor:
        """Latent tokens x (N, in_channels) of B shapes, t (B,) in [0, 1] (noise at 1), cond (B, L, cond_dim)
        or a PackedCondition with ``sparse_conditions`` → the velocity (N, out_channels) on the same tokens.
        ``occupancy`` (N, s³), x's rows: the structure's sub-cell occupancy, for ``occupancy_subcells`` = s only.

        The SSA structure lives in ``x.cache``, which ``x.replace`` shares: the steps of a sampler that
        replace the features build it once."""
        if not isinstance(x, SparseTensor):
            raise TypeError(f"SparseDiT takes a SparseTensor of latent tokens, got {type(x).__name__}")
        return x.replace(self._velocity(x, t, cond, occupancy))

    def _velocity(self, xs: SparseTensor, t, cond, occupancy=None):
        cfg = self.cfg
        x, coords = xs.feats, xs.coords[:, 1:]
        b = xs.batch_size
        if t.shape != (b,):
            raise ValueError(f"expected t ({b},), got {tuple(t.shape)}")
        dtype = self.input_layer.weight.dtype
        cond_tokens, cu_cond = self._condition(cond, b, dtype)
        h = self.input_layer(x.to(dtype))
        t_emb = self.t_embedder(t)
        if cfg.share_mod:
            t_emb = self.adaLN_modulation(t_emb)
        t_emb = t_emb.to(dtype)
        if cfg.positions:
            h = h + position_embedding_3d(coords, cfg.width, cfg.position_factor).to(dtype)
        s = cfg.occupancy_subcells
        if (occupancy is None) != (s == 0):
            raise ValueError(f"this SS-DiT reads the structure's sub-cell occupancy (occupancy_subcells={s}): pass "
                             "occupancy" if s else "occupancy given to an SS-DiT without occupancy_subcells")
        if s:
            if occupancy.shape != (x.shape[0], s ** 3):
                raise ValueError(f"occupancy must be ({x.shape[0]}, {s ** 3}) for {x.shape[0]} tokens and "
                                 f"occupancy_subcells={s}, got {tuple(occupancy.shape)}")
            h = h + self.occupancy_in(occupancy.to(dtype))
        token_shape = xs.batch_index  # rows are grouped by shape: no host read of the lengths
        if self.grid_pos is not None:
            h = h + self._grid_terms(coords, token_shape, cond, b, dtype)
        st = inv = None
        if cfg.attention == "ssa":  # every block runs in the SSA's block order; per-token work ignores order
            perm, inv, st = ssa_structure(xs, self.blocks[0].self_attn.cfg)
            h = h[perm]  # shapes stay contiguous and in order, so token_shape holds
        cu_x, cu_c = _host_offsets(xs, cu_cond)  # the attention layers' offsets, read once per sampler
        for blk in self.blocks:
            if cfg.grad_checkpointing and self.training:
                # the recomputation takes the forward's SSA block selection (and with CHECKPOINT_KEEPS_ATTENTION
                # its attention outputs) instead of computing them again
                h = checkpoint(blk, h, st, cu_x, token_shape, t_emb, cond_tokens, cu_c, use_reentrant=False,
                               context_fn=attention_reuse if CHECKPOINT_KEEPS_ATTENTION else selection_reuse)
            else:
                h = blk(h, st, cu_x, token_shape, t_emb, cond_tokens, cu_c)
        if inv is not None:
            h = h[inv]
        h = F.layer_norm(h, h.shape[-1:])
        return self.out_layer(h.to(self.out_layer.weight.dtype))

    def _grid_terms(self, coords, token_shape, cond, b, dtype):
        g = self.cfg.grid_positions
        lo, hi = (int(v) for v in coords.aminmax()) if coords.numel() else (0, 0)  # one host read
        if lo < 0 or hi >= g:
            raise ValueError(f"coords outside the {g}³ grid of the learned positions (range {lo}..{hi})")
        c = coords.long()
        cell = (c[:, 0] * g + c[:, 1]) * g + c[:, 2]
        out = self.grid_pos[cell].to(dtype)
        if self.grid_cond is not None:
            if cond.shape[1] != self.cfg.grid_condition_tokens:
                raise ValueError(f"the condition has {cond.shape[1]} tokens; this network's grid condition "
                                 f"reads {self.cfg.grid_condition_tokens} (grid_condition_tokens)")
            rank = self.cfg.grid_condition_rank
            per_cell = self.grid_cond(cond.to(dtype)).view(b, g ** 3, rank or self.cfg.width)[token_shape, cell]
            out = out + (self.grid_cond_up(per_cell) if rank else per_cell)
        return out


# -- released weights ------------------------------------------------------------------------------------
# Our keys are the release's except the compressors' sparse convs: torchsparse keeps a conv's kernel as
# conv.kernel with x-fastest offsets (a 1³ kernel as (C_in, C_out)); ours is weight with the last axis fastest.
_CONV = re.compile(r"(.*\.self_attn\.compression_(?:key|value)\.(?:out_layers\.[03]|act_layers\.0))\.(weight|bias)")


def _conv_key(key: str, cfg: DiTConfig):
    """(official key, kind) of one of our keys; kind: None (as is), 'k3' (3³ kernel), 'k1' (1³ kernel)."""
    m = _CONV.fullmatch(key)
    if m is None or (cfg.compression == "v2") == m.group(1).endswith("act_layers.0"):
        return key, None  # v2's act_layers.0 is a GroupNorm; v1 has no out_layers
    if m.group(2) == "bias":
        return f"{m.group(1)}.conv.bias", None
    return f"{m.group(1)}.conv.kernel", "k1" if cfg.compression == "v1" else "k3"


def _our_shapes(cfg: DiTConfig) -> dict[str, torch.Size]:
    with torch.device("meta"):
        return {k: v.shape for k, v in SparseDiT(cfg).state_dict().items()}


_SSA_ONLY = re.compile(r".*\.self_attn\.(compression_(key|value)\..*|intra_block_pe|gate\.0\.weight)")


def official_to_ours(state_dict: dict, cfg: DiTConfig) -> dict:
    """The released SparseDiT's state dict as our SparseDiT(cfg)'s.

    With ``attention="full"`` the SSA-only tensors (compressors, intra-block positions, gate) are left out."""
    ours, used = {}, set()
    for key, shape in _our_shapes(cfg).items():
        src, kind = _conv_key(key, cfg)
        if src not in state_dict:
            raise ValueError(f"released SparseDiT state dict lacks {src!r} (for {key!r})")
        t = state_dict[src]
        t = kernel_from_torchsparse(t) if kind == "k3" else t.t().contiguous() if kind == "k1" else t
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"released {src!r} has shape {tuple(state_dict[src].shape)}, "
                             f"expected one that maps to {tuple(shape)}")
        ours[key] = t
        used.add(src)
    extra = sorted(k for k in set(state_dict) - used if not (cfg.attention == "full" and _SSA_ONLY.fullmatch(k)))
    if extra:
        raise ValueError(f"released SparseDiT key(s) {extra[:5]}{' ...' if len(extra) > 5 else ''} "
                         f"have no place in this config")
    return ours


def ours_to_official(state_dict: dict, cfg: DiTConfig) -> dict:
    """Our SparseDiT(cfg) state dict in the released layout (inverse of official_to_ours)."""
    if cfg.attention != "ssa":
        raise ValueError("ours_to_official needs attention='ssa' (the released network's SSA parameters)")
    shapes = _our_shapes(cfg)
    extra = sorted(set(state_dict) - set(shapes))
    if extra:
        raise ValueError(f"state dict key(s) {extra[:5]} are not SparseDiT(cfg)'s")
    out = {}
    for key, shape in shapes.items():
        if key not in state_dict:
            raise ValueError(f"state dict lacks {key!r}")
        t = state_dict[key]
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f"{key!r} has shape {tuple(t.shape)}, SparseDiT(cfg) expects {tuple(shape)}")
        dst, kind = _conv_key(key, cfg)
        out[dst] = kernel_to_torchsparse(t) if kind == "k3" else t.t().contiguous() if kind == "k1" else t
    return out
