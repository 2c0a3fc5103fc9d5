"""SS-VAE training targets and loss (Direct3D-S2 §3.2).

The decoder predicts the SDF on every child of every latent voxel. Its loss is
squared error on the input voxels (weight 1.0), on the extra decoded voxels
outside the narrow band (0.1, target ±1: beyond the band the clipped SDF is
exactly ±1), on sharp-edge voxels (1.0 more), plus KL to N(0, I) (1e-3).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from kernels.sparse_conv import build_kernel_map, coord_keys, kernel_offsets

from .sparse import SparseTensor


@dataclass
class VAELossWeights:
    input: float = 1.0
    extra: float = 0.1
    sharp: float = 1.0
    kl: float = 1e-3
    sharp_angle_deg: float = 20.0  # normal change between neighbours that marks a sharp edge


@dataclass
class VAETargets:
    coords: torch.Tensor  # (M, 4) decoded structure, sorted by key
    values: torch.Tensor  # (M,) target SDF
    is_input: torch.Tensor  # (M,) bool
    is_sharp: torch.Tensor  # (M,) bool, subset of is_input


def decoded_structure(x: SparseTensor, scale: int) -> torch.Tensor:
    """All voxels the decoder outputs for input ``x``: every child of every latent voxel, sorted by key."""
    latent, _ = x.coarse(scale)
    offs = kernel_offsets(scale, latent.device).to(torch.int32)
    child = latent[:, None, :].repeat(1, offs.shape[0], 1)
    child[:, :, 1:] = child[:, :, 1:] * scale + offs
    child = child.reshape(-1, 4)
    return child[torch.argsort(coord_keys(child, x.resolution))].contiguous()


def sharp_voxels(x: SparseTensor, angle_deg: float = 20.0) -> torch.Tensor:
    """Input voxels where the SDF normal turns by more than ``angle_deg`` to a neighbour (sharp edges, corners)."""
    v = x.feats[:, 0].float()
    nbr = x.submanifold_map(3).neighbors.long()
    face = {(a, s): (1 + s * (a == 0)) * 9 + (1 + s * (a == 1)) * 3 + (1 + s * (a == 2)) for a in range(3) for s in (-1, 1)}
    grads, ok = [], (v.abs() < 1)
    for a in range(3):
        p, m = nbr[:, face[(a, 1)]], nbr[:, face[(a, -1)]]
        have = (p >= 0) & (m >= 0)
        vp, vm = v[p.clamp(min=0)], v[m.clamp(min=0)]
        ok &= have & (vp.abs() < 1) & (vm.abs() < 1)  # clipped values carry no direction
        grads.append(vp - vm)
    n = torch.nn.functional.normalize(torch.stack(grads, 1), dim=1)
    cos_min = torch.ones_like(v)
    for k in range(27):
        j = nbr[:, k]
        both = ok & (j >= 0) & ok[j.clamp(min=0)]
        c = (n * n[j.clamp(min=0)]).sum(1)
        cos_min = torch.where(both, torch.minimum(cos_min, c), cos_min)
    return ok & (cos_min < math.cos(math.radians(angle_deg)))


def vae_targets(x: SparseTensor, scale: int, sharp_angle_deg: float = 20.0) -> VAETargets:
    """Targets of the decoder for input SDF ``x`` (one channel); depends on the input only, so it can be precomputed."""
    dec = decoded_structure(x, scale)
    dkeys = coord_keys(dec, x.resolution)
    pos = torch.searchsorted(dkeys, x.keys())
    vals = x.feats[:, 0].float()
    target = torch.zeros(dec.shape[0], device=dec.device)
    is_input = torch.zeros(dec.shape[0], dtype=torch.bool, device=dec.device)
    target[pos], is_input[pos] = vals, True
    # outside the band the clipped SDF is ±1; its sign spreads outwards from the band, one ring per pass
    nbr = build_kernel_map(dec, dec, x.resolution, 3, in_sorted=True).neighbors.long()
    sign = torch.where(is_input, torch.sign(target), torch.zeros_like(target))
    for _ in range(3 * scale):
        unknown = sign == 0
        if not bool(unknown.any()):
            break
        votes = torch.where(nbr >= 0, sign[nbr.clamp(min=0)], torch.zeros((), device=dec.device)).sum(1)
        grown = unknown & (votes != 0)
        if not bool(grown.any()):
            break
        sign = torch.where(grown, torch.sign(votes), sign)
    # voxels no ring reached take the sign of their latent cell's mean input value
    latent, parent = x.coarse(scale)
    cell_sum = torch.zeros(latent.shape[0], device=dec.device).index_add(0, parent, vals)
    dpar = dec.clone()
    dpar[:, 1:] //= scale
    cell = torch.searchsorted(coord_keys(latent, x.resolution // scale), coord_keys(dpar, x.resolution // scale))
    sign = torch.where(sign == 0, torch.where(cell_sum[cell] < 0, -1.0, 1.0), sign)
    target = torch.where(is_input, target, torch.where(sign < 0, -1.0, 1.0))
    is_sharp = torch.zeros_like(is_input)
    is_sharp[pos] = sharp_voxels(x, sharp_angle_deg)
    return VAETargets(dec, target, is_input, is_sharp)


def stack_targets(per_sample: list[VAETargets]) -> VAETargets:
    """Targets of a batch from each sample's own (computed with batch index 0), in batch order."""
    coords = []
    for b, t in enumerate(per_sample):
        c = t.coords.clone()
        c[:, 0] = b
        coords.append(c)
    return VAETargets(torch.cat(coords), torch.cat([t.values for t in per_sample]),
                      torch.cat([t.is_input for t in per_sample]), torch.cat([t.is_sharp for t in per_sample]))


def kl_divergence(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, exp(logvar)) || N(0, I)), summed over channels, averaged over latent voxels."""
    return 0.5 * (mean.square() + logvar.exp() - 1.0 - logvar).sum(1).mean()


def vae_loss(pred: SparseTensor, targets: VAETargets, mean: torch.Tensor, logvar: torch.Tensor,
             weights: VAELossWeights | None = None) -> dict[str, torch.Tensor]:
    """Weighted loss terms and their total; ``pred`` must be on the decoded structure of ``targets``."""
    w = weights or VAELossWeights()
    if pred.coords.shape != targets.coords.shape or not torch.equal(pred.coords, targets.coords):
        raise ValueError(f"vae_loss: decoded structure ({len(pred)} voxels) differs from the targets' ({targets.coords.shape[0]})")
    err = (pred.feats[:, 0].float() - targets.values).square()
    zero = err.new_zeros(())
    terms = {
        "input": err[targets.is_input].mean(),
        "extra": err[~targets.is_input].mean() if bool((~targets.is_input).any()) else zero,
        "sharp": err[targets.is_sharp].mean() if bool(targets.is_sharp.any()) else zero,
        "kl": kl_divergence(mean, logvar),
    }
    terms["total"] = w.input * terms["input"] + w.extra * terms["extra"] + w.sharp * terms["sharp"] + w.kl * terms["kl"]
    return terms
