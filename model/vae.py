"""SS-VAE: sparse SDF at resolution R <-> 16-channel sparse latent at R/8 (Direct3D-S2 §3.2).

Encoder: Linear(1→32), three down blocks 32→64→128→512 (GroupNorm, SiLU,
mean-pool ×2, two 3×3×3 submanifold convs, skip), 4 shifted-window transformer
blocks, a head giving the mean and log-variance of the latent. The decoder
mirrors it with subdivide (×2, all 8 children) blocks and ends in tanh. The
decoder normalises per voxel (LayerNorm), so chunked decoding equals whole
decoding and 1024³ output never needs to be in memory at once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import nn
from model.configs import strict_from_dict

from .sparse import (
    SparseConv3d,
    SparseDownsample,
    SparseGroupNorm,
    SparseLayerNorm,
    SparseLinear,
    SparseSiLU,
    SparseSubdivide,
    SparseTensor,
    SparseTransformerBlock,
    sinusoidal_positions,
)


@dataclass
class VAEConfig:
    channels: tuple[int, ...] = (32, 64, 128, 512)  # stem width, then one entry per down block
    latent_channels: int = 16
    num_blocks: int = 4  # transformer blocks on each side
    num_heads: int = 8
    window: int = 8  # attention window, latent voxels per axis
    mlp_ratio: float = 4.0

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if len(self.channels) < 2:
            raise ValueError(f"VAEConfig.channels: need a stem width and at least one down block, got {self.channels}")
        if self.channels[-1] % self.num_heads:
            raise ValueError(f"VAEConfig: width {self.channels[-1]} is not divisible by num_heads {self.num_heads}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channels) - 1)

    @classmethod
    def named(cls, name: str) -> "VAEConfig":
        if name not in VAE_SIZES:
            raise ValueError(f"VAEConfig: unknown size {name!r} (known: {', '.join(VAE_SIZES)})")
        return dataclasses.replace(VAE_SIZES[name])

    @classmethod
    def from_dict(cls, d: dict) -> "VAEConfig":
        return strict_from_dict(cls, d)


VAE_SIZES = {
    "paper": VAEConfig(),
    "small": VAEConfig(channels=(16, 32, 64, 256), num_blocks=2, num_heads=8),
    "tiny": VAEConfig(channels=(8, 16, 32, 64), num_blocks=1, num_heads=4),
}


def _groups(c: int) -> int:
    return max(1, min(32, c // 4))


class DownBlock(nn.Module):
    """GroupNorm, SiLU, mean-pool ×2, conv, GroupNorm, SiLU, conv; plus a pooled skip."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.act = SparseGroupNorm(_groups(cin), cin), SparseSiLU()
        self.pool = SparseDownsample(2)
        self.conv1 = SparseConv3d(cin, cout)
        self.norm2 = SparseGroupNorm(_groups(cout), cout)
        self.conv2 = SparseConv3d(cout, cout)
        self.skip = SparseLinear(cin, cout) if cin != cout else None

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.conv1(self.pool(self.act(self.norm1(x))))
        h = self.conv2(self.act(self.norm2(h)))
        s = self.pool(x)
        return h.replace(h.feats + (self.skip(s).feats if self.skip is not None else s.feats))


class UpBlock(nn.Module):
    """LayerNorm, SiLU, subdivide ×2, conv, LayerNorm, SiLU, conv; plus a subdivided skip."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.act = SparseLayerNorm(cin), SparseSiLU()
        self.up = SparseSubdivide()
        self.conv1 = SparseConv3d(cin, cout)
        self.norm2 = SparseLayerNorm(cout)
        self.conv2 = SparseConv3d(cout, cout)
        self.skip = SparseLinear(cin, cout) if cin != cout else None

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.conv1(self.up(self.act(self.norm1(x))))
        h = self.conv2(self.act(self.norm2(h)))
        s = self.up(x)
        return h.replace(h.feats + (self.skip(s).feats if self.skip is not None else s.feats))


def _transformer(cfg: VAEConfig) -> nn.ModuleList:
    width = cfg.channels[-1]
    # alternate blocks shift the windows by half a window (Swin-style)
    return nn.ModuleList(
        SparseTransformerBlock(width, cfg.num_heads, cfg.window, (i % 2) * (cfg.window // 2), cfg.mlp_ratio)
        for i in range(cfg.num_blocks)
    )


class SparseSDFEncoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c = cfg.channels
        self.stem = SparseLinear(1, c[0])
        self.down = nn.ModuleList(DownBlock(a, b) for a, b in zip(c[:-1], c[1:]))
        self.blocks = _transformer(cfg)
        self.norm = SparseLayerNorm(c[-1])
        self.head = SparseLinear(c[-1], 2 * cfg.latent_channels)

    def forward(self, x: SparseTensor) -> SparseTensor:
        h = self.stem(x)
        for blk in self.down:
            h = blk(h)
        h = h.replace(h.feats + sinusoidal_positions(h.coords[:, 1:], h.num_channels).to(h.dtype))
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.norm(h))


class SparseSDFDecoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        c = cfg.channels
        self.stem = SparseLinear(cfg.latent_channels, c[-1])
        self.blocks = _transformer(cfg)
        rev = c[::-1]
        self.up = nn.ModuleList(UpBlock(a, b) for a, b in zip(rev[:-1], rev[1:]))
        self.norm, self.act = SparseLayerNorm(c[0]), SparseSiLU()
        self.out = SparseLinear(c[0], 1)

    def latent_features(self, z: SparseTensor) -> SparseTensor:
        """Stem, positions and transformer blocks at the latent resolution."""
        h = self.stem(z)
        h = h.replace(h.feats + sinusoidal_positions(h.coords[:, 1:], h.num_channels).to(h.dtype))
        for blk in self.blocks:
            h = blk(h)
        return h

    def upsample(self, h: SparseTensor) -> SparseTensor:
        """Up blocks and the tanh head: latent features -> SDF values (one channel) at full resolution."""
        for blk in self.up:
            h = blk(h)
        h = self.out(self.act(self.norm(h)))
        return h.replace(torch.tanh(h.feats))

    def forward(self, z: SparseTensor) -> SparseTensor:
        return self.upsample(self.latent_features(z))


class SparseSDFVAE(nn.Module):
    def __init__(self, cfg: VAEConfig | None = None):
        super().__init__()
        self.config = cfg or VAEConfig()
        self.encoder = SparseSDFEncoder(self.config)
        self.decoder = SparseSDFDecoder(self.config)

    def encode(self, x: SparseTensor, sample: bool = True) -> tuple[SparseTensor, torch.Tensor, torch.Tensor]:
        """SDF (one channel) -> (latent z, mean, log-variance) at resolution R / 8."""
        if x.num_channels != 1:
            raise ValueError(f"SparseSDFVAE.encode: input must have 1 channel (the SDF), got {x.num_channels}")
        if x.resolution % self.config.downsample:
            raise ValueError(f"SparseSDFVAE.encode: resolution {x.resolution} is not a multiple of {self.config.downsample}")
        if not bool(torch.isfinite(x.feats).all()):
            raise ValueError("SparseSDFVAE.encode: the SDF holds NaN or infinite values")
        stats = self.encoder(x)
        mean, logvar = stats.feats.float().chunk(2, dim=1)
        logvar = logvar.clamp(-30.0, 20.0)
        z = mean + torch.randn_like(mean) * torch.exp(0.5 * logvar) if sample else mean
        return stats.replace(z.to(x.dtype)), mean, logvar

    def decode(self, z: SparseTensor, chunk: int | None = None, halo: int = 2) -> SparseTensor:
        """Latent -> SDF at 8× resolution on all children of the latent voxels.

        With ``chunk``, the up blocks run on cubes of ``chunk`` latent voxels
        (plus ``halo`` on each side for the convs' reach) one at a time; the
        result is the same as whole decoding.
        """
        h = self.decoder.latent_features(z)
        if chunk is None:
            return self.decoder.upsample(h)
        return _decode_chunked(self.decoder, h, chunk, halo, self.config.downsample)

    def forward(self, x: SparseTensor, sample: bool = True):
        z, mean, logvar = self.encode(x, sample)
        return self.decode(z), mean, logvar


def _decode_chunked(decoder: SparseSDFDecoder, h: SparseTensor, chunk: int, halo: int, scale: int) -> SparseTensor:
    from kernels.sparse_conv import coord_keys

    cell = torch.div(h.coords[:, 1:], chunk, rounding_mode="floor")
    ids = torch.unique(torch.cat([h.coords[:, :1], cell], 1), dim=0)
    coords, feats = [], []
    for cid in ids:
        lo = cid[1:] * chunk
        near = (h.coords[:, 0] == cid[0]) & ((h.coords[:, 1:] >= lo - halo) & (h.coords[:, 1:] < lo + chunk + halo)).all(1)
        sub = SparseTensor(h.coords[near], h.feats[near], h.resolution, h.batch_size, check=False)
        out = decoder.upsample(sub)
        parent = torch.div(out.coords[:, 1:], scale, rounding_mode="floor")
        core = ((parent >= lo) & (parent < lo + chunk)).all(1)
        coords.append(out.coords[core])
        feats.append(out.feats[core])
    coords, feats = torch.cat(coords), torch.cat(feats)
    order = torch.argsort(coord_keys(coords, h.resolution * scale))
    return SparseTensor(coords[order], feats[order], h.resolution * scale, h.batch_size, check=False)
