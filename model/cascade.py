"""The image-to-mesh cascade (Direct3D-S2 §3.4 inference), batched over images.

image → condition tokens → structure stage (dense DiT on the 16³×8 latent, decoded to 64³ occupancy)
→ sparse DiT on the occupied latent voxels at ``resolution`` → latent decode (SS-VAE, or the
parameter-free pooled latent) → optional refiner (removes interior structure) → sparse marching →
optional stage at ``refine_resolution`` on the latent voxels within 4 voxels of the first mesh (the
release's mesh2index) → decode → optional refiner → marching → clean-up (interior shells, floating
parts, face target).

``GenerationConfig.pretrained`` names a folder written by ``s2 convert official``: its cascade.json
gives every network, the release's sampler schedules (its config.yaml) and marching thresholds.

Several images go through every stage together: the structure stage runs them as one batch of equal
4,096-token shapes, the sparse stages pack their ragged token sets. Every item draws its noise from its
own generator seeded by the item's seed, so a result does not depend on which other images shared its
batch. An item that fails (unreadable image, no foreground, empty structure, no surface) gets an error
naming it; the other items of the batch go on.
"""
from __future__ import annotations

import dataclasses
import pickle
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from model import pooled_latent
from model.checkpoint import CheckpointError, from_pretrained, is_pretrained_folder
from model.condition import build_image_encoder, decode_image, pack_condition
from model.dit import DiTConfig, PackedCondition, SparseDiT
from model.flow import STAGE_DEFAULTS, FlowEulerSampler, ReleaseSchedule
from model.graphs import CapturedVelocity
from model.mesh_extract import enclosed_fill, extract_mesh
from model.voxelize import normalize_vertices, surface_latent_index
from model.postprocess import PostprocessConfig, clean_mesh
from model.sparse import SparseTensor
from model.structure import (GRID, STRUCTURE_DIT_CONFIGS, StructureDiT, StructureVAE, StructureVAEConfig, check_structure_pair,
                             grid_to_latent_coords, occupancy_probabilities, subcell_occupancy)
from model.dense_dit import DenseDiTConfig


# -- checkpoints: a small registry of the networks and their config classes -------------------------
# Checkpoints are read with torch.load(weights_only=True): tensors and plain types only. A training
# checkpoint (pipeline/train/checkpoints.py) names its config as a repr string; it is parsed here as a
# literal call of a registered config class, never evaluated.


@dataclass
class NetworkBundle:
    network: str
    module: torch.nn.Module
    config: object
    source: str
    meta: dict = field(default_factory=dict)


def _vae_classes():
    from model.vae import SparseSDFVAE, VAEConfig

    return SparseSDFVAE, VAEConfig


NETWORKS = {
    # network: (config class, module builder, prefix of the trainer's state-dict keys)
    "structure_vae": (StructureVAEConfig, StructureVAE, "vae."),
    "structure_dit": (DenseDiTConfig, StructureDiT, "dit."),
    "dit": (DiTConfig, SparseDiT, "dit."),
}


def parse_config_repr(text: str, cls: type, where: str):
    """``DiTConfig(depth=2, width=64, ...)`` -> the dataclass, accepting literal keyword values only."""
    import ast

    try:
        node = ast.parse(text, mode="eval").body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == cls.__name__
                and not node.args):
            raise ValueError(f"not a {cls.__name__}(...) literal")
        kwargs = {k.arg: ast.literal_eval(k.value) for k in node.keywords}
    except (SyntaxError, ValueError) as e:
        raise ValueError(f"{where}: model_config {text[:80]!r} is unreadable ({e})") from None
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ValueError(f"{where}: model_config has unknown key(s) {unknown} for {cls.__name__}")
    return cls(**kwargs)


def _read(source: str, opener):
    try:
        if opener is None:
            return torch.load(source, map_location="cpu", weights_only=True)
        with opener(source) as f:
            return torch.load(f, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"checkpoint {source}: not found") from None
    except OSError as e:  # a folder where a file belongs, permissions, a broken mount
        raise ValueError(f"checkpoint {source}: cannot be read ({e.strerror or type(e).__name__})") from None
    except (RuntimeError, EOFError, pickle.UnpicklingError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"checkpoint {source}: unreadable without unpickling arbitrary objects ({first})") from None


# cascade role -> the network a checkpoint folder (config.json + model.safetensors) must hold
FOLDER_NETWORKS = {"structure_vae": "dense_vae", "structure_dit": "dense_dit", "dit": "sparse_dit", "vae": "ss_vae",
                   "refiner": "refiner"}


def load_network(source: str, network: str, opener=None) -> NetworkBundle:
    """A network from a checkpoint folder (config.json + model.safetensors), a training checkpoint folder
    (its weights.pt) or a weights.pt file; nothing read can run code."""
    folder = source.rstrip("/")
    if not is_pretrained_folder(folder, opener) and is_pretrained_folder(folder + "/model", opener):
        folder += "/model"  # a training checkpoint: its export in the checkpoint folder format
    if is_pretrained_folder(folder, opener):
        try:
            p = from_pretrained(folder, FOLDER_NETWORKS[network], opener=opener)
        except CheckpointError as e:
            raise ValueError(str(e)) from None
        return NetworkBundle(network, p.module, p.config, source, p.meta)
    if network == "refiner":
        raise ValueError(f"checkpoint {source}: a refiner loads from a converted folder (config.json)")
    path = source.rstrip("/")
    if not path.endswith((".pt", ".pth")):
        path += "/weights.pt"
    blob = _read(path, opener)
    if not isinstance(blob, dict):
        raise ValueError(f"checkpoint {source}: not a checkpoint (a {type(blob).__name__})")
    if network == "vae":
        if "vae_config" not in blob or "model" not in blob:
            raise ValueError(f"checkpoint {source}: not an SS-VAE checkpoint (no vae_config / model)")
        SparseSDFVAE, VAEConfig = _vae_classes()
        cfg = VAEConfig.from_dict(dict(blob["vae_config"]))
        module, state = SparseSDFVAE(cfg), blob["model"]
        meta = {"step": blob.get("step")}
    else:
        if blob.get("network") != network:
            raise ValueError(f"checkpoint {source}: holds network {blob.get('network')!r}, expected {network!r}")
        cls, build, prefix = NETWORKS[network]
        cfg = parse_config_repr(str(blob.get("model_config")), cls, f"checkpoint {source}")
        if isinstance(cfg, (DiTConfig, DenseDiTConfig)):
            cfg = dataclasses.replace(cfg, grad_checkpointing=False)
        module = build(cfg)
        state = {k.removeprefix(prefix): v for k, v in blob["state_dict"].items()}
        meta = {k: blob[k] for k in ("step", "resolution") if k in blob}
    try:
        module.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {source}: weights do not fit {network} ({str(e).splitlines()[0]})") from None
    return NetworkBundle(network, module.eval().requires_grad_(False), cfg, source, meta)


def migrate_checkpoint(source: str, out: str) -> str:
    """A training checkpoint folder or ``weights.pt`` of ours -> a checkpoint folder (config.json +
    model.safetensors). Its network is read from the file; a layout this code no longer builds is an
    error naming the checkpoint."""
    from model.checkpoint import save_pretrained

    path = source.rstrip("/")
    blob = _read(path if path.endswith((".pt", ".pth")) else path + "/weights.pt", None)
    if not isinstance(blob, dict):
        raise ValueError(f"checkpoint {source}: not a checkpoint (a {type(blob).__name__})")
    network = "vae" if "vae_config" in blob and blob.get("network") in (None, "vae") else blob.get("network")
    if network not in FOLDER_NETWORKS:
        raise ValueError(f"checkpoint {source}: holds network {network!r}, not one of {sorted(FOLDER_NETWORKS)}")
    bundle = load_network(source, network)
    meta = {k: blob[k] for k in ("step", "resolution", "latent_space") if blob.get(k) is not None}
    return save_pretrained(bundle.module, bundle.config, out, network=FOLDER_NETWORKS[network],
                           meta={**meta, "migrated_from": source})


def random_network(network: str, size: str = "debug", **overrides) -> NetworkBundle:
    """An untrained network of a named size."""
    if network == "vae":
        SparseSDFVAE, VAEConfig = _vae_classes()
        cfg = VAEConfig.named("tiny" if size == "debug" else size)
        module = SparseSDFVAE(cfg)
    elif network == "structure_vae":
        cfg = StructureVAEConfig.named(size)
        module = StructureVAE(cfg)
    elif network == "structure_dit":
        cfg = dataclasses.replace(STRUCTURE_DIT_CONFIGS[size], **overrides)
        module = StructureDiT(cfg)
    else:
        cfg = DiTConfig.named(size, in_channels=pooled_latent.CHANNELS, out_channels=pooled_latent.CHANNELS, **overrides)
        module = SparseDiT(cfg)
    return NetworkBundle(network, module.eval().requires_grad_(False), cfg, f"<random {size} {network}>")


class ItemError(ValueError):
    """One item of a batch failed; the message names the item and the reason."""


@dataclass
class GenerationConfig:
    """Which networks make up the cascade and how it samples. Checkpoint fields are paths or URIs."""

    pretrained: str = ""  # a folder of `s2 convert official`: names every network below and the samplers
    structure_vae: str = ""
    structure_dit: str = ""
    dit: str = ""  # sparse DiT at ``resolution``
    vae: str = ""  # SS-VAE checkpoint; empty: the DiT works on pooled latents (model/pooled_latent.py)
    dit_refine: str = ""  # optional sparse DiT at ``refine_resolution`` on the first surface
    vae_refine: str = ""  # SS-VAE for the refine stage (empty: the same decoder as the first stage)
    refiner: str = ""  # refiner after the first decode (the release's 512 refiner; removes interior structure)
    refiner_refine: str = ""  # refiner after the refine stage's decode (the release's 1024 refiner)
    background_model: str = ""  # ONNX matting model for images without alpha (empty: such images are refused)
    image_encoder: str = "tiny"  # 'tiny' (built in) or a DINOv2 path
    resolution: int = 512
    refine_resolution: int = 1024
    structure_steps: int = STAGE_DEFAULTS["dense"]["steps"]
    sparse_steps: int = STAGE_DEFAULTS["512"]["steps"]
    refine_steps: int = STAGE_DEFAULTS["1024"]["steps"]
    structure_shift: float = STAGE_DEFAULTS["dense"]["shift"]
    sparse_shift: float = STAGE_DEFAULTS["512"]["shift"]
    refine_shift: float = STAGE_DEFAULTS["1024"]["shift"]
    guidance: float = 7.0
    occupancy_threshold: float = 0.1  # sigmoid of decoded occupancy (DESIGN.md)
    # the sub-cell occupancy an SS-DiT with occupancy_subcells reads: sigmoid >= this (the 0.1 above gives
    # the latent voxels, generous so no surface is lost; the bits are read as the band it trained on, and a
    # trained structure VAE's reconstruction at 0.5 matches the band best: docs/demo.md)
    subcell_threshold: float = 0.5
    max_tokens: int = 400_000  # more latent voxels than this for one shape is an error for that item
    surface_band: float = 4.0  # refine-stage latent voxels: grid points within this many voxels of the first mesh
    mc_threshold: Optional[float] = None  # marching level of decoded SDFs (None: 0.2 for a converted release, else 0)
    decode_chunk: int = 32  # latent voxels per axis per chunk of the SS-VAE decoder
    min_foreground: float = 0.002  # fraction of pixels that must differ from the background
    # an empty region the decoded voxels enclose takes their sign (model.mesh_extract.enclosed_fill); False: +1
    # everywhere outside the decoded voxels, as the release marches (its refiner then removes interior walls)
    fill_enclosed: bool = True
    remove_interior: bool = True
    min_component_fraction: float = 0.02
    target_faces: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32; the refiners run in fp16 on CUDA unless fp32
    offload: bool = False  # networks wait in host memory; each stage moves only its own to the device
    # replay a sampling stage's forward as a CUDA graph (model/graphs.py) when it runs at most
    # cuda_graph_max_tokens tokens (all items, doubled for guidance): those steps wait on the host's launches
    # (the 512 stage 3.7-4.7 -> 3.3-3.4 s a mesh on an H100); a 1024 stage's steps are bound by the GPU
    # (3% idle), so it runs eagerly and the graph's memory pool is not held through it
    cuda_graphs: bool = True
    cuda_graph_max_tokens: int = 32768

    def validate(self) -> None:
        for key in ("resolution", "refine_resolution"):
            r = getattr(self, key)
            if r % 64 or r < 64:
                raise ValueError(f"{key}: must be a multiple of 64 (the latent is 1/8 and the structure grid 64³), got {r}")
        for key in ("structure_steps", "sparse_steps", "refine_steps", "max_tokens", "decode_chunk",
                    "cuda_graph_max_tokens"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype: expected auto, bf16 or fp32, got {self.dtype!r}")
        if self.surface_band <= 0:
            raise ValueError(f"surface_band: must be > 0, got {self.surface_band}")
        for key in ("occupancy_threshold", "subcell_threshold"):
            if not 0 < getattr(self, key) < 1:
                raise ValueError(f"{key}: must be in (0, 1), got {getattr(self, key)}")
        if self.dit_refine and self.refine_resolution <= self.resolution:
            raise ValueError(f"refine_resolution ({self.refine_resolution}) must exceed resolution ({self.resolution})")
        PostprocessConfig(self.remove_interior, self.min_component_fraction, self.target_faces)

    @property
    def postprocess(self) -> PostprocessConfig:
        return PostprocessConfig(self.remove_interior, self.min_component_fraction, self.target_faces)


@dataclass
class Request:
    """One image to turn into a mesh: encoded bytes (PNG/JPEG) or a (3, H, W) tensor in [0, 1]."""

    name: str
    image: object
    seed: int = 0


@dataclass
class Result:
    name: str
    seed: int
    vertices: Optional[np.ndarray] = None
    faces: Optional[np.ndarray] = None
    error: Optional[str] = None
    timings: dict = field(default_factory=dict)  # seconds per stage (a batched stage's time is shared)
    stats: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error is None


def foreground_fraction(image: torch.Tensor) -> float:
    """Fraction of pixels that differ from the border colour (the background of a concept render)."""
    border = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
    bg = border.median(dim=1).values
    return float(((image - bg[:, None, None]).abs().amax(0) > 0.08).float().mean())


def guidance_batch(tokens: SparseTensor, cond):
    """(tokens, cond) as one batch of 2B shapes for classifier-free guidance: the B shapes twice, with their
    condition and with the zero condition (a packed one keeps its tokens' positions)."""
    cu, coords = tokens.cu_seqlens, tokens.coords[:, 1:]
    doubled = SparseTensor.packed(torch.cat([coords, coords]), torch.cat([tokens.feats, tokens.feats]),
                                  torch.cat([cu, cu[1:] + cu[-1]]), tokens.resolution)
    if isinstance(cond, PackedCondition):
        ccu = cond.cu_seqlens
        return doubled, PackedCondition(torch.cat([cond.tokens, torch.zeros_like(cond.tokens)]),
                                        torch.cat([cond.coords, cond.coords]), torch.cat([ccu, ccu[1:] + ccu[-1]]))
    return doubled, torch.cat([cond, torch.zeros_like(cond)])


def _item_generator(seed: int, stage: int) -> torch.Generator:
    # one stream per (item, stage): a stage's noise never depends on how much the previous stage drew
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stage)


class Cascade:
    """The networks of the cascade on one device; ``generate`` turns a batch of requests into meshes."""

    def __init__(self, cfg: GenerationConfig, encoder: torch.nn.Module, structure_vae: NetworkBundle,
                 structure_dit: NetworkBundle, dit: NetworkBundle, vae: NetworkBundle | None = None,
                 dit_refine: NetworkBundle | None = None, vae_refine: NetworkBundle | None = None,
                 refiner: NetworkBundle | None = None, refiner_refine: NetworkBundle | None = None,
                 schedules: dict[str, ReleaseSchedule] | None = None, level: float | None = None):
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if cfg.device == "auto" else cfg.device))
        self.dtype = (torch.bfloat16 if (cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda"))
                      else torch.float32)
        # with offload the networks wait in host memory and each stage brings its own (_timed)
        self.home = torch.device("cpu") if cfg.offload else self.device
        self.encoder = encoder.to(self.home).eval()
        self.structure_vae = structure_vae.module.to(self.home).eval()
        self.structure_dit = structure_dit.module.to(self.home, self.dtype).eval()
        self.dit = dit.module.to(self.home, self.dtype).eval()
        self.vae = vae.module.to(self.home).eval() if vae else None
        self.dit_refine = dit_refine.module.to(self.home, self.dtype).eval() if dit_refine else None
        self.vae_refine = vae_refine.module.to(self.home).eval() if vae_refine else self.vae
        # the refiners' dense 3D UNets run in float16 on CUDA (what the release's use_fp16 switch converts:
        # convolutions and linears; GroupNorm and the smoothing sums stay float32); float32 when the cascade is
        self.refiner_dtype = torch.float16 if self.dtype != torch.float32 and self.device.type == "cuda" else self.dtype
        self.refiner = refiner.module.to(self.home).cast_weights(self.refiner_dtype).eval() if refiner else None
        self.refiner_refine = (refiner_refine.module.to(self.home).cast_weights(self.refiner_dtype).eval()
                               if refiner_refine else None)
        self._resident: tuple[str, ...] = ()
        self._masters: dict[int, list] = {}  # offload: id(module) -> [(tensor, its host master)]
        self.schedules = dict(schedules or {})  # stage -> the release's schedule (default: our shifted one)
        self.level = cfg.mc_threshold if cfg.mc_threshold is not None else (level if level is not None else 0.0)
        self.background = None
        if cfg.background_model:
            from model.condition import BackgroundRemover

            self.background = BackgroundRemover(cfg.background_model)
        self.bundles = {k: b for k, b in [("structure_vae", structure_vae), ("structure_dit", structure_dit),
                                          ("dit", dit), ("vae", vae), ("dit_refine", dit_refine),
                                          ("vae_refine", vae_refine), ("refiner", refiner),
                                          ("refiner_refine", refiner_refine)] if b is not None}
        self._check_compatible()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, cfg: GenerationConfig, opener: Callable[[str], object] | None = None) -> "Cascade":
        """Load every network named in ``cfg`` (weights_only; ``opener`` opens URIs, default: local files)."""
        cfg.validate()
        extra = {}
        if cfg.pretrained:
            cfg, extra = _from_release_folder(cfg, opener)
        for key in ("structure_vae", "structure_dit", "dit"):
            if not getattr(cfg, key):
                raise ValueError(f"{key}: no checkpoint given (the cascade needs structure_vae, structure_dit and dit)")
        net = {"structure_vae": "structure_vae", "structure_dit": "structure_dit", "dit": "dit", "vae": "vae",
               "dit_refine": "dit", "vae_refine": "vae", "refiner": "refiner", "refiner_refine": "refiner"}
        bundles = {k: load_network(getattr(cfg, k), net[k], opener=opener) for k in net if getattr(cfg, k)}
        return cls(cfg, build_image_encoder(cfg.image_encoder), **bundles, **extra)

    @classmethod
    def random(cls, cfg: GenerationConfig, size: str = "debug", seed: int = 0, with_vae: bool = False,
               refine: bool = False) -> "Cascade":
        """Untrained networks of a named size (tests, benchmarks, the untrained baseline)."""
        enc = build_image_encoder(cfg.image_encoder)
        g = torch.random.fork_rng()
        with g:
            torch.manual_seed(seed)
            kw = dict(cond_dim=enc.dim)
            nets = {"structure_vae": random_network("structure_vae", size),
                    "structure_dit": random_network("structure_dit", size, **kw),
                    "dit": random_network("dit", size, **kw)}
            if with_vae:
                nets["vae"] = random_network("vae", size)
            if refine:
                nets["dit_refine"] = random_network("dit", size, **kw)
        if refine and not cfg.dit_refine:
            cfg = dataclasses.replace(cfg, dit_refine="<random>")
        return cls(cfg, enc, **nets)

    def _check_compatible(self) -> None:
        enc_dim = self.encoder.dim
        for key in ("structure_dit", "dit", "dit_refine"):
            b = self.bundles.get(key)
            if b is not None and b.config.cond_dim != enc_dim:
                raise ValueError(f"{key} ({b.source}): expects condition width {b.config.cond_dim}, "
                                 f"image encoder {self.cfg.image_encoder!r} gives {enc_dim}")
        sv, sd = self.bundles["structure_vae"], self.bundles["structure_dit"]
        try:
            check_structure_pair(sv.config, sd.config)
        except ValueError as e:
            raise ValueError(f"structure_dit ({sd.source}) and structure_vae ({sv.source}): {e}") from None
        for dit_key, vae_key, res_key in (("dit", "vae", "resolution"), ("dit_refine", "vae_refine", "refine_resolution")):
            d = self.bundles.get(dit_key)
            if d is None:
                continue
            v = self.bundles.get(vae_key) or self.bundles.get("vae")
            channels = v.config.latent_channels if v else pooled_latent.CHANNELS
            if d.config.in_channels != channels:
                raise ValueError(f"{dit_key} ({d.source}): {d.config.in_channels} latent channels, its decoder has {channels}")
            s = d.config.occupancy_subcells
            if s and dit_key == "dit_refine":
                raise ValueError(f"{dit_key} ({d.source}): reads the structure's sub-cell occupancy (occupancy_subcells="
                                 f"{s}), which the refine stage does not have")
            if s:
                down = v.config.downsample if v else pooled_latent.DOWN
                latent_res = getattr(self.cfg, res_key) // down
                if latent_res * s != GRID:
                    raise ValueError(f"{dit_key} ({d.source}): reads {s}³ structure voxels a latent voxel; at "
                                     f"{res_key} {getattr(self.cfg, res_key)} a {latent_res}³ latent voxel holds "
                                     f"{GRID / latent_res:g}³ of the {GRID}³ structure grid")
            if v is not None and dit_key == "dit_refine" and v.config.downsample != 8:
                raise ValueError(f"{vae_key} ({v.source}): downsamples by {v.config.downsample}, the refine stage "
                                 f"needs 8 (its latent voxels come from the first mesh at 8 voxels each)")
            space = str(d.meta.get("latent_space", ""))
            if space == "pooled" and v is not None:
                raise ValueError(f"{dit_key} ({d.source}): trained on pooled latents, which an SS-VAE "
                                 f"({v.source}) cannot decode; leave the vae empty")
            if space.startswith("ss_vae") and v is None:
                raise ValueError(f"{dit_key} ({d.source}): trained on SS-VAE latents ({space}); give its vae")
            trained = d.meta.get("resolution")
            if trained is not None and int(trained) != getattr(self.cfg, res_key):
                raise ValueError(f"{dit_key} ({d.source}): trained at resolution {trained}, "
                                 f"{res_key} is {getattr(self.cfg, res_key)}")

    def info(self) -> dict:
        """What is loaded (no paths beyond what the config names; no credentials)."""
        return {"resolution": self.cfg.resolution,
                "refine_resolution": self.cfg.refine_resolution if self.dit_refine is not None else None,
                "latent": "ss-vae" if self.vae is not None else "pooled", "image_encoder": self.cfg.image_encoder,
                "pretrained": self.cfg.pretrained or None, "level": self.level,
                "refiners": [k for k in ("refiner", "refiner_refine") if getattr(self, k) is not None],
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "networks": {k: {"network": b.network, "config": dataclasses.asdict(b.config), "step": b.meta.get("step"),
                                 "parameters": sum(p.numel() for p in b.module.parameters())}
                             for k, b in self.bundles.items()}}

    # -- stages ------------------------------------------------------------------------------------
    def load_image(self, req: Request) -> torch.Tensor:
        """The prepared image (4, S, S): RGB on white in [0, 1], then the object's alpha."""
        size = self.encoder.image_size
        if isinstance(req.image, (bytes, bytearray, memoryview)):
            img = decode_image(bytes(req.image), size, name=req.name, background=self.background, with_mask=True)
        elif isinstance(req.image, torch.Tensor) and req.image.ndim == 3 and req.image.shape[0] in (3, 4):
            img = torch.nn.functional.interpolate(req.image[None].float(), size=(size, size), mode="bilinear",
                                                  align_corners=False)[0].clamp(0, 1)
            if img.shape[0] == 3:  # a tensor without alpha: the whole frame is the object
                img = torch.cat([img, torch.ones_like(img[:1])])
        else:
            raise ItemError(f"{req.name}: expected image bytes or a (3|4, H, W) tensor, got {type(req.image).__name__}")
        if foreground_fraction(img[:3]) < self.cfg.min_foreground:
            raise ItemError(f"{req.name}: no foreground (the image is a single flat colour)")
        return img

    @torch.no_grad()
    def condition(self, images: torch.Tensor) -> torch.Tensor:
        """Condition tokens (B, L, C) of prepared images (B, 3 or 4, S, S)."""
        return self.encoder(images[:, :3].to(self.device)).to(self.dtype)

    def sparse_condition(self, net: SparseDiT, tokens: torch.Tensor, images: torch.Tensor):
        """What ``net`` attends to: all tokens, or (``sparse_conditions``) the class and register tokens plus
        the patches the object covers, packed with their coords (patch column, row, 0; (0, 0, 1) for the
        class and registers), as the release's extract_tokens_and_coords."""
        if not net.cfg.sparse_conditions:
            return tokens
        hub = getattr(self.encoder, "hub", None)
        return PackedCondition(*pack_condition(tokens, images[:, 3:].to(self.device), hub.cfg.patch if hub else 14))

    def _guided(self, net: SparseDiT, tokens: SparseTensor, cond, occupancy: torch.Tensor | None = None):
        """Velocity with classifier-free guidance as one forward over [cond; zero cond] (2B shapes).

        The tokens' structure (and the SSA's, cached on it) is built once for all the sampler's steps."""
        b, g = tokens.batch_size, self.cfg.guidance
        doubled, cond2 = guidance_batch(tokens, cond)
        occ2 = torch.cat([occupancy, occupancy]) if occupancy is not None else None

        def velocity(x, t, _cond):
            if g == 1.0:
                return net(tokens.replace(x), t.expand(b).to(self.dtype), cond, occupancy).feats.float()
            v = net(doubled.replace(torch.cat([x, x]).to(self.dtype)), t.expand(2 * b).to(self.dtype), cond2, occ2)
            v = v.feats.float()
            vc, vu = v[: x.shape[0]], v[x.shape[0]:]
            return vu + g * (vc - vu)

        return velocity

    @torch.no_grad()
    def structure_stage(self, cond: torch.Tensor, seeds: list[int]) -> list[torch.Tensor]:
        """Latent voxel coords (M_i, 3) at resolution/8 of every item (possibly empty)."""
        return self._latent_coords(self.structure_occupancy(cond, seeds))

    def _latent_coords(self, probs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The sparse stage's latent voxels of each item's structure occupancy (at ``occupancy_threshold``)."""
        latent_res = self.latent_resolution(self.vae, self.cfg.resolution)
        return [grid_to_latent_coords(p >= self.cfg.occupancy_threshold, latent_res) for p in probs]

    @torch.no_grad()
    def structure_occupancy(self, cond: torch.Tensor, seeds: list[int]) -> list[torch.Tensor]:
        """The structure stage's decoded occupancy of every item: probabilities (64, 64, 64), float32 each."""
        b, net, g = cond.shape[0], self.structure_dit, self.cfg.guidance
        shape = (net.cfg.in_channels,) + (net.cfg.resolution,) * 3
        noise = torch.stack([torch.randn(shape, generator=_item_generator(s, 0)) for s in seeds]).to(self.device)
        cond2 = torch.cat([cond, torch.zeros_like(cond)])

        def velocity(x, t, _cond):  # classifier-free guidance as one forward over [cond; zero cond]
            if g == 1.0:
                return net(x.to(self.dtype), t.expand(b).to(self.dtype), cond).float()
            v = net(torch.cat([x, x]).to(self.dtype), t.expand(2 * b).to(self.dtype), cond2).float()
            return v[b:] + g * (v[:b] - v[b:])

        sampler = FlowEulerSampler(self.cfg.structure_steps, self.cfg.structure_shift, self.cfg.guidance,
                                   self.schedules.get("structure"))
        z = sampler.sample(CapturedVelocity(velocity, self._graphs(b * net.cfg.tokens)), noise)
        logits = self.structure_vae.decode(self.structure_vae.unscale(z.float()))
        return [occupancy_probabilities(logits[i]) for i in range(b)]

    def _graphs(self, tokens: int) -> bool:
        """Whether a sampling stage over ``tokens`` tokens (all items) is replayed as a CUDA graph: its guided
        forward (twice the tokens unless guidance is 1) runs at most ``cuda_graph_max_tokens``."""
        rows = tokens * (2 if self.cfg.guidance != 1.0 else 1)
        return self.cfg.cuda_graphs and rows <= self.cfg.cuda_graph_max_tokens

    @staticmethod
    def latent_resolution(vae, resolution: int) -> int:
        """The sparse stage's latent grid at ``resolution``: / the SS-VAE's downsampling (8 as released; pooled: 8)."""
        return resolution // (vae.config.downsample if vae is not None else 8)

    @torch.no_grad()
    def sparse_stage(self, net: SparseDiT, coords_list: list[torch.Tensor], cond, seeds: list[int],
                     steps: int, shift: float, stage: int, grids: list[torch.Tensor] | None = None) -> list[torch.Tensor]:
        """Sample latents (M_i, C) on the given latent voxels of every item, packed without padding.

        ``grids``: each item's 64³ structure occupancy (bool), for an SS-DiT that reads it (``occupancy_subcells``)."""
        c = net.cfg.in_channels
        noise = [torch.randn(len(x), c, generator=_item_generator(s, stage)) for x, s in zip(coords_list, seeds)]
        tokens = SparseTensor.from_samples([x.cpu() for x in coords_list], noise, device=self.device, ordered=False)
        occupancy = None
        if net.cfg.occupancy_subcells:
            if grids is None:
                raise ValueError("this SS-DiT reads the structure stage's occupancy (occupancy_subcells): pass each "
                                 "item's 64³ occupancy as grids (the refine stage has none)")
            latent_res = self.latent_resolution(self.vae, self.cfg.resolution)
            occupancy = torch.cat([subcell_occupancy(g.cpu(), x.cpu(), latent_res)
                                   for g, x in zip(grids, coords_list)]).to(self.device)
        sampler = FlowEulerSampler(steps, shift, self.cfg.guidance, self.schedules.get("sparse" if stage == 1 else "refine"))
        velocity = CapturedVelocity(self._guided(net, tokens, cond, occupancy), self._graphs(len(tokens.feats)))
        z = sampler.sample(velocity, tokens.feats).float()
        return list(torch.split(z, [len(x) for x in coords_list]))

    @torch.no_grad()
    def decode(self, vae, coords_list: list[torch.Tensor], latents: list[torch.Tensor], latent_res: int,
               refiner=None, refiner_level: float | None = None) -> list[tuple]:
        """Latents -> sparse SDF per item: (coords (N, 3), values (N,), grid resolution, marching level, fill).

        With a refiner, the decoded SDF (and, for the 512 refiner, the decoder's features) go through it,
        and what comes back holds every voxel at a corner of a cell that crosses its level. Without one,
        voxels outside the set count as 1 when marching (the release's dense grid of ones)."""
        if vae is None:
            return [(*pooled_sdf(c, z, latent_res), 0.0, None) for c, z in zip(coords_list, latents)]
        out = []
        for c, z in zip(coords_list, latents):  # one shape at a time bounds the decoder's peak memory
            st = SparseTensor.from_samples([c], [vae.unscale(z.to(self.device, torch.float32))], latent_res, self.device)
            if refiner is not None:
                wants_feat = refiner.config.kind == "sdf"
                dec = vae.decode(st, chunk=self.cfg.decode_chunk, return_feat=wants_feat)
                sdf, feat = dec if wants_feat else (dec, None)
                rc, rv, res = refiner.run(sdf.coords[:, 1:], sdf.feats[:, 0].float(),
                                          feat.feats if feat is not None else None, mc_threshold=refiner_level)
                out.append((rc, rv, res, refiner_level, None))
                continue
            sdf = vae.decode(st, chunk=self.cfg.decode_chunk)
            values = sdf.feats[:, 0].float()
            # tanh saturates outside the band: voxels at +1 march exactly like the fill that replaces them
            keep = values < 0.999
            coords, values = sdf.coords[keep, 1:], values[keep]
            fill = (enclosed_fill(coords, values, sdf.resolution, c, latent_res, self.level)
                    if self.cfg.fill_enclosed and len(coords) else 1.0)
            out.append((coords, values, sdf.resolution, self.level, fill))
        return out

    def march(self, sdf: tuple) -> tuple[np.ndarray, np.ndarray]:
        coords, values, res, level, fill = sdf
        if len(coords) == 0:
            raise ItemError("no surface (the decoded SDF has no voxels below the level)")
        v, f = extract_mesh(coords, values, res, level=level, fill=fill)
        if len(f) == 0:
            raise ItemError("no surface (the decoded SDF has no sign change)")
        return v.cpu().numpy(), f.cpu().numpy()

    def refine_coords(self, mesh: tuple[np.ndarray, np.ndarray]) -> torch.Tensor:
        """Latent voxels of the refine stage: grid points within ``surface_band`` voxels of the first mesh,
        normalised as the release does (its mesh2index); the refine stage's mesh is in that frame."""
        v, f = mesh
        vn = torch.from_numpy(normalize_vertices(v)).to(self.device)
        return surface_latent_index(vn, torch.from_numpy(f).to(self.device), size=self.cfg.refine_resolution,
                                    factor=8, threshold=self.cfg.surface_band).int()

    # -- the whole cascade -------------------------------------------------------------------------
    def generate(self, requests: list[Request]) -> list[Result]:
        """Meshes for a batch of requests; failures come back as results with ``error`` set."""
        results = [Result(r.name, r.seed) for r in requests]
        live: list[int] = []
        images = []
        t0 = time.perf_counter()
        for i, r in enumerate(requests):
            try:
                images.append(self.load_image(r))
                live.append(i)
            except ValueError as e:
                results[i].error = str(e) if r.name in str(e) else f"{r.name}: {e}"
        if not live:
            return results
        timings = {"load": time.perf_counter() - t0}
        try:
            self._run(requests, results, live, torch.stack(images), timings)
        except (RuntimeError, ValueError) as e:  # a batch-wide failure (out of memory, bad weights) fails its items
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            for i in live:
                if results[i].error is None and results[i].vertices is None:
                    results[i].error = f"{requests[i].name}: {type(e).__name__}: {msg}"
        return results

    # the networks each timed stage runs (what offload brings to the device for it)
    STAGE_NETWORKS = {"condition": ("encoder",), "structure": ("structure_dit", "structure_vae"), "sparse": ("dit",),
                      "decode": ("vae", "refiner"), "refine": ("dit_refine",),
                      "refine_decode": ("vae_refine", "refiner_refine")}

    def bring(self, stage: str) -> None:
        """Offload: the device holds the networks of ``stage`` and no others."""
        if not self.cfg.offload or self.home == self.device or stage not in self.STAGE_NETWORKS:
            return  # marching and clean-up run no network: what is resident stays
        want = tuple(n for n in self.STAGE_NETWORKS[stage] if getattr(self, n) is not None)
        if want == self._resident:
            return
        keep = {id(getattr(self, n)) for n in want}
        for name in self._resident:
            if id(getattr(self, name)) not in keep:
                self._place(getattr(self, name), self.home)
        for name in want:
            self._place(getattr(self, name), self.device)
        self._resident = want

    def _place(self, module: torch.nn.Module, device: torch.device) -> None:
        """Point ``module``'s tensors at ``device``: a copy of the host master going there (pinned memory, so
        the copy runs at full bus speed), the master itself coming back (weights never change: no copy back)."""
        masters = self._masters.get(id(module))
        if masters is None:
            pin = self.device.type == "cuda"
            masters = [(t, t.data.pin_memory() if pin else t.data) for t in (*module.parameters(), *module.buffers())]
            self._masters[id(module)] = masters
        for t, master in masters:
            t.data = master if device == self.home else master.to(device, non_blocking=True)

    def _timed(self, timings: dict, key: str, fn, *args):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
        self.bring(key)  # inside the stage's time: the copy is part of what offload costs
        out = fn(*args)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        timings[key] = timings.get(key, 0.0) + time.perf_counter() - t
        return out

    def _drop(self, results, requests, live, keep_mask, reason_of):
        kept = []
        for j, i in enumerate(live):
            if keep_mask[j]:
                kept.append(j)
            else:
                results[i].error = f"{requests[i].name}: {reason_of(j)}"
        return kept

    def _run(self, requests, results, live, images, timings) -> None:
        cfg = self.cfg
        seeds = [requests[i].seed for i in live]
        cond = self._timed(timings, "condition", self.condition, images)
        grids = None
        if self.dit.cfg.occupancy_subcells:  # the sparse stage also reads the occupancy inside each latent voxel
            probs = self._timed(timings, "structure", self.structure_occupancy, cond, seeds)
            coords, grids = self._latent_coords(probs), [p >= cfg.subcell_threshold for p in probs]
        else:
            coords = self._timed(timings, "structure", self.structure_stage, cond, seeds)
        sizes = [len(c) for c in coords]
        keep = self._drop(results, requests, live, [0 < n <= cfg.max_tokens for n in sizes],
                          lambda j: "empty structure (the structure stage predicted no occupied voxels)" if sizes[j] == 0
                          else f"structure too large ({sizes[j]} latent voxels > max_tokens {cfg.max_tokens})")
        if not keep:
            return
        idx = [live[j] for j in keep]
        cond, images, seeds, coords = cond[keep], images[keep], [seeds[j] for j in keep], [coords[j] for j in keep]
        grids = [grids[j] for j in keep] if grids is not None else None
        latents = self._timed(timings, "sparse", self.sparse_stage, self.dit, coords,
                              self.sparse_condition(self.dit, cond, images), seeds, cfg.sparse_steps, cfg.sparse_shift, 1,
                              grids)
        # the release's 512 refiner marches at twice the threshold
        sdfs = self._timed(timings, "decode", self.decode, self.vae, coords, latents,
                           self.latent_resolution(self.vae, cfg.resolution),
                           self.refiner, 2.0 * self.level)
        tokens = {i: len(c) for i, c in zip(idx, coords)}
        meshes = self._timed(timings, "mesh", self._march_all, results, requests, idx, sdfs)
        live_j = [j for j, m in enumerate(meshes) if m is not None]
        idx, cond, images, seeds = [idx[j] for j in live_j], cond[live_j], images[live_j], [seeds[j] for j in live_j]
        sdfs, meshes = [sdfs[j] for j in live_j], [meshes[j] for j in live_j]
        if self.dit_refine is not None and idx:
            rcoords = [self.refine_coords(m) for m in meshes]
            ok = [0 < len(c) <= cfg.max_tokens for c in rcoords]
            sub = self._drop(results, requests, idx, ok, lambda j: f"refine stage got {len(rcoords[j])} latent voxels "
                             f"(needs 1..{cfg.max_tokens}); the first surface is empty or too large")
            if not sub:
                return
            idx, cond, images = [idx[j] for j in sub], cond[sub], images[sub]
            seeds, rcoords = [seeds[j] for j in sub], [rcoords[j] for j in sub]
            latents = self._timed(timings, "refine", self.sparse_stage, self.dit_refine, rcoords,
                                  self.sparse_condition(self.dit_refine, cond, images), seeds,
                                  cfg.refine_steps, cfg.refine_shift, 2)
            sdfs = self._timed(timings, "refine_decode", self.decode, self.vae_refine, rcoords, latents,
                               self.latent_resolution(self.vae_refine, cfg.refine_resolution), self.refiner_refine,
                               self.level)
            tokens = {i: (tokens[i], len(c)) for i, c in zip(idx, rcoords)}
            meshes = self._timed(timings, "refine_mesh", self._march_all, results, requests, idx, sdfs)
        for i, sdf, mesh in zip(idx, sdfs, meshes):
            if mesh is None:
                continue
            t = time.perf_counter()
            try:
                v, f, stats = clean_mesh(mesh[0], mesh[1], cfg.postprocess)
            except ValueError as e:
                results[i].error = f"{requests[i].name}: {e}"
                continue
            results[i].vertices, results[i].faces = v, f
            results[i].stats = {**stats, "tokens": tokens[i], "voxels": int(len(sdf[0])), "grid": sdf[2]}
            results[i].timings = {**timings, "clean": time.perf_counter() - t}

    def _march_all(self, results, requests, idx, sdfs):
        meshes = []
        for i, sdf in zip(idx, sdfs):
            try:
                meshes.append(self.march(sdf))
            except ValueError as e:
                results[i].error = f"{requests[i].name}: {e}"
                meshes.append(None)
        return meshes


def _read_json(path: str, opener=None) -> dict:
    import json

    try:
        if opener is None:
            with open(path) as f:
                return json.load(f)
        with opener(path) as f:
            return json.loads(f.read())
    except FileNotFoundError:
        raise ValueError(f"{path}: not found") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None


def _from_release_folder(cfg: GenerationConfig, opener=None) -> tuple[GenerationConfig, dict]:
    """Fill the network fields of ``cfg`` from a converted release folder's cascade.json (fields the user
    set stay), and return the release's sampler schedules and marching level."""
    root = cfg.pretrained.rstrip("/")
    try:
        doc = _read_json(root + "/cascade.json", opener)
    except ValueError as e:
        raise ValueError(f"pretrained {root}: no readable cascade.json, write one with `s2 convert official` ({e})") from None
    if doc.get("format") != "s2ray-cascade":
        raise ValueError(f"pretrained {root}: cascade.json is not a converted cascade")
    nets = doc.get("networks", {})
    roles = {"dense_vae": "structure_vae", "dense_dit": "structure_dit", "sparse_vae_512": "vae",
             "sparse_dit_512": "dit", "sparse_vae_1024": "vae_refine", "sparse_dit_1024": "dit_refine",
             "refiner": "refiner", "refiner_1024": "refiner_refine"}
    fill = {}
    for section, role in roles.items():
        if section in nets and not getattr(cfg, role):
            fill[role] = root + "/" + nets[section]["path"]
    # each stage's grid is its DiT's latent grid times the SS-VAE's 8 (512 and 1024 for the release)
    for section, key in (("sparse_dit_512", "resolution"), ("sparse_dit_1024", "refine_resolution")):
        if section in nets:
            fill[key] = 8 * int(_read_json(root + "/" + nets[section]["path"] + "/config.json", opener)["config"]["resolution"])
    cfg = dataclasses.replace(cfg, **fill)
    cfg.validate()
    release = doc.get("release", {})
    schedules = {}
    for stage, section in (("structure", "dense_scheduler"), ("sparse", "sparse_scheduler_512"),
                           ("refine", "sparse_scheduler_1024")):
        if section in release:
            sec = release[section]
            try:
                schedules[stage] = ReleaseSchedule.from_official({"target": sec.get("target", ""), **sec.get("params", {})})
            except ValueError as e:
                raise ValueError(f"pretrained {root}: {section}: {e}") from None
    level = release.get("pipeline_defaults", {}).get("sparse_512", {}).get("mc_threshold")
    return cfg, {"schedules": schedules, "level": level}


def pooled_sdf(latent_coords: torch.Tensor, feats: torch.Tensor, latent_res: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Pooled latents -> a sparse SDF on the sub-cell grid (2 sub-cells per latent voxel per axis).

    A sub-cell's value is its mean clipped SDF; an empty sub-cell (fill -1 in model/pooled_latent.py)
    takes the sign of its latent voxel's filled sub-cells, so the grid has no holes for marching.
    """
    s = pooled_latent.SUB
    mean_sdf, fill = feats[:, : s ** 3].float(), feats[:, s ** 3:].float()
    filled = fill > -0.99
    inner = torch.where(filled, mean_sdf, torch.zeros_like(mean_sdf)).sum(1)
    sign = torch.where(inner < 0, -1.0, 1.0)[:, None].expand_as(mean_sdf)
    values = torch.where(filled, mean_sdf.clamp(-1, 1), sign)
    r = torch.arange(s, device=latent_coords.device)
    offs = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    coords = (latent_coords.long()[:, None, :] * s + offs[None]).reshape(-1, 3)
    return coords.int(), values.reshape(-1), latent_res * s
