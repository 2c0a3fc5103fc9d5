"""Image conditioning: images -> condition tokens (B, L, C) for the DiT cross-attention.

DINOv2 ViT-L/14 with registers at 518² gives 1 + 4 + 37² = 1,374 tokens of width 1024 (DESIGN.md);
it loads through ``transformers`` only from a path or hub name the user configures. The built-in
``TinyImageEncoder`` needs no weights: it is what tests and the demo run.
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def decode_image(data: bytes, size: int, name: str = "image") -> torch.Tensor:
    """PNG/JPEG bytes -> float (3, size, size) in [0, 1]; RGBA composited on white."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        img.load()
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{name}: unreadable image ({e})") from e
    if img.mode == "RGBA":
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(bg, img)
    img = img.convert("RGB").resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device).view(1, 3, 1, 1)
    return (images - mean) / std


@dataclass(frozen=True)
class TinyEncoderConfig:
    image_size: int = 64
    patch: int = 8
    width: int = 64
    depth: int = 2
    heads: int = 4


class TinyImageEncoder(nn.Module):
    """Patch embedding + a few transformer layers; same call as the DINOv2 wrapper."""

    def __init__(self, cfg: TinyEncoderConfig = TinyEncoderConfig()):
        super().__init__()
        self.cfg = cfg
        self.image_size = cfg.image_size
        self.dim = cfg.width
        self.patch = nn.Conv2d(3, cfg.width, cfg.patch, stride=cfg.patch)
        n = (cfg.image_size // cfg.patch) ** 2
        self.pos = nn.Parameter(torch.randn(1, n, cfg.width) * 0.02)
        layer = nn.TransformerEncoderLayer(cfg.width, cfg.heads, 4 * cfg.width, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.width)

    @property
    def num_tokens(self) -> int:
        return (self.cfg.image_size // self.cfg.patch) ** 2

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> (B, L, width)."""
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        x = self.patch(normalize(x)).flatten(2).transpose(1, 2) + self.pos
        return self.norm(self.layers(x))


class Dinov2Encoder(nn.Module):
    """DINOv2 (with registers) through ``transformers``; all tokens of the last layer, layer-normed."""

    def __init__(self, name_or_path: str, image_size: int = 518):
        super().__init__()
        try:
            from transformers import AutoModel
        except ImportError as e:
            raise ImportError(f"image encoder {name_or_path!r} needs the 'transformers' package") from e
        try:
            self.model = AutoModel.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:  # a missing folder, a bad hub name, no network for a hub name
            raise ValueError(f"image encoder {name_or_path!r}: cannot load it through transformers "
                             f"({str(e).splitlines()[0]})") from e
        self.image_size = image_size
        self.dim = self.model.config.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(images, size=(self.image_size, self.image_size), mode="bicubic", align_corners=False)
        return self.model(pixel_values=normalize(x)).last_hidden_state


def build_image_encoder(spec: str) -> nn.Module:
    """'tiny' -> the built-in encoder (seeded, so every worker builds the same one); else DINOv2 from a path/hub name."""
    if spec == "tiny":
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(0)
            enc = TinyImageEncoder()
        return enc.eval().requires_grad_(False)
    return Dinov2Encoder(spec).eval().requires_grad_(False)


def drop_condition(cond: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero the condition of each sample with probability ``rate`` (classifier-free guidance training)."""
    if rate <= 0:
        return cond
    keep = (torch.rand(cond.shape[0], generator=generator) >= rate).to(cond.device, cond.dtype)
    return cond * keep.view(-1, *([1] * (cond.ndim - 1)))
