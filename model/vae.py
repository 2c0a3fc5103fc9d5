"""SS-VAE: sparse SDF at resolution R <-> 16-channel sparse latent at R/8 (Direct3D-S2 §3.2).

The layout is the released SparseSDFVAE's, so its weights load through
``official_to_ours``. For a transformer width C (512):

- encoder: Linear(1 → C/16); three down blocks C/16 → C/8 → C/4 → C, each
  GroupNorm(32, float32) + SiLU, pool ×2 (the skip pools the block's input; the
  release's pool is sum / (children + 1), a zero counted into the mean),
  conv 3³, GroupNorm + SiLU, conv 3³, plus a 1×1 skip; then Linear(C → C) +
  absolute sinusoidal positions, 4 shifted-window transformer blocks (windows of
  8 latent voxels, shift 4 on odd blocks), LayerNorm without parameters, and
  Linear(C → 2·16): the mean and log-variance of the latent.
- decoder: Linear(16 → C) + positions, 4 transformer blocks, three subdivide
  blocks C → C/4 → C/8 → C/16, each conv 3³ + SiLU, ×2 into all 8 children,
  conv 3³ + SiLU (no norms, no skips), then Linear(C/16 → 1) and tanh.

The decoder's convs are local and it has no norms, so its up blocks can run on
cubes of the latent grid one at a time: an output voxel depends on the latent
voxels within 3 of its parent (the six convs reach 1 + ½ + ½ + ¼ + ¼ + ⅛ latent
voxels), so a halo of 3 makes chunked decoding equal whole decoding.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from kernels.sparse_conv import coord_keys
from model.configs import strict_from_dict
from model.embeddings import position_embedding_3d
from model.mesh_extract import extract_mesh

from .sparse import (
    SparseConv3d,
    SparseDownsample,
    SparseGroupNorm,
    SparseLinear,
    SparseSiLU,
    SparseSubdivide,
    SparseTensor,
    SparseTransformerBlock,
    kernel_from_torchsparse,
    kernel_to_torchsparse,
    run_layers,
)

CHUNK_HALO = 3  # latent voxels around a decoded chunk that make it exact (see the module docstring)


@dataclass
class VAEConfig:
    latent_channels: int = 16  # the release's embed_dim
    enc_channels: int = 512  # encoder transformer width; its down blocks run at /16, /8, /4 of it
    dec_channels: int = 512  # decoder transformer width; its up blocks run at /4, /8, /16 of it
    enc_blocks: int = 4
    dec_blocks: int = 4
    enc_heads: int = 8
    dec_heads: int = 8
    window: int = 8  # attention window, latent voxels per axis; odd blocks shift by half of it
    mlp_ratio: float = 4.0
    num_groups: int = 32  # GroupNorm groups of the encoder's down blocks (fixed at 32 in the release)
    out_channels: int = 1
    resolution: int = 64  # latent grid side the network was built for (64 at 512³, 128 at 1024³)
    chunk_size: int = 1  # > 1: eval decoding splits the latent grid into chunk_size³ cubes
    levels: int = 3  # ×2 down / up blocks on each side (the release: 3, latent = R / 8); fewer keep the
    # narrowest blocks' widths off the full-resolution end: 2 gives latent = R / 4 (the 64³ demo's SS-VAE)
    latents_scale: float = 1.0  # the DiT sees (z - shift) · scale
    latents_shift: float = 0.0

    def __post_init__(self):
        for name in ("enc_channels", "dec_channels"):
            if getattr(self, name) % 16:
                raise ValueError(f"VAEConfig.{name}: {getattr(self, name)} is not a multiple of 16")
        for width, heads, side in ((self.enc_channels, self.enc_heads, "enc"), (self.dec_channels, self.dec_heads, "dec")):
            if heads < 1 or width % heads:
                raise ValueError(f"VAEConfig: {side}_channels {width} is not divisible by {side}_heads {heads}")
        if self.num_groups < 1 or any(c % self.num_groups for c in self.channels):
            raise ValueError(f"VAEConfig.num_groups: {self.num_groups} does not divide the encoder widths {self.channels}")
        if self.latent_channels < 1 or self.out_channels < 1:
            raise ValueError(f"VAEConfig: latent_channels and out_channels must be >= 1, got "
                             f"{self.latent_channels} and {self.out_channels}")
        if self.latents_scale == 0:
            raise ValueError("VAEConfig.latents_scale must not be 0")
        if self.levels not in (1, 2, 3):
            raise ValueError(f"VAEConfig.levels: {self.levels} is not 1, 2 or 3")

    @property
    def channels(self) -> tuple[int, ...]:
        """Encoder widths: stem, then the output of each down block (the last ``levels`` + 1 of /16, /8, /4, ×1)."""
        c = self.enc_channels
        return (c // 16, c // 8, c // 4, c)[3 - self.levels:]

    @property
    def dec_widths(self) -> tuple[int, ...]:
        """Decoder widths: transformer, then the output of each up block (the first ``levels`` + 1 of ×1, /4, /8, /16)."""
        c = self.dec_channels
        return (c, c // 4, c // 8, c // 16)[:self.levels + 1]

    @property
    def downsample(self) -> int:
        return 2 ** self.levels

    @classmethod
    def named(cls, name: str) -> "VAEConfig":
        if name not in VAE_SIZES:
            raise ValueError(f"VAEConfig: unknown size {name!r} (known: {', '.join(VAE_SIZES)})")
        return dataclasses.replace(VAE_SIZES[name])

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return strict_from_dict(cls, d)

    @classmethod
    def from_official(cls, params: dict) -> "VAEConfig":
        """Our config from the ``params:`` of the release's SparseSDFVAE (its defaults where not given)."""
        unknown = sorted(set(params) - set(_OFFICIAL_DEFAULTS))
        if unknown:
            raise ValueError(f"SparseSDFVAE: unknown parameter(s) {unknown}")
        p = {**_OFFICIAL_DEFAULTS, **params}
        if int(p["embed_dim"]) < 1:
            raise ValueError(f"SparseSDFVAE: embed_dim must be >= 1, got {p['embed_dim']}")

        def heads(side: str) -> int:
            # the release: num_heads, or width // num_head_channels when num_heads is not given
            width, h = int(p[f"model_channels_{side}"]), p[f"num_heads_{side}"]
            return int(h) if h else width // int(p[f"num_head_channels_{side}"])

        return cls(latent_channels=int(p["embed_dim"]), enc_channels=int(p["model_channels_encoder"]),
                   dec_channels=int(p["model_channels_decoder"]), enc_blocks=int(p["num_blocks_encoder"]),
                   dec_blocks=int(p["num_blocks_decoder"]), enc_heads=heads("encoder"), dec_heads=heads("decoder"),
                   out_channels=int(p["out_channels"]), resolution=int(p["resolution"]),
                   chunk_size=int(p["chunk_size"]), latents_scale=float(p["latents_scale"]),
                   latents_shift=float(p["latents_shift"]))


# The release's constructor defaults. use_fp16 picks its storage dtype and use_checkpoint its activation
# recomputation: run-time choices here, accepted and not stored.
_OFFICIAL_DEFAULTS = dict(embed_dim=0, resolution=64, model_channels_encoder=512, num_blocks_encoder=4,
                          num_heads_encoder=8, num_head_channels_encoder=64, model_channels_decoder=512,
                          num_blocks_decoder=4, num_heads_decoder=8, num_head_channels_decoder=64, out_channels=1,
                          use_fp16=False, use_checkpoint=False, chunk_size=1, latents_scale=1.0, latents_shift=0.0)

VAE_SIZES = {
    # The released network: what model_sparse_512.ckpt / model_sparse_1024.ckpt hold under "vae".
    "paper": VAEConfig(),
    # Same layout, narrower: CPU training, tests and the demo.
    "small": VAEConfig(enc_channels=256, dec_channels=256, enc_blocks=2, dec_blocks=2, num_groups=16),
    "tiny": VAEConfig(enc_channels=128, dec_channels=128, enc_blocks=2, dec_blocks=2, enc_heads=4, dec_heads=4,
                      num_groups=8),
}
VAE_SIZES["debug"] = VAE_SIZES["tiny"]
# tiny with two levels: latent = R / 4 (the 64³ demo's SS-VAE; docs/demo.md)
VAE_SIZES["debug_r4"] = dataclasses.replace(VAE_SIZES["tiny"], levels=2)


class SparseDownBlock3d(nn.Module):
    """GroupNorm, SiLU, mean-pool ×2, conv, GroupNorm, SiLU, conv; plus the pooled input through a 1×1 skip."""

    def __init__(self, cin: int, cout: int, num_groups: int):
        super().__init__()
        self.act_layers = nn.Sequential(SparseGroupNorm(num_groups, cin), SparseSiLU())
        self.down = SparseDownsample(2, zero_in_mean=True)
        self.out_layers = nn.Sequential(SparseConv3d(cin, cout), SparseGroupNorm(num_groups, cout), SparseSiLU(),
                                        SparseConv3d(cout, cout))
        self.skip_connection = SparseLinear(cin, cout) if cin != cout else nn.Identity()

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = run_layers(self.out_layers, self.down(run_layers(self.act_layers, x)))
        s = self.skip_connection(self.down(x))
        return h.replace(h.feats + s.feats)


class SparseSubdivideBlock3d(nn.Module):
    """Conv, SiLU, subdivide ×2 into all 8 children, conv, SiLU."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.act_layers = nn.Sequential(SparseConv3d(cin, cout), SparseSiLU())
        self.sub = SparseSubdivide()
        self.out_layers = nn.Sequential(SparseConv3d(cout, cout), SparseSiLU())

    def forward(self, x: SparseTensor) -> SparseTensor:
        return self.out_layers(self.sub(self.act_layers(x)))


def _transformer(width: int, heads: int, blocks: int, cfg: VAEConfig) -> nn.ModuleList:
    # alternate blocks shift the windows by half a window (Swin-style)
    return nn.ModuleList(SparseTransformerBlock(width, heads, cfg.window, (i % 2) * (cfg.window // 2), cfg.mlp_ratio)
                         for i in range(blocks))


def _init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class SparseSDFEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c = cfg.channels
        self.input_layer1 = SparseLinear(1, c[0])
        self.downsample = nn.ModuleList(SparseDownBlock3d(a, b, cfg.num_groups) for a, b in zip(c[:-1], c[1:]))
        self.input_layer = SparseLinear(c[-1], c[-1])
        self.blocks = _transformer(c[-1], cfg.enc_heads, cfg.enc_blocks, cfg)
        self.out_layer = SparseLinear(c[-1], 2 * cfg.latent_channels)
        self.apply(_init_linear)
        nn.init.zeros_(self.out_layer.weight)

    def forward(self, x: SparseTensor, factor: float | None = None) -> SparseTensor:
        h = self.input_layer1(x)
        for blk in self.downsample:
            h = blk(h)
        pos = position_embedding_3d(h.coords[:, 1:], h.num_channels, factor or 1.0)
        h = self.input_layer(h)
        h = h.replace((h.feats.float() + pos).to(h.dtype))  # summed in float32, as the release's promotion does
        for blk in self.blocks:
            h = blk(h)
        return self.out_layer(h.replace(F.layer_norm(h.feats, h.feats.shape[-1:])))


class SparseSDFDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        w = cfg.dec_widths
        self.input_layer = SparseLinear(cfg.latent_channels, w[0])
        self.blocks = _transformer(w[0], cfg.dec_heads, cfg.dec_blocks, cfg)
        self.upsample = nn.ModuleList(SparseSubdivideBlock3d(a, b) for a, b in zip(w[:-1], w[1:]))
        self.out_layer = SparseLinear(w[-1], cfg.out_channels)
        self.apply(_init_linear)
        nn.init.zeros_(self.out_layer.weight)

    def latent_features(self, z: SparseTensor, factor: float | None = None) -> SparseTensor:
        """Input layer, positions and transformer blocks at the latent resolution."""
        h = self.input_layer(z)
        pos = position_embedding_3d(z.coords[:, 1:], h.num_channels, factor or 1.0)
        h = h.replace((h.feats.float() + pos).to(h.dtype))
        for blk in self.blocks:
            h = blk(h)
        return h

    def upsample_features(self, h: SparseTensor) -> SparseTensor:
        """Up blocks: latent features -> features at 8× resolution on all children (what the refiner reads)."""
        for blk in self.upsample:
            h = blk(h)
        return h

    def head(self, h: SparseTensor) -> SparseTensor:
        """Output layer and tanh: SDF values."""
        out = self.out_layer(h)
        return out.replace(torch.tanh(out.feats))

    def forward(self, z: SparseTensor, factor: float | None = None) -> SparseTensor:
        return self.head(self.upsample_features(self.latent_features(z, factor)))


class SparseSDFVAE(nn.Module):
    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.config = cfg or VAEConfig()
        self.encoder = SparseSDFEncoder(self.config)
        self.decoder = SparseSDFDecoder(self.config)

    def encode(self, x: SparseTensor, sample: bool = True,
               factor: float | None = None) -> tuple[SparseTensor, torch.Tensor, torch.Tensor]:
        """SDF (one channel) -> (latent z, mean, log-variance) at resolution R / ``config.downsample`` (8 as released).

        ``factor`` scales the coordinates the position embedding sees (the release's ``batch["factor"]``).
        """
        if x.num_channels != 1:
            raise ValueError(f"SparseSDFVAE.encode: input must have 1 channel (the SDF), got {x.num_channels}")
        if x.resolution % self.config.downsample:
            raise ValueError(f"SparseSDFVAE.encode: resolution {x.resolution} is not a multiple of "
                             f"{self.config.downsample}")
        if not bool(torch.isfinite(x.feats).all()):
            raise ValueError("SparseSDFVAE.encode: the SDF holds NaN or infinite values")
        stats = self.encoder(x, factor)
        mean, logvar = stats.feats.float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return stats.replace(z.to(x.dtype)), mean, logvar

    def decode(self, z: SparseTensor, chunk: int | None = None, halo: int = CHUNK_HALO, factor: float | None = None,
               return_feat: bool = False) -> SparseTensor | tuple[SparseTensor, SparseTensor]:
        """Latent -> SDF at ``config.downsample``× resolution (8 as released) on all children of the latent voxels, sorted by key.

        With ``chunk``, the up blocks run on cubes of ``chunk`` latent voxels (plus ``halo`` on each side)
        one at a time; with the default halo the result equals whole decoding. ``chunk=None`` in eval mode
        follows the config's ``chunk_size`` (cubes of resolution / chunk_size, as the release decodes).
        ``return_feat`` also returns the last up block's features (C/16 channels), which the refiner reads.
        """
        if chunk is None and not self.training and self.config.chunk_size > 1:
            chunk = max(1, self.config.resolution // self.config.chunk_size)
        h = self.decoder.latent_features(z, factor)
        if chunk is None:
            feat = self.decoder.upsample_features(h)
        else:
            feat = _upsample_chunked(self.decoder, h, int(chunk), int(halo), self.config.downsample)
        sdf = self.decoder.head(feat)
        return (sdf, feat) if return_feat else sdf

    def decode_mesh(self, latents: SparseTensor, voxel_resolution: int | None = None, mc_threshold: float = 0.2,
                    chunk: int | None = None, factor: float | None = None) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Latents -> one (vertices, faces) mesh per batch element: the iso-surface SDF = ``mc_threshold``.

        Vertices are mapped as the release maps its marching-cubes output, ``2·i / voxel_resolution − 1``
        for voxel index i (``voxel_resolution`` defaults to the decoded grid's). The surface is found on the
        sparse SDF by marching tetrahedra (model.mesh_extract), not on a dense grid.
        """
        sdf = self.decode(latents, chunk=chunk, factor=factor)
        res = sdf.resolution
        scale = res / float(voxel_resolution or res)
        meshes = []
        for rows in sdf.layout:
            v, f = extract_mesh(sdf.coords[rows, 1:], sdf.feats[rows, 0].float(), res, level=mc_threshold)
            # extract_mesh puts voxel i at -1 + (i + 1/2)·2/R
            meshes.append(((v - 1.0 / res) * scale + (scale - 1.0), f))
        return meshes

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """Encoder latents -> the space the DiT samples in: (z − latents_shift) · latents_scale."""
        return (z - self.config.latents_shift) * self.config.latents_scale

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """DiT samples -> decoder latents: z / latents_scale + latents_shift (the release, before decode_mesh)."""
        return z / self.config.latents_scale + self.config.latents_shift

    def forward(self, x: SparseTensor, sample: bool = True):
        z, mean, logvar = self.encode(x, sample)
        return self.decode(z), mean, logvar


def _upsample_chunked(decoder: SparseSDFDecoder, h: SparseTensor, chunk: int, halo: int, down: int) -> SparseTensor:
    """Up blocks cube by cube: each cube of ``chunk`` latent voxels with ``halo`` around it, keeping its own children."""
    if chunk < 1 or halo < 0:
        raise ValueError(f"SparseSDFVAE.decode: chunk must be >= 1 and halo >= 0, got {chunk} and {halo}")
    cell = torch.div(h.coords[:, 1:], chunk, rounding_mode="floor")
    ids = torch.unique(torch.cat([h.coords[:, :1], cell], 1), dim=0)
    coords, feats = [], []
    for cid in ids:
        lo = cid[1:] * chunk
        near = (h.coords[:, 0] == cid[0]) & ((h.coords[:, 1:] >= lo - halo) & (h.coords[:, 1:] < lo + chunk + halo)).all(1)
        sub = SparseTensor(h.coords[near], h.feats[near], h.resolution, h.batch_size, check=False)
        out = decoder.upsample_features(sub)
        parent = torch.div(out.coords[:, 1:], down, rounding_mode="floor")
        core = ((parent >= lo) & (parent < lo + chunk)).all(1)
        coords.append(out.coords[core])
        feats.append(out.feats[core])
    coords, feats = torch.cat(coords), torch.cat(feats)
    res = h.resolution * down
    order = torch.argsort(coord_keys(coords, res))
    return SparseTensor(coords[order], feats[order], res, h.batch_size, check=False)


# -- the released state-dict layout ---------------------------------------------------------------------
# Our keys equal the release's except at its torchsparse convolutions: a 3³ conv's ``P.weight`` is the
# release's ``P.conv.kernel`` in our offset order, and a 1×1 skip (our SparseLinear) is its ``conv.kernel``
# transposed; both biases are ``P.conv.bias``.


def _layout(cfg: VAEConfig) -> dict[str, tuple[str, str, tuple[int, ...]]]:
    """Our key -> (released key, how it converts: same / conv / transpose, our shape)."""
    with torch.device("meta"):
        model = SparseSDFVAE(cfg)
    kind = {}
    for name, mod in model.named_modules():
        if isinstance(mod, SparseConv3d):
            kind[f"{name}.weight"], kind[f"{name}.bias"] = ("conv", f"{name}.conv.kernel"), ("same", f"{name}.conv.bias")
        elif isinstance(mod, SparseLinear) and name.endswith("skip_connection"):
            kind[f"{name}.weight"], kind[f"{name}.bias"] = ("transpose", f"{name}.conv.kernel"), ("same", f"{name}.conv.bias")
    return {k: (kind.get(k, ("same", k))[1], kind.get(k, ("same", k))[0], tuple(v.shape))
            for k, v in model.state_dict().items()}


def _released_shape(how: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    return shape[::-1] if how == "transpose" else shape


def _check_keys(given: dict, expected: dict[str, tuple[int, ...]], side: str) -> None:
    missing = sorted(set(expected) - set(given))
    if missing:
        raise ValueError(f"SparseSDFVAE ({side}): missing tensor {missing[0]!r}"
                         f"{f' and {len(missing) - 1} more' if len(missing) > 1 else ''}")
    extra = sorted(set(given) - set(expected))
    if extra:
        raise ValueError(f"SparseSDFVAE ({side}): unexpected tensor {extra[0]!r}"
                         f"{f' and {len(extra) - 1} more' if len(extra) > 1 else ''}")
    for k, shape in expected.items():
        if tuple(given[k].shape) != shape:
            raise ValueError(f"SparseSDFVAE ({side}): tensor {k!r} has shape {tuple(given[k].shape)}, expected {shape}")


def official_to_ours(state_dict: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """The release's SparseSDFVAE state dict -> ours (sparse-conv kernels reordered, 1×1 skips transposed)."""
    layout = _layout(cfg)
    _check_keys(state_dict, {rk: _released_shape(how, s) for rk, how, s in layout.values()}, "released")
    out = {}
    for ours, (rk, how, _) in layout.items():
        t = state_dict[rk]
        out[ours] = kernel_from_torchsparse(t) if how == "conv" else t.t().contiguous() if how == "transpose" else t
    return out


def ours_to_official(state_dict: dict[str, torch.Tensor], cfg: VAEConfig) -> dict[str, torch.Tensor]:
    """Our state dict -> the release's SparseSDFVAE layout (inverse of official_to_ours)."""
    layout = _layout(cfg)
    _check_keys(state_dict, {k: s for k, (_, _, s) in layout.items()}, "ours")
    out = {}
    for ours, (rk, how, _) in layout.items():
        t = state_dict[ours]
        out[rk] = kernel_to_torchsparse(t) if how == "conv" else t.t().contiguous() if how == "transpose" else t
    return out
