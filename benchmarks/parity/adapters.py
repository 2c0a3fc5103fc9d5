"""Our side of each parity stage: the converted module and the call that mirrors the release's.

Each function takes our module (from ``convert``) and the stage's inputs in the release's convention
(coords [N, 4] int32 of (batch, x, y, z), timesteps on the 0..1000 scale, ...) and returns a tensor laid
out as the release's output, or (coords, feats) for sparse outputs, which the runner sorts before comparing.
"""
from __future__ import annotations

import importlib

import torch


class NotBuilt(Exception):
    """Our module for a stage does not exist yet (missing file, class or converter entry)."""


def convert(section: str, params: dict, state: dict, target: str, dtype: torch.dtype, device) -> torch.nn.Module:
    """Our module from a released section through model/official.py's convert_module (strict, eval mode)."""
    try:
        official = importlib.import_module("model.official")
        convert_module = official.convert_module
    except (ImportError, AttributeError) as e:
        raise NotBuilt(f"model.official.convert_module: {e}") from None
    try:
        module = convert_module(section, params, state, target=target)
    except ModuleNotFoundError as e:
        raise NotBuilt(str(e)) from None
    except ValueError as e:  # the converter's OfficialError: an unknown class is "not built"
        if "not one this converter knows" in str(e) or "unknown network" in str(e):
            raise NotBuilt(str(e)) from None
        raise
    return module.to(device=device, dtype=dtype).eval()


def _sparse(coords: torch.Tensor, feats: torch.Tensor, resolution: int):
    from model.sparse.tensor import SparseTensor
    return SparseTensor.from_unsorted(coords.int(), feats, resolution)


def _cu_seqlens(coords: torch.Tensor) -> torch.Tensor:
    counts = torch.bincount(coords[:, 0].long())
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


# -- dense structure stage ------------------------------------------------------------------------------


def dense_vae_encode(ours, occ: torch.Tensor) -> torch.Tensor:
    _, mean, logvar = ours.encode(occ, sample=False)
    return torch.cat([mean, logvar], dim=1)


def dense_vae_decode(ours, z: torch.Tensor) -> torch.Tensor:
    return ours.decode(z)


def dense_dit(ours, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    return ours(x, t / 1000.0, cond)


# -- sparse stage ---------------------------------------------------------------------------------------


def ss_vae_encode(ours, coords: torch.Tensor, sdf: torch.Tensor, resolution: int):
    z, mean, logvar = ours.encode(_sparse(coords, sdf, resolution), sample=False)
    return z.coords, torch.cat([mean, logvar], dim=1)


def ss_vae_decode(ours, coords: torch.Tensor, z: torch.Tensor, resolution: int):
    out = ours.decode(_sparse(coords, z, resolution))
    return out.coords, out.feats


def ss_dit(ours, coords: torch.Tensor, x: torch.Tensor, t: torch.Tensor, cond, cond_coords=None):
    """coords in the release's token order (block-sorted per shape); output rows in that order."""
    from model.sparse.tensor import SparseTensor

    tokens = SparseTensor.packed(coords[:, 1:].to(x.device), x, _cu_seqlens(coords).to(x.device))
    if cond_coords is not None:
        from model.dit import PackedCondition
        cond = PackedCondition(cond, cond_coords[:, 1:].to(x.device), _cu_seqlens(cond_coords).to(x.device))
    return ours(tokens, t / 1000.0, cond).feats


def ssa_layer(ours_dit, layer: int, coords: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The self-attention of block ``layer`` of our converted SS-DiT, on tokens in the release's order."""
    from model.sparse.tensor import SparseTensor

    attn = ours_dit.blocks[layer].self_attn
    return attn(SparseTensor.packed(coords[:, 1:].to(x.device), x, _cu_seqlens(coords).to(x.device))).feats


# -- refiners -------------------------------------------------------------------------------------------


def refiner_patch(ours, sdf: torch.Tensor, feats: torch.Tensor | None) -> torch.Tensor:
    """One patch of the refiner: (sdf [B, 1, P, P, P], decoder features [B, 32, P, P, P]) -> output."""
    fn = getattr(ours, "forward_patch", None) or ours
    return fn(sdf, feats) if feats is not None else fn(sdf)
