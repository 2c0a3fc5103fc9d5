"""Dense structure VAE (Direct3D-S2 §3.4): 64³ occupancy <-> 16³×8 latent, as released (DenseShapeVAE).

Encoder: a 3³ conv into channels[0], then per level ``enc_blocks`` residual blocks and a stride-2
2³ conv to the next level's width, ``enc_middle_blocks`` residual blocks at the last width, and
LayerNorm-over-channels + SiLU + a 3³ conv to the posterior's mean and log-variance. Decoder: a 3³
conv from the latent, ``dec_middle_blocks`` residual blocks, then per level ``dec_blocks`` residual
blocks and an upsampling 3³ conv to 8× the next width followed by a 3D pixel shuffle; the same
norm/SiLU/conv head to one occupancy logit per voxel. A residual block is
norm-SiLU-conv-norm-SiLU-conv plus the input, its second conv zero at initialisation.

Occupancy enters the encoder as ±1 (occupied = +1). The DiT samples latents in a normalised space;
``unscale`` maps them back (z / latents_scale + latents_shift) before decoding, and the decoded
occupancy is sigmoid(logit) >= 0.1 (the released pipeline's threshold).

State-dict keys equal the release's, so ``official_to_ours`` / ``ours_to_official`` only check keys
and shapes.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from model.configs import strict_from_dict


@dataclass(frozen=True)
class DenseVAEConfig:
    enc_channels: tuple = (32, 128, 512)
    dec_channels: tuple = (512, 128, 32)
    enc_blocks: int = 2
    enc_middle_blocks: int = 2
    dec_blocks: int = 2
    dec_middle_blocks: int = 2
    latent_channels: int = 8
    in_channels: int = 1
    out_channels: int = 1
    latents_scale: float = 1.0
    latents_shift: float = 0.0
    grad_checkpointing: bool = False
    # Training only (not in the release; they set initial values, not the layout):
    kl_weight: float = 1e-3
    dice_weight: float = 1.0
    # the decoder's output bias starts at logit(prior), so the first steps need not push every logit of
    # the ~88% empty voxels from 0 (sigmoid 0.5, above the 0.1 threshold) down to the class prior
    occupancy_prior: float = 0.12
    # the posterior starts narrow (std e^(-3/2)) so the decoder sees the encoder's mean, not unit noise
    logvar_init: float = -3.0

    def __post_init__(self):
        object.__setattr__(self, "enc_channels", tuple(int(c) for c in self.enc_channels))
        object.__setattr__(self, "dec_channels", tuple(int(c) for c in self.dec_channels))
        if len(self.enc_channels) != len(self.dec_channels):
            raise ValueError(f"enc_channels {self.enc_channels} and dec_channels {self.dec_channels} differ in levels")
        if not 0 < self.occupancy_prior < 1:
            raise ValueError(f"occupancy_prior: must be in (0, 1), got {self.occupancy_prior}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.enc_channels) - 1)

    @classmethod
    def named(cls, name: str, **overrides) -> "DenseVAEConfig":
        return named_config(DENSE_VAE_CONFIGS, name, overrides, "structure VAE")

    @classmethod
    def from_official(cls, params: dict) -> "DenseVAEConfig":
        """Our config from the ``params:`` of the release's DenseShapeVAE (its defaults where not given)."""
        p = {**_OFFICIAL_DEFAULTS, **params}
        unknown = sorted(set(p) - set(_OFFICIAL_DEFAULTS))
        if unknown:
            raise ValueError(f"DenseShapeVAE: unknown parameter(s) {unknown}")
        if int(p["embed_dim"]) < 1:
            raise ValueError(f"DenseShapeVAE: embed_dim must be >= 1, got {p['embed_dim']}")
        return cls(enc_channels=tuple(p["model_channels_encoder"]), dec_channels=tuple(p["model_channels_decoder"]),
                   enc_blocks=int(p["num_res_blocks_encoder"]), enc_middle_blocks=int(p["num_res_blocks_middle_encoder"]),
                   dec_blocks=int(p["num_res_blocks_decoder"]), dec_middle_blocks=int(p["num_res_blocks_middle_decoder"]),
                   latent_channels=int(p["embed_dim"]), in_channels=int(p["in_channels"]),
                   out_channels=int(p["out_channels"]), latents_scale=float(p["latents_scale"]),
                   latents_shift=float(p["latents_shift"]), grad_checkpointing=bool(p["use_checkpoint"]))

    @classmethod
    def from_dict(cls, d: dict) -> "DenseVAEConfig":
        return strict_from_dict(cls, d)


def named_config(table: dict, name: str, overrides: dict, what: str):
    """``table[name]`` with ``overrides``; an unknown name or key is a ValueError naming it."""
    if name not in table:
        raise ValueError(f"unknown {what} config {name!r}; expected one of {sorted(table)}")
    cfg = table[name]
    known = {f.name for f in fields(cfg)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {type(cfg).__name__} key(s) {unknown}; known: {sorted(known)}")
    return replace(cfg, **overrides)


# The release's constructor defaults (use_fp16 only picks its storage dtype; we choose ours at run time).
_OFFICIAL_DEFAULTS = dict(embed_dim=0, model_channels_encoder=[32, 128, 512], model_channels_decoder=[512, 128, 32],
                          num_res_blocks_encoder=2, num_res_blocks_middle_encoder=2, num_res_blocks_decoder=2,
                          num_res_blocks_middle_decoder=2, in_channels=1, out_channels=1, use_fp16=False,
                          use_checkpoint=False, latents_scale=1.0, latents_shift=0.0)

DENSE_VAE_CONFIGS = {
    # The released network (193 M parameters): what model_dense.ckpt's "vae" holds.
    "paper": DenseVAEConfig(dec_channels=(512, 128, 64), dec_blocks=4, dec_middle_blocks=4),
    # Same layout, narrow: trains on a CPU (tests, the demo).
    "debug": DenseVAEConfig(enc_channels=(8, 16, 32), dec_channels=(32, 16, 8), enc_blocks=1, enc_middle_blocks=1,
                            dec_blocks=1, dec_middle_blocks=1),
}


# On a CPU the trunks' activations are kept channels-last (N, D, H, W, C in memory) from their first convolution on.
# In PyTorch's default layout they switch back and forth: a channel LayerNorm hands its convolution channels-last
# rows (20 of the debug VAE's 24 convolutions read such), a trunk's input and the residual sums do not, and each
# switch costs a reorder. The demo's 64³ structure VAE training step (4 shapes, bfloat16 autocast, one thread, AMD
# EPYC) 2.12 -> 1.89 s, 1.13x (benchmarks/cpu_step.py, RESULTS.md); False keeps the default layout.
CPU_CHANNELS_LAST = True


def _layout(h: torch.Tensor) -> torch.Tensor:
    if CPU_CHANNELS_LAST and h.device.type == "cpu":
        return h.contiguous(memory_format=torch.channels_last_3d)
    return h


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channels of a (B, C, *spatial) tensor, in float32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.layer_norm(x.float().movedim(1, -1), self.normalized_shape, self.weight.float(), self.bias.float(), self.eps)
        return h.movedim(-1, 1).to(x.dtype)


class ResBlock3d(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.norm1 = ChannelLayerNorm(channels)
        self.norm2 = ChannelLayerNorm(channels)
        self.conv1 = nn.Conv3d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv3d(channels, channels, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return x + self.conv2(F.silu(self.norm2(h)))


class Downsample3d(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout, 2, stride=2)

    def forward(self, x):
        return self.conv(x)


def pixel_shuffle_3d(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C·f³, D, H, W) -> (B, C, D·f, H·f, W·f); channel c·f³ + (a·f + b)·f + d fills offset (a, b, d)."""
    b, c, d, h, w = x.shape
    c //= factor ** 3
    x = x.reshape(b, c, factor, factor, factor, d, h, w).permute(0, 1, 5, 2, 6, 3, 7, 4)
    return x.reshape(b, c, d * factor, h * factor, w * factor)


class Upsample3d(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv = nn.Conv3d(cin, cout * 8, 3, padding=1)

    def forward(self, x):
        return _layout(pixel_shuffle_3d(self.conv(x), 2))


def _head(channels: int, out: int) -> nn.Sequential:
    return nn.Sequential(ChannelLayerNorm(channels), nn.SiLU(), nn.Conv3d(channels, out, 3, padding=1))


class _Trunk(nn.Module):
    """Runs ``blocks`` (and ``middle_block``), checkpointing each when training with grad_checkpointing."""

    checkpointing = False

    def _run(self, block, h):
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, h, use_reentrant=False)
        return block(h)


class StructureEncoder(_Trunk):
    def __init__(self, cfg: DenseVAEConfig):
        super().__init__()
        ch = cfg.enc_channels
        self.input_layer = nn.Conv3d(cfg.in_channels, ch[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            self.blocks.extend(ResBlock3d(c) for _ in range(cfg.enc_blocks))
            if i < len(ch) - 1:
                self.blocks.append(Downsample3d(c, ch[i + 1]))
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[-1]) for _ in range(cfg.enc_middle_blocks)])
        self.out_layer = _head(ch[-1], 2 * cfg.latent_channels)

    def forward(self, x):
        h = _layout(self.input_layer(x))
        for block in self.blocks:
            h = self._run(block, h)
        for block in self.middle_block:
            h = self._run(block, h)
        return self.out_layer(h)


class StructureDecoder(_Trunk):
    def __init__(self, cfg: DenseVAEConfig):
        super().__init__()
        ch = cfg.dec_channels
        self.input_layer = nn.Conv3d(cfg.latent_channels, ch[0], 3, padding=1)
        self.middle_block = nn.Sequential(*[ResBlock3d(ch[0]) for _ in range(cfg.dec_middle_blocks)])
        self.blocks = nn.ModuleList()
        for i, c in enumerate(ch):
            self.blocks.extend(ResBlock3d(c) for _ in range(cfg.dec_blocks))
            if i < len(ch) - 1:
                self.blocks.append(Upsample3d(c, ch[i + 1]))
        self.out_layer = _head(ch[-1], cfg.out_channels)

    def forward(self, z):
        h = _layout(self.input_layer(z))
        for block in self.middle_block:
            h = self._run(block, h)
        for block in self.blocks:
            h = self._run(block, h)
        return self.out_layer(h)


class DenseShapeVAE(nn.Module):
    """64³ occupancy (B, 1, 64, 64, 64) <-> latent (B, 8, 16, 16, 16); ``decode`` returns logits."""

    def __init__(self, cfg: DenseVAEConfig = DENSE_VAE_CONFIGS["paper"]):
        super().__init__()
        self.cfg = cfg
        self.encoder = StructureEncoder(cfg)
        self.decoder = StructureDecoder(cfg)
        self.encoder.checkpointing = self.decoder.checkpointing = cfg.grad_checkpointing
        with torch.no_grad():
            self.decoder.out_layer[-1].bias.fill_(math.log(cfg.occupancy_prior / (1 - cfg.occupancy_prior)))
            self.encoder.out_layer[-1].bias[cfg.latent_channels:].fill_(cfg.logvar_init)

    @property
    def config(self) -> DenseVAEConfig:
        return self.cfg

    def posterior(self, occ: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, log-variance clamped to [-30, 20]) of the latent given occupancy in {0, 1}."""
        x = occ.to(self.encoder.input_layer.weight.dtype) * 2.0 - 1.0
        mean, logvar = self.encoder(x).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, occ: torch.Tensor, sample: bool = False):
        """Latent (the posterior's mode, or a sample of it) with the posterior's mean and log-variance."""
        mean, logvar = self.posterior(occ)
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean) if sample else mean
        return z, mean, logvar

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Occupancy logits (B, 1, 64, 64, 64)."""
        return self.decoder(z)

    def scale(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latent -> the DiT's normalised latent (the inverse of ``unscale``)."""
        return (z - self.cfg.latents_shift) * self.cfg.latents_scale

    def unscale(self, z: torch.Tensor) -> torch.Tensor:
        """The DiT's sampled latent -> the VAE's latent: z / latents_scale + latents_shift."""
        return z / self.cfg.latents_scale + self.cfg.latents_shift

    @torch.no_grad()
    def occupied_voxels(self, sampled: torch.Tensor, threshold: float = 0.1) -> list[torch.Tensor]:
        """The released structure decode: unscale, decode, sigmoid >= threshold -> (M_i, 3) int64 per item,
        in row-major (x, y, z) order."""
        logits = self.decode(self.unscale(sampled))
        return [(torch.sigmoid(logits[i, 0].float()) >= threshold).nonzero() for i in range(len(logits))]

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


def check_layout(state_dict: dict, module_cls: type, cfg, what: str) -> dict:
    """``state_dict`` if it has exactly the keys and shapes of ``module_cls(cfg)``; else a ValueError naming a key."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in module_cls(cfg).state_dict().items()}
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    for kind, keys in (("missing", missing), ("unexpected", extra)):
        if keys:
            more = f" (+{len(keys) - 1} more)" if len(keys) > 1 else ""
            raise ValueError(f"{what}: {kind} key {keys[0]}{more}")
    for k, shape in expected.items():
        if tuple(state_dict[k].shape) != shape:
            raise ValueError(f"{what}: key {k} has shape {tuple(state_dict[k].shape)}, expected {shape}")
    return dict(state_dict)


def official_to_ours(state_dict: dict, cfg: DenseVAEConfig) -> dict:
    """The release's DenseShapeVAE state dict -> ours (same keys; checked against ``cfg``'s layout)."""
    return check_layout(state_dict, DenseShapeVAE, cfg, "DenseShapeVAE")


def ours_to_official(state_dict: dict, cfg: DenseVAEConfig) -> dict:
    """Inverse of ``official_to_ours``."""
    return check_layout(state_dict, DenseShapeVAE, cfg, "DenseShapeVAE (ours)")
