"""Dense structure DiT (Direct3D-S2 §3.4), as released (DenseDiT): a DiT over the 16³×8 structure latent.

The latent (B, 8, 16, 16, 16) is cut into p³ patches (p = 1 in the released network: 4,096 tokens of
8 channels), linearly embedded, and gets a fixed absolute 3D sinusoidal position (a persistent
buffer ``pos_emb``, part of the released state dict). Each block: adaLN-modulated self-attention with
a fused qkv projection and per-head RMS-normalised q and k (learned gain per head and channel),
cross-attention to the image tokens after an affine LayerNorm (not modulated), then an
adaLN-modulated GELU MLP; both modulated branches are gated. The timestep embedding is a 256-wide
[cos | sin] sinusoid and a two-layer MLP; the output is a LayerNorm without affine and a linear map.

Time convention: ``forward`` takes t in [0, 1] (0 = data, 1 = noise) like every network of this
project; the release's scheduler passes 1000·t, which the timestep embedder applies inside.

State-dict keys equal the release's, so ``official_to_ours`` / ``ours_to_official`` only check keys
and shapes.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from kernels.head_rms_norm import head_rms_norm
from kernels.norm_modulate import norm_modulate_segments
from model.configs import strict_from_dict
from model.cpu_precision import float32_attention
from model.dense_vae import check_layout, named_config
from model.embeddings import TimestepEmbedder, position_embedding_3d
from model.sparse.attention import gelu_mlp


@dataclass(frozen=True)
class DenseDiTConfig:
    resolution: int = 16  # latent grid side
    in_channels: int = 8
    out_channels: int = 8
    width: int = 1024
    cond_dim: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_ratio: float = 4.0
    patch_size: int = 1
    share_mod: bool = False  # one adaLN projection shared by all blocks (off in the release)
    qk_norm: bool = True
    qk_norm_cross: bool = True
    grad_checkpointing: bool = False
    # Not in the release (off in "paper" and "debug"): inputs that let a narrow network tell the grid's
    # cells and images apart (docs/generate.md, on the earlier packed-token structure DiT: a debug network
    # sampled a training shape back from its view at IoU 0.88 with them, 0.17 without; on this network,
    # 5 smooth random latents under fixed random 64-token conditions, 300 CPU steps: sample-to-target MSE
    # 0.049 with them, 0.827 without, 0.47 against 0.28 s a step). learned_positions: a table of one
    # vector per token, added to the sinusoids (width-64 sinusoids tell few of 8 cells apart);
    # grid_condition_tokens > 0: each of
    # the condition's tokens projected to grid_condition_channels values, flattened in the image's order,
    # through an MLP to one vector per token, added to the input.
    learned_positions: bool = False
    grid_condition_tokens: int = 0
    grid_condition_channels: int = 8
    grid_condition_hidden: int = 256
    # > 0: the MLP ends in grid_condition_rank values per token, mapped to the width by one linear shared by
    # every token (8³ tokens at width 64 behind a 1024-wide hidden layer: 4.2 M parameters at rank 8 instead
    # of 33.6 M for the full last layer).
    grid_condition_rank: int = 0

    def __post_init__(self):
        if self.width % self.heads:
            raise ValueError(f"width ({self.width}) must be a multiple of heads ({self.heads})")
        if self.grid_condition_tokens < 0 or (self.grid_condition_tokens and min(
                self.grid_condition_channels, self.grid_condition_hidden) < 1):
            raise ValueError(f"grid condition: tokens must be >= 0 and channels, hidden >= 1, got "
                             f"{self.grid_condition_tokens}, {self.grid_condition_channels}, {self.grid_condition_hidden}")
        if self.grid_condition_rank < 0:
            raise ValueError(f"grid_condition_rank must be >= 0, got {self.grid_condition_rank}")
        if self.resolution % self.patch_size:
            raise ValueError(f"resolution ({self.resolution}) must be a multiple of patch_size ({self.patch_size})")

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def tokens(self) -> int:
        return (self.resolution // self.patch_size) ** 3

    @classmethod
    def named(cls, name: str, **overrides) -> "DenseDiTConfig":
        return named_config(DENSE_DIT_CONFIGS, name, overrides, "structure DiT")

    @classmethod
    def from_official(cls, params: dict) -> "DenseDiTConfig":
        """Our config from the ``params:`` of the release's DenseDiT (its defaults where not given)."""
        unknown = sorted(set(params) - set(_OFFICIAL_DEFAULTS) - set(_OFFICIAL_REQUIRED))
        if unknown:
            raise ValueError(f"DenseDiT: unknown parameter(s) {unknown}")
        missing = [k for k in _OFFICIAL_REQUIRED if k not in params]
        if missing:
            raise ValueError(f"DenseDiT: missing parameter(s) {missing}")
        p = {**_OFFICIAL_DEFAULTS, **params}
        if p["pe_mode"] != "ape":
            raise ValueError(f"DenseDiT: pe_mode {p['pe_mode']!r} is not supported (the release uses 'ape')")
        width = int(p["model_channels"])
        heads = int(p["num_heads"]) if p["num_heads"] is not None else width // int(p["num_head_channels"])
        cfg = cls(resolution=int(p["resolution"]), in_channels=int(p["in_channels"]),
                  out_channels=int(p["out_channels"]), width=width, cond_dim=int(p["cond_channels"]),
                  depth=int(p["num_blocks"]), heads=heads, mlp_ratio=float(p["mlp_ratio"]),
                  patch_size=int(p["patch_size"]), share_mod=bool(p["share_mod"]), qk_norm=bool(p["qk_rms_norm"]),
                  qk_norm_cross=bool(p["qk_rms_norm_cross"]), grad_checkpointing=bool(p["use_checkpoint"]))
        shape = list(p["latent_shape"])
        if shape != [cfg.out_channels] + [cfg.resolution] * 3:
            raise ValueError(f"DenseDiT: latent_shape {shape} does not match out_channels {cfg.out_channels} "
                             f"and resolution {cfg.resolution}")
        return cfg

    @classmethod
    def from_dict(cls, d: dict) -> "DenseDiTConfig":
        return strict_from_dict(cls, d)


_OFFICIAL_REQUIRED = ("resolution", "in_channels", "model_channels", "cond_channels", "out_channels", "num_blocks")
# use_fp16 only picks the release's storage dtype; we choose ours at run time
_OFFICIAL_DEFAULTS = dict(num_heads=None, num_head_channels=64, mlp_ratio=4, patch_size=2, pe_mode="ape",
                          use_fp16=False, use_checkpoint=False, share_mod=False, qk_rms_norm=False,
                          qk_rms_norm_cross=False, latent_shape=[8, 16, 16, 16])

DENSE_DIT_CONFIGS = {
    # The released network: what model_dense.ckpt's "dit" holds.
    "paper": DenseDiTConfig(),
    # Same layout, narrow, on 2³ patches (512 tokens of 64 channels): trains on a CPU (tests, the demo).
    "debug": DenseDiTConfig(width=64, cond_dim=64, depth=2, heads=4, patch_size=2),
    # debug + the grid inputs, for the 64 tokens of the built-in image encoder (what the CPU demo trains); the
    # image reaches the cells through a 1024-wide hidden layer (256: latent IoU from new views 0.714, 1024: 0.763)
    # and 8 values a token (the full last layer's IoU in 0.57x the CPU time a step, so 32 views a mesh get the
    # steps they need: 0.87 from new views; docs/demo.md)
    "debug_grid": DenseDiTConfig(width=64, cond_dim=64, depth=2, heads=4, patch_size=2, learned_positions=True,
                                 grid_condition_tokens=64, grid_condition_hidden=1024, grid_condition_rank=8),
}


# The q/k norms in one kernel (kernels/head_rms_norm) on CUDA, with a one-kernel backward for training.
FUSED_HEAD_NORMS = True

# On CUDA: each block's three norms with their modulation (or the cross-attention norm's affine map) as one
# kernel over each sample's rows (kernels/norm_modulate, differentiable), as the SS-DiT's blocks
# (model.dit.FUSED_NORMS); the release's path rounds after the float32 norm and again after the multiply-add.
FUSED_NORMS = True


class MultiHeadRMSNorm(nn.Module):
    """x / ||x|| · sqrt(D) · gamma over each head's channels, in float32; gamma is (heads, D)."""

    def __init__(self, heads: int, dim: int):
        super().__init__()
        self.scale = dim ** 0.5
        self.gamma = nn.Parameter(torch.ones(heads, dim))

    def forward(self, x):  # (..., H, D)
        if FUSED_HEAD_NORMS:  # one pass on CUDA (and one for the backward), the float32 PyTorch reference elsewhere
            return head_rms_norm(x, self.gamma)
        return (F.normalize(x.float(), dim=-1) * self.gamma.float() * self.scale).to(x.dtype)


@float32_attention  # float32 under CPU bfloat16 autocast (model.cpu_precision)
def _attention(q, k, v):
    """(B, L, H, D) queries and (B, S, H, D) keys/values -> (B, L, H·D)."""
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return o.transpose(1, 2).flatten(2)


class _Attention(nn.Module):
    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__()
        self.heads, self.qk_norm = heads, qk_norm
        if qk_norm:
            self.q_rms_norm = MultiHeadRMSNorm(heads, width // heads)
            self.k_rms_norm = MultiHeadRMSNorm(heads, width // heads)
        self.to_out = nn.Linear(width, width)


class SelfAttention(_Attention):
    def __init__(self, width: int, heads: int, qk_norm: bool):
        super().__init__(width, heads, qk_norm)
        self.to_qkv = nn.Linear(width, 3 * width)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.to_qkv(x).reshape(b, n, 3, self.heads, -1).unbind(2)
        if self.qk_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return self.to_out(_attention(q, k, v))


class CrossAttention(_Attention):
    def __init__(self, width: int, cond_dim: int, heads: int, qk_norm: bool):
        super().__init__(width, heads, qk_norm)
        self.to_q = nn.Linear(width, width)
        self.to_kv = nn.Linear(cond_dim, 2 * width)

    def forward(self, x, cond):
        b, n, _ = x.shape
        q = self.to_q(x).reshape(b, n, self.heads, -1)
        k, v = self.to_kv(cond).reshape(b, cond.shape[1], 2, self.heads, -1).unbind(2)
        if self.qk_norm:
            q, k = self.q_rms_norm(q), self.k_rms_norm(k)
        return self.to_out(_attention(q, k, v))


class FeedForward(nn.Module):
    def __init__(self, width: int, ratio: float):
        super().__init__()
        hidden = int(width * ratio)
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, width))

    def forward(self, x):
        return gelu_mlp(self.mlp, x)


def _layer_norm(x, norm: nn.Module | None = None, eps: float = 1e-6):
    """LayerNorm in float32 (the release keeps its norms' weights in float32 under half precision)."""
    w, b = (norm.weight.float(), norm.bias.float()) if norm is not None else (None, None)
    return F.layer_norm(x.float(), x.shape[-1:], w, b, eps).to(x.dtype)


class DenseDiTBlock(nn.Module):
    """adaLN self-attention, cross-attention after an affine LayerNorm, adaLN MLP (ModulatedTransformerCrossBlock)."""

    def __init__(self, cfg: DenseDiTConfig):
        super().__init__()
        self.norm2 = nn.LayerNorm(cfg.width, eps=1e-6)  # the only affine norm of the block (before cross-attention)
        self.self_attn = SelfAttention(cfg.width, cfg.heads, cfg.qk_norm)
        self.cross_attn = CrossAttention(cfg.width, cfg.cond_dim, cfg.heads, cfg.qk_norm_cross)
        self.mlp = FeedForward(cfg.width, cfg.mlp_ratio)
        if not cfg.share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))

    def forward(self, x, mod, cond):
        if hasattr(self, "adaLN_modulation"):
            mod = self.adaLN_modulation(mod)
        if FUSED_NORMS and x.is_cuda:
            return self._forward_fused(x, mod, cond)
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod[:, None].chunk(6, dim=-1)
        h = _layer_norm(x) * (1 + scale_a) + shift_a
        x = x + self.self_attn(h) * gate_a
        x = x + self.cross_attn(_layer_norm(x, self.norm2), cond)
        h = _layer_norm(x) * (1 + scale_m) + shift_m
        return x + self.mlp(h) * gate_m

    def _forward_fused(self, x, mod, cond):
        """forward() with kernels/norm_modulate over (B·N, W) rows, one segment a sample; under autocast the
        normalised rows are stored in its dtype, which the linear layers reading them cast to."""
        b, n, w = x.shape
        shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = mod.chunk(6, dim=-1)
        offsets = [i * n for i in range(b + 1)]
        out = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype

        def norm(x, a, c):
            return norm_modulate_segments(x.reshape(b * n, w), a, c, offsets, 1e-6, out).view(b, n, w)

        # the gated residuals as one multiply-add each (one pass over the rows instead of two)
        x = torch.addcmul(x, self.self_attn(norm(x, 1 + scale_a, shift_a)), gate_a[:, None])
        x = x + self.cross_attn(norm(x, self.norm2.weight[None], self.norm2.bias[None]), cond)
        return torch.addcmul(x, self.mlp(norm(x, 1 + scale_m, shift_m)), gate_m[:, None])


def patchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """(B, C, D, H, W) -> (B, C·p³, D/p, H/p, W/p), channels in (c, i, j, k) order of the offset in the patch."""
    b, c, d, h, w = x.shape
    x = x.reshape(b, c, d // p, p, h // p, p, w // p, p).permute(0, 1, 3, 5, 7, 2, 4, 6)
    return x.reshape(b, c * p ** 3, d // p, h // p, w // p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    """Inverse of ``patchify``."""
    b, c, g1, g2, g3 = x.shape
    x = x.reshape(b, c // p ** 3, p, p, p, g1, g2, g3).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c // p ** 3, g1 * p, g2 * p, g3 * p)


def grid_coords(side: int, device=None) -> torch.Tensor:
    """(side³, 3) integer coords of a side³ grid in row-major (i, j, k) order."""
    r = torch.arange(side, device=device)
    return torch.stack(torch.meshgrid(r, r, r, indexing="ij"), dim=-1).reshape(-1, 3)


def grid_condition_layers(cond_dim: int, tokens: int, channels: int, hidden: int, cells: int, width: int,
                          rank: int) -> tuple[nn.Sequential, nn.Linear | None]:
    """The grid condition of the demo's DiTs (not in the release): each of the image's ``tokens`` tokens to
    ``channels`` values, flattened in the image's order, through a ``hidden``-wide MLP to one vector per grid
    cell, ``width`` wide, or ``rank`` wide and then mapped to the width by the second layer returned (None at
    rank 0), which every cell shares."""
    mlp = nn.Sequential(nn.Linear(cond_dim, channels), nn.Flatten(), nn.Linear(tokens * channels, hidden), nn.SiLU(),
                        nn.Linear(hidden, cells * (rank or width)))
    return mlp, (nn.Linear(rank, width) if rank else None)


class DenseDiT(nn.Module):
    """Velocity of the structure latent: (x (B, C, R, R, R), t (B,) in [0, 1], cond (B, L, cond_dim)) -> like x."""

    def __init__(self, cfg: DenseDiTConfig = DENSE_DIT_CONFIGS["paper"]):
        super().__init__()
        self.cfg = cfg
        p = cfg.patch_size
        self.t_embedder = TimestepEmbedder(cfg.width)
        if cfg.share_mod:
            self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(cfg.width, 6 * cfg.width))
        self.register_buffer("pos_emb", position_embedding_3d(grid_coords(cfg.resolution // p), cfg.width))
        self.input_layer = nn.Linear(cfg.in_channels * p ** 3, cfg.width)
        if cfg.learned_positions:
            self.grid_pos = nn.Parameter(torch.zeros(cfg.tokens, cfg.width))
        if cfg.grid_condition_tokens:
            self.grid_cond, self.grid_cond_up = grid_condition_layers(
                cfg.cond_dim, cfg.grid_condition_tokens, cfg.grid_condition_channels, cfg.grid_condition_hidden,
                cfg.tokens, cfg.width, cfg.grid_condition_rank)
        self.blocks = nn.ModuleList(DenseDiTBlock(cfg) for _ in range(cfg.depth))
        self.out_layer = nn.Linear(cfg.width, cfg.out_channels * p ** 3)
        self._init_weights()

    @property
    def config(self) -> DenseDiTConfig:
        return self.cfg

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        # adaLN-zero: every block starts as the identity, the output at zero
        mods = [self.adaLN_modulation] if self.cfg.share_mod else [b.adaLN_modulation for b in self.blocks]
        for lin in [m[-1] for m in mods] + [self.out_layer]:
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)
        if self.cfg.learned_positions:
            nn.init.normal_(self.grid_pos, std=0.02)
        if self.cfg.grid_condition_tokens:  # starts small next to the input and the positions
            nn.init.normal_(self.grid_cond[-1].weight, std=0.02 / 16)

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        want = (cfg.in_channels,) + (cfg.resolution,) * 3
        if tuple(x.shape[1:]) != want:
            raise ValueError(f"DenseDiT: input of shape {tuple(x.shape)}, expected (B, {', '.join(map(str, want))})")
        p, g = cfg.patch_size, cfg.resolution // cfg.patch_size
        h = patchify(x, p).flatten(2).transpose(1, 2)
        h = self.input_layer(h) + self.pos_emb.to(h.dtype)
        if cfg.learned_positions:
            h = h + self.grid_pos.to(h.dtype)
        if cfg.grid_condition_tokens:
            if cond.shape[1] != cfg.grid_condition_tokens:
                raise ValueError(f"the condition has {cond.shape[1]} tokens; this network's grid condition reads "
                                 f"{cfg.grid_condition_tokens} (grid_condition_tokens)")
            rank = cfg.grid_condition_rank
            per_token = self.grid_cond(cond.to(h.dtype)).view(x.shape[0], cfg.tokens, rank or cfg.width)
            h = h + (self.grid_cond_up(per_token) if rank else per_token)
        mod = self.t_embedder(t.reshape(-1).expand(x.shape[0]))
        if cfg.share_mod:
            mod = self.adaLN_modulation(mod)
        mod, cond = mod.to(h.dtype), cond.to(h.dtype)
        for block in self.blocks:
            if cfg.grad_checkpointing and self.training and torch.is_grad_enabled():
                h = checkpoint(block, h, mod, cond, use_reentrant=False)
            else:
                h = block(h, mod, cond)
        h = self.out_layer(F.layer_norm(h.float(), h.shape[-1:]).to(h.dtype))
        h = h.transpose(1, 2).reshape(x.shape[0], -1, g, g, g)
        return unpatchify(h, p)


def official_to_ours(state_dict: dict, cfg: DenseDiTConfig) -> dict:
    """The release's DenseDiT state dict -> ours (same keys, ``pos_emb`` included; checked against ``cfg``)."""
    return check_layout(state_dict, DenseDiT, cfg, "DenseDiT")


def ours_to_official(state_dict: dict, cfg: DenseDiTConfig) -> dict:
    """Inverse of ``official_to_ours``."""
    return check_layout(state_dict, DenseDiT, cfg, "DenseDiT (ours)")
