"""What each network of the cascade computes from a batch of shard samples.

A task turns a ``SparseSDFSample`` into a training item (``prepare``), counts its tokens, collates
items into model inputs (``collate``, where frozen helpers such as the image encoder run) and owns the
trainable module, whose ``forward(**batch)`` returns (loss, metrics). DeepSpeed wraps that module only.
"""
from __future__ import annotations

import dataclasses
import random
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from model import pooled_latent
from model.condition import build_image_encoder, decode_image, drop_condition, pack_condition
from model.cpu_precision import cpu_autocast
from model.dit import DiTConfig, PackedCondition, SparseDiT
from model.flow import TimestepSampler, flow_loss, interpolate
from model.sparse import SparseTensor
from model.structure import (StructureDiT, StructureVAE, StructureVAEConfig, check_structure_pair, occupancy_grid,
                             structure_dit_config, subcell_occupancy, subcell_side)
from model.vae import SparseSDFVAE, VAEConfig
from model.vae_loss import VAELossWeights, VAETargets, stack_targets, vae_loss, vae_targets
from pipeline.train.checkpoints import load_weights, model_config_of
from pipeline.train.config import TrainConfig


@dataclass
class Item:
    name: str
    tokens: int
    data: dict


class FlowObjective(nn.Module):
    """Rectified-flow loss around a DiT: sample t and ε, build x_t, regress v = ε - x0."""

    def __init__(self, dit: SparseDiT, timesteps: TimestepSampler, cpu_bf16: bool = False):
        super().__init__()
        self.dit, self.timesteps = dit, timesteps
        self.cpu_bf16 = cpu_bf16  # TrainConfig.cpu_dit_precision: bfloat16 linears on a CPU (model.cpu_precision)

    def forward(self, x0: SparseTensor, cond, occupancy=None):
        cu = x0.cu_seqlens
        t = self.timesteps(x0.batch_size, device=x0.device)
        t_tok = torch.repeat_interleave(t, cu[1:] - cu[:-1])[:, None]
        noise = torch.randn_like(x0.feats)
        with cpu_autocast(self.cpu_bf16, x0.device):
            v = self.dit(x0.replace(interpolate(x0.feats, noise, t_tok)), t.to(x0.dtype), cond, occupancy).feats
        loss = flow_loss(v.to(x0.dtype), x0.feats, noise)
        return loss, {"flow_mse": loss.detach()}


class DenseFlowObjective(nn.Module):
    """The same rectified-flow loss on dense latents (B, C, D, H, W): one t per shape."""

    def __init__(self, dit: nn.Module, timesteps: TimestepSampler, cpu_bf16: bool = False):
        super().__init__()
        self.dit, self.timesteps = dit, timesteps
        self.cpu_bf16 = cpu_bf16

    def forward(self, x0, cond):
        t = self.timesteps(x0.shape[0], device=x0.device)
        noise = torch.randn_like(x0)
        with cpu_autocast(self.cpu_bf16, x0.device):
            v = self.dit(interpolate(x0, noise, t.view(-1, 1, 1, 1, 1).to(x0.dtype)), t.to(x0.dtype), cond)
        loss = flow_loss(v.to(x0.dtype), x0, noise)
        return loss, {"flow_mse": loss.detach()}


class StructureVAEObjective(nn.Module):
    def __init__(self, vae: StructureVAE):
        super().__init__()
        self.vae = vae

    def forward(self, occupancy):
        # TrainConfig.cpu_conv_precision reaches the dense 3D convolutions as it reaches the sparse ones
        # (gather_gemm.GEMM_DTYPE, set at the loop's start): bfloat16 autocast on a CPU, norms and loss float32;
        # a 64³ debug step of 4 shapes ran in 1.46 s instead of 2.59 s on one core with AMX.
        from kernels.sparse_conv import gather_gemm

        with cpu_autocast(gather_gemm.GEMM_DTYPE == torch.bfloat16, occupancy.device):
            return self.vae.loss(occupancy)


def cpu_dit_bf16(cfg: TrainConfig) -> bool:
    """Whether this worker runs its DiT's linear layers in bfloat16 when on a CPU (``cpu_dit_precision``)."""
    from kernels.sparse_conv import gather_gemm

    return gather_gemm.gemm_dtype(cfg.cpu_dit_precision, "cpu_dit_precision") is not None


class Task:
    """Base: image conditions from the sample's views through a frozen encoder."""

    module: nn.Module
    model_config: Any
    latent_space: str | None = None  # what a DiT models, recorded in its checkpoints (generation checks it)

    def __init__(self, cfg: TrainConfig, seed: int):
        self.cfg = cfg
        self.rng = random.Random(seed)
        self.gen = torch.Generator().manual_seed(seed)
        self.encoder = build_image_encoder(cfg.image_encoder)
        self.missing_views = 0

    def views_of(self, sample) -> list[bytes]:
        """The sample's encoded views, all kept on its item: the view a step trains on is drawn in ``collate``
        (``view_image``). Drawn in ``prepare``, it was fixed for the whole run, since later epochs replay the
        prepared items from the epoch cache: each shape trained on one of its views only (docs/demo.md)."""
        if not sample.views:
            self.missing_views += 1
        return [view.png for view in sample.views]

    def view_image(self, item: Item) -> torch.Tensor | None:
        """One of the item's views, drawn afresh at each step, prepared as (4, S, S) with its alpha."""
        views = item.data["views"]
        if not views:
            return None
        k = self.rng.randrange(len(views))
        return decode_image(views[k], self.encoder.image_size, name=f"{item.name} view {k}", with_mask=True)

    @torch.no_grad()
    def conditions(self, images: list, device) -> torch.Tensor:
        """Image tokens (B, L, C); a shape without views gets the zero (unconditional) condition."""
        present = [im[:3] for im in images if im is not None]  # RGB; the alpha is the images' 4th channel
        n_tok = getattr(self.encoder, "num_tokens", None)
        tokens = self.encoder(torch.stack(present).to(device)) if present else None
        shape = tokens.shape[1:] if tokens is not None else (n_tok, self.encoder.dim)
        out = torch.zeros(len(images), *shape, device=device)
        if tokens is not None:
            out[[i for i, im in enumerate(images) if im is not None]] = tokens.float()
        return drop_condition(out, self.cfg.cond_drop, self.gen)

    def to(self, device):
        self.encoder.to(device)
        return self


class SparseDiTTask(Task):
    """SS-DiT on sparse latents at 1/8 resolution: fixed pooled SDF statistics, or a frozen SS-VAE's latents.

    With a trained SS-VAE (``latent`` = its checkpoint), each batch's shapes are encoded on the training
    device by the VAE's encoder (posterior mean, no gradient); the flow then models those latents, and
    generation decodes them with the same VAE (model/cascade.py).
    """

    def __init__(self, cfg: TrainConfig, seed: int, latent_vae: nn.Module | None = None, model_config=None):
        super().__init__(cfg, seed)
        if cfg.latent != "pooled" and latent_vae is None:
            raise ValueError(f"latent={cfg.latent!r}: the SS-VAE checkpoint was not loaded")
        self.vae = latent_vae.eval().requires_grad_(False) if cfg.latent != "pooled" else None
        channels = self.vae.config.latent_channels if self.vae is not None else pooled_latent.CHANNELS
        if model_config is not None:  # a given network (a converted release SS-DiT): its layout as it is
            self.model_config = dataclasses.replace(model_config, grad_checkpointing=cfg.grad_checkpointing)
            if (self.model_config.in_channels, self.model_config.cond_dim) != (channels, self.encoder.dim):
                raise ValueError(f"the SS-DiT takes {self.model_config.in_channels} latent channels and "
                                 f"{self.model_config.cond_dim}-wide conditions; the latent has {channels}, the image "
                                 f"encoder {cfg.image_encoder!r} gives {self.encoder.dim}")
        else:
            self.model_config = DiTConfig.named(cfg.model, attention=cfg.attention,
                                                grad_checkpointing=cfg.grad_checkpointing, cond_dim=self.encoder.dim,
                                                in_channels=channels, out_channels=channels)
        self.latent_space = "pooled" if self.vae is None else f"ss_vae:{cfg.latent}"
        self.module = FlowObjective(SparseDiT(self.model_config), TimestepSampler(shift=cfg.timestep_shift),
                                    cpu_bf16=cpu_dit_bf16(cfg))

    def prepare(self, sample) -> Item:
        views = self.views_of(sample)
        if self.vae is None:
            coords, feats = pooled_latent.encode(sample.coords, sample.values)
            data = {"coords": coords, "feats": feats, "views": views}
            if self.model_config.occupancy_subcells:
                latent_res = sample.resolution // pooled_latent.DOWN
                self._check_subcells(sample.mesh_id, latent_res)
                data["occupancy"] = self._subcells(sample.coords, sample.resolution, coords, latent_res)
            return Item(sample.mesh_id, len(coords), data)
        down = self.vae.config.downsample
        if sample.resolution % down:
            raise ValueError(f"{sample.mesh_id}: resolution {sample.resolution} is not a multiple of the SS-VAE's {down}")
        tokens = len(torch.unique(torch.div(sample.coords.long(), down, rounding_mode="floor"), dim=0))
        if self.model_config.occupancy_subcells:
            self._check_subcells(sample.mesh_id, sample.resolution // down)
        return Item(sample.mesh_id, tokens, {"sdf": (sample.coords, sample.values, sample.resolution), "views": views})

    @torch.no_grad()
    def _encode(self, items: list[Item], device) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        # The frozen SS-VAE's posterior mean is fixed per shape: encode each item once and keep its latent
        # (16 floats a latent voxel, ~1/30 of the band's bytes) on the item, which the epoch cache replays,
        # as the structure DiT task does; on a CPU the encoder costs more than the debug SS-DiT's step.
        for item in items:  # one shape at a time: the encoder's peak memory is that of the largest shape
            if "latent" not in item.data:
                c, v, res = item.data.pop("sdf")
                x = SparseTensor.from_samples([c], [v.float()], res, device)
                z, _, _ = self.vae.encode(x, sample=False)
                item.data["latent"] = (z.coords[:, 1:].cpu(), self.vae.scale(z.feats.float()).cpu())
                if self.model_config.occupancy_subcells:
                    item.data["occupancy"] = self._subcells(c, res, item.data["latent"][0],
                                                            res // self.vae.config.downsample)
        return ([i.data["latent"][0].to(device) for i in items], [i.data["latent"][1].to(device) for i in items])

    def _check_subcells(self, name: str, latent_res: int) -> None:
        want = self.model_config.occupancy_subcells
        try:
            s = subcell_side(latent_res)
        except ValueError as e:
            raise ValueError(f"{name}: {e}") from None
        if s != want:
            raise ValueError(f"{name}: its {latent_res}³ latent grid holds {s}³ structure voxels a latent voxel; the "
                             f"SS-DiT reads {want}³ (occupancy_subcells={want})")

    @staticmethod
    def _subcells(band: torch.Tensor, resolution: int, latent_coords: torch.Tensor, latent_res: int) -> torch.Tensor:
        """The shard's own 64³ band occupancy inside each latent voxel (what the structure stage gives at
        generation) as bool (M, s³)."""
        return subcell_occupancy(occupancy_grid(band.cpu(), resolution), latent_coords.cpu(), latent_res).bool()

    def collate(self, items: list[Item], device, dtype) -> dict:
        if self.vae is None:
            coords_list, feats_list = [i.data["coords"] for i in items], [i.data["feats"] for i in items]
        else:
            coords_list, feats_list = self._encode(items, device)
        x0 = SparseTensor.from_samples(coords_list, feats_list, device=device, ordered=False)
        images = [self.view_image(i) for i in items]
        cond = self.conditions(images, device)
        if self.model_config.sparse_conditions:  # the released layout: covered patches with their coords
            side = self.encoder.image_size
            alpha = torch.stack([im[3:] if im is not None else torch.zeros(1, side, side) for im in images]).to(device)
            hub = getattr(self.encoder, "hub", None)
            cond = PackedCondition(*pack_condition(cond, alpha, hub.cfg.patch if hub else 14))
            cond = PackedCondition(cond.tokens.to(dtype), cond.coords, cond.cu_seqlens)
        else:
            cond = cond.to(dtype)
        batch = {"x0": x0.replace(x0.feats.to(dtype)), "cond": cond}
        if self.model_config.occupancy_subcells:
            batch["occupancy"] = torch.cat([i.data["occupancy"] for i in items]).to(device, dtype)
        return batch

    def to(self, device):
        super().to(device)
        if self.vae is not None:
            self.vae.to(device)
        return self


class StructureVAETask(Task):
    def __init__(self, cfg: TrainConfig, seed: int, model_config=None):
        super().__init__(cfg, seed)
        self.model_config = model_config if model_config is not None else StructureVAEConfig.named(cfg.model)
        self.module = StructureVAEObjective(StructureVAE(self.model_config))

    def prepare(self, sample) -> Item:
        occ = occupancy_grid(sample.coords, sample.resolution)
        return Item(sample.mesh_id, occ.numel() // 64, {"occupancy": occ})

    def collate(self, items, device, dtype) -> dict:
        return {"occupancy": torch.stack([i.data["occupancy"] for i in items])[:, None].to(device, dtype)}


class StructureDiTTask(Task):
    """The dense DiT over a frozen structure VAE's 16³×8 latent (in the VAE's normalised space)."""

    def __init__(self, cfg: TrainConfig, seed: int, vae: StructureVAE, model_config=None):
        super().__init__(cfg, seed)
        self.vae = vae.eval().requires_grad_(False)
        if model_config is not None:
            self.model_config = dataclasses.replace(model_config, grad_checkpointing=cfg.grad_checkpointing)
        else:
            self.model_config = structure_dit_config(cfg.model, grad_checkpointing=cfg.grad_checkpointing,
                                                     cond_dim=self.encoder.dim)
        check_structure_pair(vae.cfg, self.model_config)
        self.module = DenseFlowObjective(StructureDiT(self.model_config), TimestepSampler(shift=cfg.timestep_shift),
                                         cpu_bf16=cpu_dit_bf16(cfg))

    def prepare(self, sample) -> Item:
        occ = occupancy_grid(sample.coords, sample.resolution)
        return Item(sample.mesh_id, self.model_config.tokens, {"occupancy": occ, "views": self.views_of(sample)})

    @torch.no_grad()
    def collate(self, items, device, dtype) -> dict:
        # The frozen VAE's posterior mean is fixed per shape: encode each item once and keep the latent
        # (16³×8 floats, half the bytes of the 64³ occupancy it replaces) on the item, which the epoch
        # cache reuses. On a CPU the 64³ encoder costs more than the debug DiT's step.
        todo = [i for i in items if "latent" not in i.data]
        if todo:
            occ = torch.stack([i.data["occupancy"] for i in todo])[:, None].to(device)
            z_new, _, _ = self.vae.encode(occ.float())
            for item, z_item in zip(todo, z_new):
                item.data["latent"] = z_item.float().cpu()
                del item.data["occupancy"]
        z = torch.stack([i.data["latent"] for i in items]).to(device)
        cond = self.conditions([self.view_image(i) for i in items], device)
        return {"x0": self.vae.scale(z).to(dtype), "cond": cond.to(dtype)}

    def to(self, device):
        self.vae.to(device)
        return super().to(device)


class SparseVAEObjective(nn.Module):
    """The SS-VAE's own loss (``model.vae_loss``): SDF error on input, extra and sharp voxels, plus KL."""

    def __init__(self, vae, weights):
        super().__init__()
        self.vae, self.weights = vae, weights

    def forward(self, x, targets):
        pred, mean, logvar = self.vae(x.replace(x.feats.to(self.vae_dtype)))
        terms = vae_loss(pred.replace(pred.feats.float()), targets, mean.float(), logvar.float(), self.weights)
        return terms["total"], {k: v.detach() for k, v in terms.items() if k != "total"}

    @property
    def vae_dtype(self):
        return next(self.vae.parameters()).dtype


def signal_preserving_init(vae) -> None:
    """He-normal 3³ sparse convs (std √(2 / (27·C_in))) for an SS-VAE trained from scratch.

    The release's layout has no norms in the decoder's up blocks, and with fan-in-scaled uniform convs
    each block shrinks the signal ~14×: at the debug widths (32, 16, 8 channels) a fresh decoder's last
    features are 3,000× smaller than its latent features (std 1.29 -> 4.5e-4 on a 64³ torus), so its
    zero-initialised output layer learns for hundreds of steps before the SDF follows the latent
    (docs/demo.md). He-normal keeps 0.14. Weights loaded afterwards (``init_from``, resume) replace it.

    The encoder's output layer starts as the other linears (Xavier) on the posterior mean, and at log-variance
    −4 (noise std 0.14): with the release's zero layer every latent starts as unit noise, the decoder learns
    to ignore it, and on the whole corpus the SS-VAE still decoded no surface after 300 steps; so started it
    decoded one closed part per shape (Chamfer 0.143 on six corpus shapes, docs/demo.md)."""
    from model.sparse.layers import SparseConv3d

    for m in vae.modules():
        if isinstance(m, SparseConv3d):
            nn.init.normal_(m.weight, std=(2.0 / (m.weight.shape[0] * m.weight.shape[1])) ** 0.5)
    out = vae.encoder.out_layer
    half = out.weight.shape[0] // 2  # rows: posterior mean, then log-variance
    nn.init.xavier_uniform_(out.weight[:half])
    with torch.no_grad():
        out.bias[half:] = -4.0


class SparseVAETask(Task):
    """SS-VAE on narrow-band sparse SDFs; a batch is as many shapes as fit in the voxel budget."""

    def __init__(self, cfg: TrainConfig, seed: int, model_config=None):
        super().__init__(cfg, seed)
        # "debug" is the trainer-wide name of the smallest size; the SS-VAE calls it "tiny".
        self.model_config = (model_config if model_config is not None
                             else VAEConfig.named("tiny" if cfg.model == "debug" else cfg.model))
        vae = SparseSDFVAE(self.model_config)
        signal_preserving_init(vae)
        weights = VAELossWeights() if cfg.kl_weight is None else VAELossWeights(kl=cfg.kl_weight)
        self.module = SparseVAEObjective(vae, weights)

    def prepare(self, sample) -> Item:
        # A shape over the voxel budget is skipped and named by the batching (the budget is the workers' memory
        # guard), unless oversize="alone": then it fills a batch of its own, so small CPU budgets (more,
        # cheaper steps; docs/demo.md) still train on every shape.
        tokens = sample.num_voxels
        if self.cfg.oversize == "alone":
            tokens = min(tokens, self.cfg.token_budget)
        return Item(sample.mesh_id, tokens, {"sdf": (sample.coords.clone(), sample.values.clone(), sample.resolution)})

    def collate(self, items, device, dtype) -> dict:
        coords, values, resolutions = zip(*(i.data["sdf"] for i in items))
        if len(set(resolutions)) > 1:
            raise ValueError(f"SS-VAE batch of several resolutions {sorted(set(resolutions))}")
        x = SparseTensor.from_samples(list(coords), [v.float() for v in values], resolutions[0], device)
        return {"x": x, "targets": stack_targets([self._targets(i, device) for i in items])}

    def _targets(self, item: Item, device) -> VAETargets:
        # The targets depend on the shape alone: built once (a third of a step's time on a CPU at 64³),
        # kept on the item, which the epoch cache replays.
        if "targets" not in item.data:
            c, v, res = item.data["sdf"]
            one = SparseTensor.from_samples([c], [v.float()], res, device)
            t = vae_targets(one, self.model_config.downsample)
            item.data["targets"] = VAETargets(t.coords.cpu(), t.values.cpu(), t.is_input.cpu(), t.is_sharp.cpu())
        t = item.data["targets"]
        return VAETargets(t.coords.to(device), t.values.to(device), t.is_input.to(device), t.is_sharp.to(device))


def build_task(cfg: TrainConfig, seed: int, frozen_weights: dict | None = None, model_config=None) -> Task:
    """The task of ``cfg.network``; ``frozen_weights`` holds the structure VAE for network=structure_dit;
    ``model_config`` (a checkpoint folder's, e.g. a converted release network) replaces the named size."""
    if cfg.network == "dit":
        if cfg.latent == "pooled":
            return SparseDiTTask(cfg, seed, model_config=model_config)
        weights = load_weights(cfg.latent, "vae")
        vae = SparseSDFVAE(model_config_of(weights, VAEConfig))
        vae.load_state_dict({k.removeprefix("vae."): v for k, v in weights["state_dict"].items()})
        return SparseDiTTask(cfg, seed, vae, model_config=model_config)
    if cfg.network == "structure_vae":
        return StructureVAETask(cfg, seed, model_config)
    if cfg.network == "structure_dit":
        if frozen_weights is None:
            raise ValueError("network=structure_dit: the structure VAE weights were not loaded")
        vae = StructureVAE(model_config_of(frozen_weights, StructureVAEConfig))
        vae.load_state_dict({k.removeprefix("vae."): v for k, v in frozen_weights["state_dict"].items()})
        return StructureDiTTask(cfg, seed, vae, model_config)
    if cfg.network == "vae":
        return SparseVAETask(cfg, seed, model_config)
    raise ValueError(f"unknown network {cfg.network!r}; expected dit, structure_vae, structure_dit or vae")
