"""DINOv2 ViT with register tokens, reading the torch-hub checkpoint (``dinov2_vitl14_reg4_pretrained.pth``).

The released generator conditions on DINOv2 ViT-L/14-reg's ``x_prenorm``: the tokens after the last
block, before the final norm, in the order [class, 4 registers, 37² patches] at 518², then a LayerNorm
without affine parameters. This module has the hub checkpoint's parameter names, so its ``.pth`` loads
strictly with ``torch.load(weights_only=True)`` and no hub code runs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class DinoV2Config:
    width: int = 1024
    depth: int = 24
    heads: int = 16
    patch: int = 14
    image_size: int = 518
    registers: int = 4
    mlp_ratio: float = 4.0
    eps: float = 1e-6

    @classmethod
    def named(cls, name: str) -> "DinoV2Config":
        sizes = {"vitl14_reg": cls(), "vitb14_reg": cls(width=768, depth=12, heads=12),
                 "vits14_reg": cls(width=384, depth=12, heads=6), "vitg14_reg": cls(width=1536, depth=40, heads=24),
                 "tiny": cls(width=64, depth=2, heads=4, image_size=56)}
        if name not in sizes:
            raise ValueError(f"unknown DINOv2 size {name!r}; known: {', '.join(sizes)}")
        return sizes[name]


class _PatchEmbed(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        self.proj = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class _Attention(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.width, 3 * cfg.width)
        self.proj = nn.Linear(cfg.width, cfg.width)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(b, n, c))


class _Mlp(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        hidden = int(cfg.width * cfg.mlp_ratio)
        self.fc1 = nn.Linear(cfg.width, hidden)
        self.fc2 = nn.Linear(hidden, cfg.width)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x)))


class _LayerScale(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((width,), 1e-5))

    def forward(self, x):
        return x * self.gamma


class _Block(nn.Module):
    def __init__(self, cfg: DinoV2Config):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.attn = _Attention(cfg)
        self.ls1 = _LayerScale(cfg.width)
        self.norm2 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = _Mlp(cfg)
        self.ls2 = _LayerScale(cfg.width)

    def forward(self, x):
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class DinoV2(nn.Module):
    """ViT with registers; ``forward`` returns the pre-norm tokens (B, 1 + registers + patches, width)."""

    def __init__(self, cfg: DinoV2Config = DinoV2Config()):
        super().__init__()
        self.cfg = cfg
        grid = cfg.image_size // cfg.patch
        self.patch_embed = _PatchEmbed(cfg)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.width))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + grid * grid, cfg.width))
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.registers, cfg.width))
        self.mask_token = nn.Parameter(torch.zeros(1, cfg.width))  # masked-image training only; kept to load strictly
        self.blocks = nn.ModuleList(_Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.width, eps=cfg.eps)

    @property
    def num_tokens(self) -> int:
        return 1 + self.cfg.registers + (self.cfg.image_size // self.cfg.patch) ** 2

    def _positions(self, h: int, w: int) -> torch.Tensor:
        pos = self.pos_embed
        n = pos.shape[1] - 1
        side = int(math.isqrt(n))
        if h == w == side:
            return pos
        patch = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        patch = F.interpolate(patch, size=(h, w), mode="bicubic", antialias=True, align_corners=False)
        patch = patch.to(pos.dtype).permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], patch], dim=1)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W), already normalised with the ImageNet mean and std."""
        b, _, h, w = images.shape
        p = self.cfg.patch
        if h % p or w % p:
            raise ValueError(f"image size {h}x{w} is not a multiple of the patch size {p}")
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self._positions(h // p, w // p)
        x = torch.cat([x[:, :1], self.register_tokens.expand(b, -1, -1), x[:, 1:]], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return x


def load_hub_checkpoint(path: str, cfg: DinoV2Config | None = None) -> DinoV2:
    """A DINOv2 torch-hub ``.pth`` (plain tensors, read with weights_only=True) as a ``DinoV2``."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ValueError(f"image encoder {path}: not found") from None
    except (RuntimeError, OSError, EOFError) as e:
        raise ValueError(f"image encoder {path}: unreadable as plain tensors ({str(e).splitlines()[0][:160]})") from None
    if not isinstance(state, dict) or "pos_embed" not in state:
        raise ValueError(f"image encoder {path}: not a DINOv2 state dict (no pos_embed)")
    if cfg is None:
        width = state["pos_embed"].shape[-1]
        depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        grid = int(math.isqrt(state["pos_embed"].shape[1] - 1))
        patch = state["patch_embed.proj.weight"].shape[-1]
        heads = max(1, width // 64)  # every DINOv2 size has heads of 64 channels
        hidden = state["blocks.0.mlp.fc1.weight"].shape[0]
        cfg = DinoV2Config(width=width, depth=depth, heads=heads, patch=patch, image_size=grid * patch,
                           registers=state["register_tokens"].shape[1] if "register_tokens" in state else 0,
                           mlp_ratio=hidden / width)
    if "register_tokens" not in state:
        raise ValueError(f"image encoder {path}: a DINOv2 without registers; the release conditions on ViT-L/14-reg")
    with torch.device("meta"):
        model = DinoV2(cfg)
    model = model.to_empty(device="cpu")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise ValueError(f"image encoder {path}: weights do not fit DINOv2 {cfg} ({str(e).splitlines()[0]})") from None
    return model.eval().requires_grad_(False)
