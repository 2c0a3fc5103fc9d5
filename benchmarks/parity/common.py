"""Shared parts of the parity harness: the released package behind stand-ins, released modules with
seeded random weights, checkpoints in the release's layout, inputs per stage, and the error measure.

Typical use (CPU, float32):

    from benchmarks.parity import common
    rel = common.import_release(device="cpu")                 # stand-ins + the release on sys.path
    target, params = common.SECTIONS["sparse_dit_512"].target, common.params("sparse_dit_512", "narrow")
    module = common.build_release_module(target, params, seed=0)
    ours = <our module loaded from module.state_dict() through the converter>
    err = common.compare(ours_out, release_out)               # RelErr(max=..., mean=...)

Nothing here is imported by the package; the release tree is read from --official / $S2_OFFICIAL
(default: <repo>/.official, holding direct3d_s2/).
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import sys
from pathlib import Path

import torch
from torch import nn

from model.official import PAPER_PARAMS

from . import standins

REPO = Path(__file__).resolve().parents[2]
DEFAULT_OFFICIAL = os.environ.get("S2_OFFICIAL", str(REPO / ".official"))

# ---------------------------------------------------------------------------------------------
# the released classes, per section of the release's config.yaml, and sizes

PKG = "direct3d_s2"


@dataclasses.dataclass(frozen=True)
class Section:
    target: str          # class path as config.yaml names it
    ckpt: str            # checkpoint file of the release
    key: str             # key inside that checkpoint's dict


SECTIONS: dict[str, Section] = {
    "dense_vae": Section(f"{PKG}.models.autoencoders.dense_vae.DenseShapeVAE", "model_dense.ckpt", "vae"),
    "dense_dit": Section(f"{PKG}.models.transformers.dense_dit.DenseDiT", "model_dense.ckpt", "dit"),
    "sparse_vae_512": Section(f"{PKG}.models.autoencoders.ss_vae.SparseSDFVAE", "model_sparse_512.ckpt", "vae"),
    "sparse_dit_512": Section(f"{PKG}.models.transformers.sparse_dit.SparseDiT", "model_sparse_512.ckpt", "dit"),
    "sparse_vae_1024": Section(f"{PKG}.models.autoencoders.ss_vae.SparseSDFVAE", "model_sparse_1024.ckpt", "vae"),
    "sparse_dit_1024": Section(f"{PKG}.models.transformers.sparse_dit.SparseDiT", "model_sparse_1024.ckpt", "dit"),
    "refiner": Section(f"{PKG}.models.refiner.unet_refiner.Voxel_RefinerXL", "model_refiner.ckpt", "refiner"),
    "refiner_1024": Section(f"{PKG}.models.refiner.unet_refiner.Voxel_RefinerXL_sign", "model_refiner_1024.ckpt",
                            "refiner"),
}

# constructor kwargs. "paper": shared/official/README.md (values not in the paper are the classes'
# defaults); "narrow": the same layout at CPU size (same block kinds, fewer/smaller ones).
_PARAMS: dict[str, dict[str, dict]] = {
    "paper": {k: v for k, v in PAPER_PARAMS.items() if k != "sparse_dit_1024"},
    "narrow": {
        "dense_vae": dict(embed_dim=8, in_channels=1, out_channels=1, model_channels_encoder=[8, 16, 32],
                          num_res_blocks_encoder=2, num_res_blocks_middle_encoder=2,
                          model_channels_decoder=[32, 16, 8], num_res_blocks_decoder=2,
                          num_res_blocks_middle_decoder=2),
        "dense_dit": dict(resolution=8, in_channels=8, out_channels=8, model_channels=64, cond_channels=32,
                          latent_shape=[8, 8, 8, 8], num_blocks=2, num_heads=4, patch_size=1, qk_rms_norm=True,
                          qk_rms_norm_cross=True),
        # the encoder's GroupNorm(32) layers need model_channels_encoder / 16 >= 32
        "sparse_vae_512": dict(embed_dim=16, resolution=8, model_channels_encoder=512, num_blocks_encoder=2,
                               num_heads_encoder=8, model_channels_decoder=64, num_blocks_decoder=2,
                               num_heads_decoder=4),
        # sparse conditions add a model_channels-wide position table to the projected tokens: cond == model width
        "sparse_dit_512": dict(resolution=16, in_channels=16, model_channels=64, cond_channels=64, out_channels=16,
                               num_blocks=2, num_heads=4, num_kv_heads=2, compression_block_size=4,
                               selection_block_size=8, topk=2, window_size=8, qk_rms_norm=True,
                               qk_rms_norm_cross=True, sparse_conditions=True),
        "sparse_vae_1024": dict(embed_dim=16, resolution=8, model_channels_encoder=512, num_blocks_encoder=2,
                                num_heads_encoder=8, model_channels_decoder=64, num_blocks_decoder=2,
                                num_heads_decoder=4, chunk_size=2),
        "refiner": dict(layers_per_block=1, layers_mid_block=1),
        "refiner_1024": dict(layers_per_block=1, layers_mid_block=1),
    },
}

# the 1024 SS-DiT: the 512 one on a grid twice as fine
_PARAMS["paper"]["sparse_dit_1024"] = dict(PAPER_PARAMS["sparse_dit_1024"])
_PARAMS["narrow"]["sparse_dit_1024"] = dict(_PARAMS["narrow"]["sparse_dit_512"], resolution=32)
# an SS-DiT fed dense image tokens: the release's sparse cross-attention unbinds a dense kv on the wrong
# axis when qk_rms_norm_cross is on, so a dense-condition SS-DiT only runs with it off
for _size, _cond in (("paper", 1024), ("narrow", 32)):
    _PARAMS[_size]["sparse_dit_densecond"] = dict(_PARAMS[_size]["sparse_dit_512"], cond_channels=_cond,
                                                  qk_rms_norm_cross=False, sparse_conditions=False)


def params(section: str, size: str = "narrow") -> dict:
    """Constructor kwargs of a section at a size (narrow | paper); besides the config.yaml sections,
    "sparse_dit_densecond" is an SS-DiT fed dense image tokens."""
    return json.loads(json.dumps(_PARAMS[size][section]))


# ---------------------------------------------------------------------------------------------
# importing the release


_IMPORTED: dict = {}


def import_release(official: str | os.PathLike | None = None, device="cpu", ssa_ops: str = "auto",
                   dtype: torch.dtype = torch.float32):
    """Install the stand-ins, put the release on sys.path and import its modules.

    ssa_ops: "triton" runs the release's own SSA kernels (half precision, CUDA or TRITON_INTERPRET=1),
    "torch" swaps in our PyTorch references (benchmarks/parity/standins/ssa_ops.py), "auto" picks
    "triton" for CUDA in bfloat16 where Triton still has block pointers, "torch" otherwise. Returns the
    release's root package.
    """
    root = Path(official or DEFAULT_OFFICIAL)
    if not (root / PKG).is_dir():
        raise FileNotFoundError(f"no {PKG}/ under {root}: export the released code there (benchmarks/parity/README.md)"
                                " or pass --official / set S2_OFFICIAL")
    if ssa_ops == "auto":
        usable = str(device).startswith("cuda") and dtype != torch.float32 and block_pointers_available()
        ssa_ops = "triton" if usable else "torch"
    key = (str(root), str(device), ssa_ops)
    if _IMPORTED.get("key") not in (None, key):
        raise RuntimeError(f"the release is already imported with {_IMPORTED['key']}; one setting per process")
    if "key" not in _IMPORTED:
        os.environ["SPARSE_BACKEND"] = "torchsparse"
        os.environ["SPARSE_ATTN_BACKEND"] = "flash_attn"
        os.environ["ATTN_BACKEND"] = "flash_attn"
        standins.install()
        sys.path.insert(0, str(root))
        pkg = importlib.import_module(PKG)
        found = Path(list(pkg.__path__)[0]).resolve()
        if found != (root / PKG).resolve():
            raise RuntimeError(f"{PKG} resolved to {found}, not {root / PKG}")
        importlib.import_module(f"{PKG}.modules.sparse.attention")
        standins.patch_release_ssa(device, use_torch_ops=(ssa_ops == "torch"))
        _IMPORTED["key"] = key
        _IMPORTED["ssa_ops"] = ssa_ops
    return importlib.import_module(PKG)


def block_pointers_available() -> bool:
    """The release's SSA kernels use tl.make_block_ptr, which later Triton releases removed (3.9 raises)."""
    try:
        import triton.language as tl
    except ImportError:
        return False
    return "removed" not in (getattr(tl.make_block_ptr, "__doc__", "") or "")


def release_ssa_ops() -> str:
    return _IMPORTED.get("ssa_ops", "?")


def release_class(target: str):
    module, name = target.rsplit(".", 1)
    return getattr(importlib.import_module(module), name)


def release_sp():
    """The release's sparse package (SparseTensor etc.)."""
    return importlib.import_module(f"{PKG}.modules.sparse")


# ---------------------------------------------------------------------------------------------
# random weights


_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def randomize_(module: nn.Module, seed: int, gain: float = 1.0) -> nn.Module:
    """Draw every parameter and floating buffer of a module from a seeded generator.

    Matrices and conv kernels: N(0, gain²/fan_in) so activations stay O(1) (std 0.03 at width 1024);
    biases N(0, 0.1²); norm scales 1 + N(0, 0.1²) and norm shifts N(0, 0.1²); anything else
    (positional tables, intra-block embeddings, RMS-norm gains, ...) keeps its mean and gets the spread
    of its initial values, or 0.1 (times the mean's magnitude when that is not zero) where those were constant.
    Zero-initialised output and adaLN layers are drawn like the others, so no stage is vacuous.
    """
    gen = torch.Generator().manual_seed(seed)
    done: set[int] = set()

    def normal(t: torch.Tensor, std: float, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(t.shape, generator=gen, dtype=torch.float64) * std + mean).to(t.dtype)

    with torch.no_grad():
        for mod in module.modules():
            own = dict(mod.named_parameters(recurse=False))
            kernel = own.get("kernel") if type(mod).__name__ == "Conv3d" and hasattr(mod, "kernel_volume") else None
            if isinstance(mod, _NORMS) or type(mod).__name__.endswith(("Norm32", "LayerNorm", "GroupNorm")):
                for name, p in own.items():
                    p.copy_(normal(p, 0.1, 1.0 if name == "weight" else 0.0))
                    done.add(id(p))
            elif isinstance(mod, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                w = own["weight"]
                fan_in = w.shape[1] * math.prod(w.shape[2:])
                w.copy_(normal(w, gain / math.sqrt(fan_in)))
                done.add(id(w))
                if own.get("bias") is not None:
                    own["bias"].copy_(normal(own["bias"], 0.1))
                    done.add(id(own["bias"]))
            elif kernel is not None:  # torchsparse Conv3d: kernel [K, C_in, C_out] or [C_in, C_out]
                fan_in = kernel.shape[-2] * (kernel.shape[0] if kernel.dim() == 3 else 1)
                kernel.copy_(normal(kernel, gain / math.sqrt(fan_in)))
                done.add(id(kernel))
                if own.get("bias") is not None:
                    own["bias"].copy_(normal(own["bias"], 0.1))
                    done.add(id(own["bias"]))
        rest = [p for p in module.parameters() if id(p) not in done]
        rest += [b for b in module.buffers() if b.is_floating_point()]
        for t in rest:
            flat = t.detach().double().flatten()
            mean = flat.mean().item() if flat.numel() else 0.0
            spread = flat.std().item() if flat.numel() > 1 else 0.0
            if not spread > 1e-12:
                spread = 0.1 * (abs(mean) if abs(mean) > 1e-12 else 1.0)
            t.copy_(normal(t, spread, mean))
    return module


def build_release_module(target: str, kwargs: dict, seed: int = 0, gain: float = 1.0) -> nn.Module:
    """A released class built from its constructor kwargs, weights drawn with ``randomize_``, in eval mode."""
    torch.manual_seed(seed)
    module = release_class(target)(**kwargs)
    randomize_(module, seed, gain)
    return module.eval()


def to_release_dtype(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """The release's half-precision path (``use_fp16``: Linear/Conv/SparseLinear/SparseConv weights cast,
    norms kept in float32, ``.dtype`` attributes set) with ``dtype`` in place of float16."""
    if dtype == torch.float32:
        return module
    utils = importlib.import_module(f"{PKG}.modules.utils")
    with torch.no_grad():
        for mod in module.modules():
            if isinstance(mod, utils.FP16_MODULES):
                for p in mod.parameters():
                    p.data = p.data.to(dtype)
            if isinstance(getattr(mod, "dtype", None), torch.dtype) and hasattr(mod, "use_fp16"):
                mod.dtype = dtype
    return module


def release_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
            for k, v in module.state_dict().items()}


# ---------------------------------------------------------------------------------------------
# checkpoints in the release's layout


def write_release_checkpoint(out_dir: str | os.PathLike, modules: dict[str, tuple[dict, dict]]) -> Path:
    """Write config.yaml + model_*.ckpt the way the release ships them.

    modules: section -> (constructor kwargs, state dict). Sections sharing a checkpoint file (vae + dit)
    go into one dict. config.yaml lists target + params per section (JSON text, which YAML reads).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files: dict[str, dict] = {}
    config = {}
    for section, (kwargs, state) in modules.items():
        sec = SECTIONS[section]
        files.setdefault(sec.ckpt, {})[sec.key] = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        config[section] = {"target": sec.target, "params": kwargs}
    for name, payload in files.items():
        torch.save(payload, out / name)
    try:
        import yaml
        text = yaml.safe_dump(config, sort_keys=False)
    except ImportError:
        text = json.dumps(config, indent=2)
    (out / "config.yaml").write_text(text)
    return out


def read_release_checkpoint(folder: str | os.PathLike, section: str) -> tuple[dict, dict]:
    """(params, state dict) of one section, read back with torch.load(weights_only=True)."""
    folder = Path(folder)
    text = (folder / "config.yaml").read_text()
    try:
        import yaml
        config = yaml.safe_load(text)
    except ImportError:
        config = json.loads(text)
    sec = SECTIONS[section]
    state = torch.load(folder / sec.ckpt, map_location="cpu", weights_only=True)[sec.key]
    return dict(config[section].get("params", {})), state


# ---------------------------------------------------------------------------------------------
# inputs


def shape_sdf(resolution: int, which: int = 0, band: float = 2.0):
    """A narrow-band signed distance of a real-looking shape on a resolution³ grid.

    which 0: a torus fused with a sphere (a mug-like solid); 1: a rounded box with a hole through it.
    Returns (xyz int32 [N, 3], sdf float32 [N] in [-1, 1]: distance in voxels / band, clipped).
    """
    r = resolution
    axis = (torch.arange(r, dtype=torch.float32) + 0.5) / r * 2 - 1
    x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
    if which == 0:
        torus = torch.sqrt((torch.sqrt(x ** 2 + z ** 2) - 0.5) ** 2 + (y - 0.1) ** 2) - 0.18
        sphere = torch.sqrt((x - 0.25) ** 2 + (y + 0.25) ** 2 + z ** 2) - 0.35
        k = 0.1  # smooth union
        h = (0.5 + 0.5 * (sphere - torus) / k).clamp(0, 1)
        d = sphere * (1 - h) + torus * h - k * h * (1 - h)
    else:
        q = torch.stack([x.abs() - 0.6, y.abs() - 0.35, z.abs() - 0.45], -1)
        box = q.clamp(min=0).norm(dim=-1) + q.max(-1).values.clamp(max=0) - 0.08
        hole = torch.sqrt(x ** 2 + y ** 2) - 0.2
        d = torch.maximum(box, -hole)
    d = d * (r / 2)  # in voxels
    keep = d.abs() < band
    xyz = keep.nonzero().to(torch.int32)
    sdf = (d[keep] / band).clamp(-1, 1)
    return xyz, sdf.float()


def sparse_sdf_batch(resolution: int, batch: int = 2, band: float = 2.0):
    """The release's SS-VAE encode batch: {'sparse_sdf': [N], 'sparse_index': [N, 3], 'batch_idx': [N]}."""
    xyz, sdf, idx = [], [], []
    for b in range(batch):
        p, s = shape_sdf(resolution, which=b % 2, band=band)
        xyz.append(p)
        sdf.append(s)
        idx.append(torch.full((p.shape[0],), b, dtype=torch.int32))
    return {"sparse_sdf": torch.cat(sdf), "sparse_index": torch.cat(xyz), "batch_idx": torch.cat(idx)}


def sort_block(coords: torch.Tensor, block_size: int) -> torch.Tensor:
    """Coords [N, 4] of one batch item ordered as the release's utils.sparse.sort_block orders them:
    by block (x, y, z) then by position in the block (x, y, z)."""
    c = coords.long()
    blk = c[:, 1:] // block_size
    inb = c[:, 1:] % block_size
    keys = [inb[:, 2], inb[:, 1], inb[:, 0], blk[:, 2], blk[:, 1], blk[:, 0]]  # least significant first
    order = torch.arange(c.shape[0])
    for k in keys:  # stable sorts, least significant key first (= np.lexsort)
        order = order[torch.argsort(k[order], stable=True)]
    return coords[order]


def latent_coords(resolution: int, batch: int = 2, block_size: int = 8) -> torch.Tensor:
    """Latent voxel coords [N, 4] int32 (batch, x, y, z) of the shapes at ``resolution`` (the latent grid),
    each batch item ordered by sort_block and the items in batch order (the layout the DiTs expect)."""
    out = []
    for b in range(batch):
        # a latent voxel is active where the surface crosses it: |distance at its centre| < half its diagonal
        lat, _ = shape_sdf(resolution, which=b % 2, band=0.87)
        c = torch.cat([torch.full((lat.shape[0], 1), b), lat.long()], 1).to(torch.int32)
        out.append(sort_block(c, block_size))
    return torch.cat(out)


def dense_occupancy(resolution: int, batch: int = 2) -> torch.Tensor:
    """The dense VAE's input [B, 1, R, R, R] (occupancy in {0, 1}: inside the shapes)."""
    occ = []
    for b in range(batch):
        r = resolution
        axis = (torch.arange(r, dtype=torch.float32) + 0.5) / r * 2 - 1
        x, y, z = torch.meshgrid(axis, axis, axis, indexing="ij")
        if b % 2 == 0:
            inside = (torch.sqrt((torch.sqrt(x ** 2 + z ** 2) - 0.5) ** 2 + y ** 2) < 0.2) | \
                     ((x - 0.25) ** 2 + (y + 0.25) ** 2 + z ** 2 < 0.35 ** 2)
        else:
            inside = (x.abs() < 0.6) & (y.abs() < 0.35) & (z.abs() < 0.45) & (x ** 2 + y ** 2 > 0.04)
        occ.append(inside.float()[None])
    return torch.stack(occ)


def cond_tokens(batch: int, tokens: int, channels: int, seed: int = 1) -> torch.Tensor:
    """Dense image-condition tokens [B, L, C] (DINOv2-like: unit-scale features)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, tokens, channels, generator=gen)


def sparse_cond_tokens(batch: int, grid: int, channels: int, seed: int = 2):
    """Sparse image-condition tokens as the release's extract_tokens_and_coords lays them out:
    per item 1 class + 4 register tokens at (b, 0, 0, 1), then the masked patch tokens at (b, w, h, 0).
    Returns (feats [N, C], coords [N, 4] int32)."""
    gen = torch.Generator().manual_seed(seed)
    feats, coords = [], []
    for b in range(batch):
        hh, ww = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
        centre = (grid - 1) / 2
        mask = ((hh - centre) ** 2 + (ww - centre) ** 2) <= (0.4 * grid + b) ** 2   # a blob-shaped mask
        pos = mask.nonzero()
        k = pos.shape[0]
        c = torch.cat([torch.tensor([[b, 0, 0, 1]] * 5),
                       torch.stack([torch.full((k,), b), pos[:, 1], pos[:, 0], torch.zeros(k, dtype=torch.long)], 1)])
        coords.append(c)
        feats.append(torch.randn(5 + k, channels, generator=gen))
    return torch.cat(feats), torch.cat(coords).to(torch.int32)


def timesteps(batch: int) -> torch.Tensor:
    """Flow timesteps on the release's 0..1000 scale, one per item."""
    return torch.tensor([700.0, 250.0, 500.0, 900.0][:batch] + [500.0] * max(0, batch - 4))


# ---------------------------------------------------------------------------------------------
# comparison


@dataclasses.dataclass
class RelErr:
    max: float     # max |a − b| / (max |b|): the largest error against the reference's scale
    mean: float    # mean |a − b| / mean |b|
    ref_scale: float
    numel: int
    row_max: torch.Tensor | None = None  # each row's (first axis) max |a − b| / max |b|

    def passes(self, tol: float) -> bool:
        return math.isfinite(self.max) and self.max <= tol

    def rows_over(self, tol: float) -> tuple[int, int]:
        """(rows whose largest error is over ``tol``, rows): whether a failure is everywhere or in a few rows
        (a selection that flips between two tied blocks moves a few queries' outputs, not all)."""
        if self.row_max is None:
            return 0, 0
        return int((self.row_max > tol).sum()), int(self.row_max.numel())


def compare(ours: torch.Tensor, ref: torch.Tensor) -> RelErr:
    """Relative error of ``ours`` against ``ref`` (shapes must agree), in float64."""
    if tuple(ours.shape) != tuple(ref.shape):
        raise ValueError(f"shape mismatch: ours {tuple(ours.shape)} vs release {tuple(ref.shape)}")
    a = ours.detach().double().cpu()
    b = ref.detach().double().cpu()
    diff = (a - b).abs()
    scale = b.abs().max().item()
    mean_scale = b.abs().mean().item()
    if not torch.isfinite(a).all():
        return RelErr(float("inf"), float("inf"), scale, a.numel())
    row_max = diff.reshape(diff.shape[0], -1).amax(1) / max(scale, 1e-30) if diff.dim() and diff.numel() else None
    return RelErr(diff.max().item() / max(scale, 1e-30), diff.mean().item() / max(mean_scale, 1e-30), scale,
                  a.numel(), row_max)


def sort_by_coords(coords: torch.Tensor, feats: torch.Tensor):
    """Rows ordered by (batch, x, y, z): to compare sparse outputs whose row orders differ."""
    c = coords.long().cpu()
    span = c.max(0).values + 1
    key = ((c[:, 0] * span[1] + c[:, 1]) * span[2] + c[:, 2]) * span[3] + c[:, 3]
    order = torch.argsort(key)
    return coords[order.to(coords.device)], feats[order.to(feats.device)]


TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 1e-2}
