"""The image-to-mesh cascade (Direct3D-S2 §3.4 inference), batched over images.

image → condition tokens → structure stage (dense DiT on the 16³×8 latent, decoded to 64³ occupancy)
→ sparse DiT on the occupied latent voxels at ``resolution`` → latent decode (SS-VAE, or the
parameter-free pooled latent) → sparse marching tetrahedra → optional refine stage at
``refine_resolution`` on the first surface → clean-up (interior shells, floating parts, face target).

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
from model.condition import build_image_encoder, decode_image
from model.dit import DiTConfig, SparseDiT, pack
from model.flow import STAGE_DEFAULTS, FlowEulerSampler
from model.mesh_extract import extract_mesh
from model.postprocess import PostprocessConfig, clean_mesh
from model.structure import (STRUCTURE_DIT_CONFIGS, StructureDiT, StructureVAE, StructureVAEConfig, check_structure_pair,
                             occupancy_to_latent_coords)
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


def load_network(source: str, network: str, opener=None) -> NetworkBundle:
    """A network from a checkpoint file or a training checkpoint folder (its weights.pt), weights_only."""
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

    structure_vae: str = ""
    structure_dit: str = ""
    dit: str = ""  # sparse DiT at ``resolution``
    vae: str = ""  # SS-VAE checkpoint; empty: the DiT works on pooled latents (model/pooled_latent.py)
    dit_refine: str = ""  # optional sparse DiT at ``refine_resolution`` on the first surface
    vae_refine: str = ""  # SS-VAE for the refine stage (empty: the same decoder as the first stage)
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
    max_tokens: int = 400_000  # more latent voxels than this for one shape is an error for that item
    refine_band: float = 0.5  # first-stage voxels with |SDF| below this seed the refine stage's tokens
    decode_chunk: int = 32  # latent voxels per axis per chunk of the SS-VAE decoder
    min_foreground: float = 0.002  # fraction of pixels that must differ from the background
    remove_interior: bool = True
    min_component_fraction: float = 0.02
    target_faces: int = 0
    device: str = "auto"  # auto | cpu | cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32

    def validate(self) -> None:
        for key in ("resolution", "refine_resolution"):
            r = getattr(self, key)
            if r % 64 or r < 64:
                raise ValueError(f"{key}: must be a multiple of 64 (the latent is 1/8 and the structure grid 64³), got {r}")
        for key in ("structure_steps", "sparse_steps", "refine_steps", "max_tokens", "decode_chunk"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key}: must be >= 1, got {getattr(self, key)}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device: expected auto, cpu or cuda, got {self.device!r}")
        if self.dtype not in ("auto", "bf16", "fp32"):
            raise ValueError(f"dtype: expected auto, bf16 or fp32, got {self.dtype!r}")
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


def _item_generator(seed: int, stage: int) -> torch.Generator:
    # one stream per (item, stage): a stage's noise never depends on how much the previous stage drew
    return torch.Generator().manual_seed(int(seed) * 1_000_003 + stage)


class Cascade:
    """The networks of the cascade on one device; ``generate`` turns a batch of requests into meshes."""

    def __init__(self, cfg: GenerationConfig, encoder: torch.nn.Module, structure_vae: NetworkBundle,
                 structure_dit: NetworkBundle, dit: NetworkBundle, vae: NetworkBundle | None = None,
                 dit_refine: NetworkBundle | None = None, vae_refine: NetworkBundle | None = None):
        cfg.validate()
        self.cfg = cfg
        self.device = torch.device("cuda" if cfg.device == "auto" and torch.cuda.is_available() else
                                   ("cpu" if cfg.device == "auto" else cfg.device))
        self.dtype = (torch.bfloat16 if (cfg.dtype == "bf16" or (cfg.dtype == "auto" and self.device.type == "cuda"))
                      else torch.float32)
        self.encoder = encoder.to(self.device).eval()
        self.structure_vae = structure_vae.module.to(self.device).eval()
        self.structure_dit = structure_dit.module.to(self.device, self.dtype).eval()
        self.dit = dit.module.to(self.device, self.dtype).eval()
        self.vae = vae.module.to(self.device).eval() if vae else None
        self.dit_refine = dit_refine.module.to(self.device, self.dtype).eval() if dit_refine else None
        self.vae_refine = vae_refine.module.to(self.device).eval() if vae_refine else self.vae
        self.bundles = {k: b for k, b in [("structure_vae", structure_vae), ("structure_dit", structure_dit),
                                          ("dit", dit), ("vae", vae), ("dit_refine", dit_refine),
                                          ("vae_refine", vae_refine)] if b is not None}
        self._check_compatible()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_checkpoints(cls, cfg: GenerationConfig, opener: Callable[[str], object] | None = None) -> "Cascade":
        """Load every network named in ``cfg`` (weights_only; ``opener`` opens URIs, default: local files)."""
        cfg.validate()
        for key in ("structure_vae", "structure_dit", "dit"):
            if not getattr(cfg, key):
                raise ValueError(f"{key}: no checkpoint given (the cascade needs structure_vae, structure_dit and dit)")
        net = {"structure_vae": "structure_vae", "structure_dit": "structure_dit", "dit": "dit", "vae": "vae",
               "dit_refine": "dit", "vae_refine": "vae"}
        bundles = {k: load_network(getattr(cfg, k), net[k], opener=opener) for k in net if getattr(cfg, k)}
        return cls(cfg, build_image_encoder(cfg.image_encoder), **bundles)

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
            if v is not None and v.config.downsample != 8:
                raise ValueError(f"{vae_key} ({v.source}): downsamples by {v.config.downsample}, the cascade needs 8")
            trained = d.meta.get("resolution")
            if trained is not None and int(trained) != getattr(self.cfg, res_key):
                raise ValueError(f"{dit_key} ({d.source}): trained at resolution {trained}, "
                                 f"{res_key} is {getattr(self.cfg, res_key)}")

    def info(self) -> dict:
        """What is loaded (no paths beyond what the config names; no credentials)."""
        return {"resolution": self.cfg.resolution,
                "refine_resolution": self.cfg.refine_resolution if self.dit_refine is not None else None,
                "latent": "ss-vae" if self.vae is not None else "pooled", "image_encoder": self.cfg.image_encoder,
                "device": str(self.device), "dtype": str(self.dtype).removeprefix("torch."),
                "networks": {k: {"network": b.network, "config": dataclasses.asdict(b.config), "step": b.meta.get("step"),
                                 "parameters": sum(p.numel() for p in b.module.parameters())}
                             for k, b in self.bundles.items()}}

    # -- stages ------------------------------------------------------------------------------------
    def load_image(self, req: Request) -> torch.Tensor:
        size = self.encoder.image_size
        if isinstance(req.image, (bytes, bytearray, memoryview)):
            img = decode_image(bytes(req.image), size, name=req.name)
        elif isinstance(req.image, torch.Tensor) and req.image.ndim == 3 and req.image.shape[0] == 3:
            img = torch.nn.functional.interpolate(req.image[None].float(), size=(size, size), mode="bilinear",
                                                  align_corners=False)[0].clamp(0, 1)
        else:
            raise ItemError(f"{req.name}: expected image bytes or a (3, H, W) tensor, got {type(req.image).__name__}")
        if foreground_fraction(img) < self.cfg.min_foreground:
            raise ItemError(f"{req.name}: no foreground (the image is a single flat colour)")
        return img

    @torch.no_grad()
    def condition(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images.to(self.device)).to(self.dtype)

    def _guided(self, net: SparseDiT, coords: torch.Tensor, cu: torch.Tensor, cond: torch.Tensor):
        """Velocity with classifier-free guidance as one forward over [cond; zero cond] (2B shapes)."""
        b = cond.shape[0]
        g = self.cfg.guidance
        coords2 = torch.cat([coords, coords])
        cu2 = torch.cat([cu, cu[1:] + cu[-1]])
        cond2 = torch.cat([cond, torch.zeros_like(cond)])

        def velocity(x, t, _cond):
            if g == 1.0:
                return net(x, coords, cu, t.expand(b).to(self.dtype), cond).float()
            v = net(torch.cat([x, x]).to(self.dtype), coords2, cu2, t.expand(2 * b).to(self.dtype), cond2).float()
            vc, vu = v[: x.shape[0]], v[x.shape[0]:]
            return vu + g * (vc - vu)

        return velocity

    @torch.no_grad()
    def structure_stage(self, cond: torch.Tensor, seeds: list[int]) -> list[torch.Tensor]:
        """Latent voxel coords (M_i, 3) at resolution/8 of every item (possibly empty)."""
        b, net, g = cond.shape[0], self.structure_dit, self.cfg.guidance
        shape = (net.cfg.in_channels,) + (net.cfg.resolution,) * 3
        noise = torch.stack([torch.randn(shape, generator=_item_generator(s, 0)) for s in seeds]).to(self.device)
        cond2 = torch.cat([cond, torch.zeros_like(cond)])

        def velocity(x, t, _cond):  # classifier-free guidance as one forward over [cond; zero cond]
            if g == 1.0:
                return net(x.to(self.dtype), t.expand(b).to(self.dtype), cond).float()
            v = net(torch.cat([x, x]).to(self.dtype), t.expand(2 * b).to(self.dtype), cond2).float()
            return v[b:] + g * (v[:b] - v[b:])

        sampler = FlowEulerSampler(self.cfg.structure_steps, self.cfg.structure_shift, self.cfg.guidance)
        z = sampler.sample(velocity, noise)
        logits = self.structure_vae.decode(self.structure_vae.unscale(z.float()))
        latent_res = self.cfg.resolution // 8
        return [occupancy_to_latent_coords(logits[i], latent_res, self.cfg.occupancy_threshold) for i in range(b)]

    @torch.no_grad()
    def sparse_stage(self, net: SparseDiT, coords_list: list[torch.Tensor], cond: torch.Tensor, seeds: list[int],
                     steps: int, shift: float, stage: int) -> list[torch.Tensor]:
        """Sample latents (M_i, C) on the given latent voxels of every item, packed without padding."""
        c = net.cfg.in_channels
        noise = [torch.randn(len(x), c, generator=_item_generator(s, stage)) for x, s in zip(coords_list, seeds)]
        coords, x0, cu = pack([x.cpu() for x in coords_list], noise)
        coords, x0, cu = coords.to(self.device), x0.to(self.device), cu.to(self.device)
        sampler = FlowEulerSampler(steps, shift, self.cfg.guidance)
        z = sampler.sample(self._guided(net, coords, cu, cond), x0).float()
        return list(torch.split(z, [len(x) for x in coords_list]))

    @torch.no_grad()
    def decode(self, vae, coords_list: list[torch.Tensor], latents: list[torch.Tensor], latent_res: int,
               prune: bool = True) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
        """Latents -> sparse SDF (coords (N, 3), values (N,), grid resolution) per item."""
        if vae is None:
            return [pooled_sdf(c, z, latent_res) for c, z in zip(coords_list, latents)]
        from model.sparse import SparseTensor

        out = []
        for c, z in zip(coords_list, latents):  # one shape at a time bounds the decoder's peak memory
            c4 = torch.cat([torch.zeros_like(c[:, :1]), c], 1).int().to(self.device)
            st = SparseTensor.from_unsorted(c4, vae.unscale(z.to(self.device, torch.float32)), latent_res, 1)
            sdf = vae.decode(st, chunk=self.cfg.decode_chunk)
            values = sdf.feats[:, 0].float()
            # tanh saturates outside the band; marching needs only cells next to the surface
            keep = values.abs() < 0.999 if prune else torch.ones_like(values, dtype=torch.bool)
            out.append((sdf.coords[keep, 1:], values[keep], sdf.resolution))
        return out

    def refine_coords(self, sdf: tuple[torch.Tensor, torch.Tensor, int]) -> torch.Tensor:
        """Latent voxels of the refine stage: those under the first surface's near-band voxels."""
        coords, values, res = sdf
        near = coords[values.abs() < self.cfg.refine_band].long()
        latent_res = self.cfg.refine_resolution // 8
        return torch.unique(near * latent_res // res, dim=0).int()

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

    def _timed(self, timings: dict, key: str, fn, *args):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        t = time.perf_counter()
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
        coords = self._timed(timings, "structure", self.structure_stage, cond, seeds)
        sizes = [len(c) for c in coords]
        keep = self._drop(results, requests, live, [0 < n <= cfg.max_tokens for n in sizes],
                          lambda j: "empty structure (the structure stage predicted no occupied voxels)" if sizes[j] == 0
                          else f"structure too large ({sizes[j]} latent voxels > max_tokens {cfg.max_tokens})")
        if not keep:
            return
        idx = [live[j] for j in keep]
        cond, seeds, coords = cond[keep], [seeds[j] for j in keep], [coords[j] for j in keep]
        latents = self._timed(timings, "sparse", self.sparse_stage, self.dit, coords, cond, seeds,
                              cfg.sparse_steps, cfg.sparse_shift, 1)
        sdfs = self._timed(timings, "decode", self.decode, self.vae, coords, latents, cfg.resolution // 8)
        tokens = {i: len(c) for i, c in zip(idx, coords)}
        if self.dit_refine is not None:
            rcoords = [self.refine_coords(s) for s in sdfs]
            ok = [0 < len(c) <= cfg.max_tokens for c in rcoords]
            sub = self._drop(results, requests, idx, ok, lambda j: f"refine stage got {len(rcoords[j])} latent voxels "
                             f"(needs 1..{cfg.max_tokens}); the first surface is empty or too large")
            if not sub:
                return
            idx, cond, seeds, rcoords = [idx[j] for j in sub], cond[sub], [seeds[j] for j in sub], [rcoords[j] for j in sub]
            latents = self._timed(timings, "refine", self.sparse_stage, self.dit_refine, rcoords, cond, seeds,
                                  cfg.refine_steps, cfg.refine_shift, 2)
            sdfs = self._timed(timings, "refine_decode", self.decode, self.vae_refine, rcoords, latents,
                               cfg.refine_resolution // 8)
            tokens = {i: (tokens[i], len(c)) for i, c in zip(idx, rcoords)}
        for i, sdf in zip(idx, sdfs):
            t = time.perf_counter()
            try:
                v, f = extract_mesh(sdf[0], sdf[1], sdf[2])
                if len(f) == 0:
                    raise ItemError("no surface (the decoded SDF has no sign change)")
                v, f, stats = clean_mesh(v.cpu().numpy(), f.cpu().numpy(), cfg.postprocess)
            except ValueError as e:
                results[i].error = f"{requests[i].name}: {e}"
                continue
            results[i].vertices, results[i].faces = v, f
            results[i].stats = {**stats, "tokens": tokens[i], "voxels": int(len(sdf[0])), "grid": sdf[2]}
            results[i].timings = {**timings, "mesh": time.perf_counter() - t}


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
