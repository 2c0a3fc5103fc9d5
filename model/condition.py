"""Image conditioning: images -> condition tokens (B, L, C) for the DiTs' cross-attention.

Preparation follows the released generator: the object's alpha (from the image, or from a
background-removal model where the image has none) gives its bounding box; the crop is composited on
white, padded to a square, resized to 518², padded by 16 pixels and resized back to 518² (aspect kept,
never stretched). The encoder is DINOv2 ViT-L/14 with registers: its pre-norm tokens of the last block
[class, 4 registers, 37² patches] = 1,374 tokens of width 1024, then a LayerNorm without affine
parameters. It loads from the torch-hub checkpoint file (``model.dinov2``) or a ``transformers`` folder,
only from a path the user configures. The built-in ``TinyImageEncoder`` needs no weights: tests and the
demo run it.
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RELEASE_SIZE = 518
RELEASE_PAD = 16  # extra white border of the released preparation at 518² (scaled at other sizes)


def read_rgba(data: bytes, name: str = "image", max_pixels: int = 64_000_000) -> tuple[np.ndarray, bool]:
    """PNG/JPEG/... bytes -> (H, W, 4) uint8 and whether the file carried an alpha channel."""
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > max_pixels:
            raise ValueError(f"{name}: {img.width}x{img.height} pixels is over the limit of {max_pixels:,}")
        img.load()
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise ValueError(f"{name}: unreadable image ({e})") from e
    has_alpha = img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info)
    return np.asarray(img.convert("RGBA")), has_alpha


def prepare_image(rgba: np.ndarray, size: int = RELEASE_SIZE, name: str = "image") -> torch.Tensor:
    """(H, W, 4) uint8 with the object's alpha -> (4, size, size) float: RGB on white in [0, 1], then alpha.

    Crop to the pixels with alpha > 0 (the whole image when fewer than 0.1% are), composite on white,
    pad to a square (white, alpha 0), resize, pad by 16/518 of the side and resize back."""
    from PIL import Image

    if rgba.ndim != 3 or rgba.shape[2] != 4:
        raise ValueError(f"{name}: expected (H, W, 4) RGBA, got {rgba.shape}")
    h, w = rgba.shape[:2]
    alpha = rgba[..., 3]
    ys, xs = np.nonzero(alpha > 0)
    if ys.size >= h * w * 0.001:
        rgba = rgba[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    a = rgba[..., 3:].astype(np.float64) / 255.0
    rgb = rgba[..., :3].astype(np.float64) / 255.0 * a + (1.0 - a)
    rgb = Image.fromarray((rgb * 255).astype(np.uint8))
    mask = Image.fromarray((a[..., 0] * 255).astype(np.uint8))
    side = max(rgb.width, rgb.height)
    left, top = (side - rgb.width) // 2, (side - rgb.height) // 2
    sq_rgb = Image.new("RGB", (side, side), (255, 255, 255))
    sq_rgb.paste(rgb, (left, top))
    sq_mask = Image.new("L", (side, side), 0)
    sq_mask.paste(mask, (left, top))
    pad = round(RELEASE_PAD * size / RELEASE_SIZE)
    out_rgb = _pad(sq_rgb.resize((size, size), Image.BILINEAR), pad, (255, 255, 255)).resize((size, size), Image.BILINEAR)
    out_mask = _pad(sq_mask.resize((size, size), Image.NEAREST), pad, 0).resize((size, size), Image.NEAREST)
    rgb_t = torch.from_numpy(np.asarray(out_rgb, dtype=np.float32) / 255.0).permute(2, 0, 1)
    mask_t = torch.from_numpy(np.asarray(out_mask, dtype=np.float32) / 255.0)[None]
    return torch.cat([rgb_t, mask_t])


def _pad(img, pad: int, fill):
    from PIL import Image

    if pad <= 0:
        return img
    out = Image.new(img.mode, (img.width + 2 * pad, img.height + 2 * pad), fill)
    out.paste(img, (pad, pad))
    return out


class BackgroundRemover:
    """A matting/segmentation model exported to ONNX (e.g. BiRefNet), run by onnxruntime from a local file.

    ONNX files hold a graph and tensors, no code. Input: (1, 3, S, S) ImageNet-normalised RGB; the
    last output's first channel, through a sigmoid (``logits=True``) or as is, is the foreground alpha."""

    def __init__(self, path: str, size: int = 1024, logits: bool = True):
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise ImportError("background removal needs onnxruntime (pip install 's2ray[rembg]')") from e
        if not os.path.isfile(path):
            raise ValueError(f"background model {path}: not found")
        try:
            self.session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ValueError(f"background model {path}: not a readable ONNX model ({str(e).splitlines()[0][:160]})") from None
        self.input = self.session.get_inputs()[0].name
        self.size, self.logits = size, logits

    def __call__(self, rgb: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 -> (H, W, 4) uint8 with the model's alpha."""
        from PIL import Image

        img = Image.fromarray(rgb).resize((self.size, self.size), Image.BILINEAR)
        x = (np.asarray(img, dtype=np.float32) / 255.0 - np.array(IMAGENET_MEAN, np.float32)) / np.array(IMAGENET_STD, np.float32)
        out = self.session.run(None, {self.input: x.transpose(2, 0, 1)[None]})[-1]
        alpha = np.asarray(out, dtype=np.float32).reshape(-1, *out.shape[-2:])[0]
        if self.logits:
            alpha = 1.0 / (1.0 + np.exp(-alpha))
        alpha = Image.fromarray((np.clip(alpha, 0, 1) * 255).astype(np.uint8)).resize(rgb.shape[1::-1], Image.BILINEAR)
        return np.concatenate([rgb, np.asarray(alpha)[..., None]], axis=-1)


def decode_image(data: bytes, size: int, name: str = "image", background: BackgroundRemover | None = None,
                 with_mask: bool = False) -> torch.Tensor:
    """Image bytes -> the prepared (3, size, size) RGB in [0, 1] (``with_mask``: (4, ...) with alpha last).

    An image without alpha goes through ``background``; without one configured it is an error naming the
    image (a photo's background would otherwise be taken for the object)."""
    rgba, has_alpha = read_rgba(data, name)
    if not has_alpha:
        if background is None:
            raise ValueError(f"{name}: has no alpha channel and no background-removal model is configured "
                             f"(give RGBA images or set a background model)")
        rgba = background(rgba[..., :3])
    img = prepare_image(rgba, size, name)
    return img if with_mask else img[:3]


def normalize(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=images.device, dtype=images.dtype).view(1, 3, 1, 1)
    return (images - mean) / std


def pack_condition(tokens: torch.Tensor, masks: torch.Tensor, patch: int = 14):
    """The released sparse-condition input: per image the class and register tokens (coords (0, 0, 1)) and
    the patch tokens its alpha covers (coords (column, row, 0), row-major), packed with offsets.

    ``tokens`` (B, head + h·w, C) [class, registers, patches]; ``masks`` (B, 1, H, W) alpha in [0, 1].
    Returns (tokens (M, C), coords (M, 3) int32, cu_seqlens (B + 1,) int32)."""
    cover = condition_mask(masks, patch)
    b, n, _ = tokens.shape
    grid = cover.shape[1] * cover.shape[2]
    head = n - grid
    if head < 1:
        raise ValueError(f"image tokens ({n}) do not hold the {grid} patches of the alpha mask plus class tokens")
    parts, coords, counts = [], [], [0]
    for i in range(b):
        pos = torch.nonzero(cover[i])  # (K, 2) (row, column)
        parts += [tokens[i, :head], tokens[i, head:][pos[:, 0] * cover.shape[2] + pos[:, 1]]]
        coords += [torch.tensor([[0, 0, 1]], device=tokens.device).expand(head, 3),
                   torch.stack([pos[:, 1], pos[:, 0], torch.zeros_like(pos[:, 0])], 1)]
        counts.append(head + len(pos))
    cu = torch.tensor(np.cumsum(counts), device=tokens.device, dtype=torch.int32)
    return torch.cat(parts), torch.cat(coords).int(), cu


def condition_mask(masks: torch.Tensor, patch: int = 14) -> torch.Tensor:
    """Alpha (B, 1, H, W) -> which patch tokens the object covers (B, H/patch, W/patch): the released
    sparse-condition DiT attends only to those patches (plus the class and register tokens)."""
    return F.max_pool2d(masks.float(), kernel_size=patch, stride=patch).squeeze(1) > 0


@dataclass(frozen=True)
class TinyEncoderConfig:
    image_size: int = 64
    patch: int = 8
    width: int = 64
    depth: int = 2
    heads: int = 4
    # Append each patch's own pixels (1 - luma: 0 on the white background, scaled to [-1, 1]) to its token, so
    # the silhouette reaches the DiTs exactly rather than through random layers ('tiny-pixels'; docs/demo.md).
    pixels: bool = False


LUMA = (0.299, 0.587, 0.114)


class TinyImageEncoder(nn.Module):
    """Patch embedding + a few transformer layers; same call as the DINOv2 wrapper."""

    def __init__(self, cfg: TinyEncoderConfig = TinyEncoderConfig()):
        super().__init__()
        self.cfg = cfg
        self.image_size = cfg.image_size
        self.dim = cfg.width + (cfg.patch ** 2 if cfg.pixels else 0)
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
        tokens = self.norm(self.layers(self.patch(normalize(x)).flatten(2).transpose(1, 2) + self.pos))
        if not self.cfg.pixels:
            return tokens
        luma = torch.tensordot(x, torch.tensor(LUMA, device=x.device, dtype=x.dtype), dims=([1], [0]))
        pixels = F.unfold(1.0 - luma[:, None], self.cfg.patch, stride=self.cfg.patch).transpose(1, 2)
        return torch.cat([tokens, 2.0 * pixels - 1.0], -1)


class ReleaseImageEncoder(nn.Module):
    """DINOv2-reg as the released generator uses it: resize the short side to 518 and centre-crop,
    ImageNet-normalise, take the last block's pre-norm tokens, LayerNorm them without affine parameters.

    ``source``: a torch-hub checkpoint file (``.pth``, read with weights_only=True) or a ``transformers``
    folder (or hub name, where the user allows downloads) of a DINOv2 with registers."""

    def __init__(self, source: str, image_size: int = RELEASE_SIZE):
        super().__init__()
        self.source, self.image_size = source, image_size
        if os.path.isfile(source):
            from model.dinov2 import load_hub_checkpoint

            self.hub = load_hub_checkpoint(source)
            self.hf = None
            self.dim = self.hub.cfg.width
        else:
            try:
                from transformers import AutoModel
            except ImportError as e:
                raise ImportError(f"image encoder {source!r} needs the 'transformers' package") from e
            try:
                self.hf = AutoModel.from_pretrained(source)
            except (OSError, ValueError) as e:  # a missing folder, a bad hub name, no network for a hub name
                raise ValueError(f"image encoder {source!r}: cannot load it through transformers "
                                 f"({str(e).splitlines()[0]})") from e
            self.hub = None
            self.dim = self.hf.config.hidden_size

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images (B, 3, H, W) in [0, 1] -> (B, L, dim)."""
        s = self.image_size
        h, w = images.shape[-2:]
        if (h, w) != (s, s):
            scale = s / min(h, w)
            nh, nw = max(s, round(h * scale)), max(s, round(w * scale))
            images = F.interpolate(images, size=(nh, nw), mode="bilinear", antialias=True, align_corners=False)
            top, left = (nh - s) // 2, (nw - s) // 2
            images = images[..., top:top + s, left:left + s]
        x = normalize(images)
        if self.hub is not None:
            z = self.hub(x)
        else:
            z = self.hf(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        return F.layer_norm(z, z.shape[-1:])


# 'tiny-pixels-32': the same 64 tokens from a 32² image in 4×4 patches, a coarser silhouette (the demo's; docs/demo.md)
TINY_ENCODERS = {"tiny": TinyEncoderConfig(), "tiny-pixels": TinyEncoderConfig(pixels=True),
                 "tiny-pixels-32": TinyEncoderConfig(image_size=32, patch=4, pixels=True)}


def build_image_encoder(spec: str) -> nn.Module:
    """'tiny' -> the built-in encoder (seeded, so every worker builds the same one), 'tiny-pixels' the same with
    each patch's pixels appended to its token; else DINOv2-reg from a hub checkpoint file or a transformers
    folder, as the released generator uses it."""
    if spec in TINY_ENCODERS:
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(0)
            enc = TinyImageEncoder(TINY_ENCODERS[spec])
        return enc.eval().requires_grad_(False)
    return ReleaseImageEncoder(spec).eval().requires_grad_(False)


def drop_condition(cond: torch.Tensor, rate: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Zero the condition of each sample with probability ``rate`` (classifier-free guidance training)."""
    if rate <= 0:
        return cond
    keep = (torch.rand(cond.shape[0], generator=generator) >= rate).to(cond.device, cond.dtype)
    return cond * keep.view(-1, *([1] * (cond.ndim - 1)))
