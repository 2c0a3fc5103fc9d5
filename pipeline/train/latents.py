"""A VAE's latent scale: statistics of a trained VAE's latents over the shards, kept in its checkpoint.

A rectified flow starts from unit Gaussian noise, so a DiT should model latents of unit spread: with
latents of standard deviation σ ≠ 1 the same velocity error moves a sample by a different share of its
signal, and the decoder sees it. The release stores ``latents_scale`` / ``latents_shift`` in the configs
of its SS-VAE and of its dense structure VAE; a VAE trained here gets them from its own latents:

    python -m pipeline.train.latents RUN_OR_CHECKPOINT --shards data/dataset --resolution 64 --out DIR
    python -m pipeline.train.latents STRUCTURE_VAE_RUN --network structure_vae --shards ... --out DIR

writes DIR (weights.pt + model/, a checkpoint like the trainer's) with scale 1/σ and shift μ over the
posterior means of up to ``--max-shapes`` shapes (the SS-VAE's sparse latents, or the structure VAE's
16³×8 latent of each shape's 64³ occupancy); the DiT trains on it (``--latent DIR``, ``--structure-vae
DIR``) and the generation cascade decodes with it (``vae: DIR``, ``structure_vae: DIR``).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch


def _sparse_posterior_mean(vae, s) -> torch.Tensor:
    from model.sparse import SparseTensor

    c4 = torch.cat([torch.zeros_like(s.coords[:, :1]), s.coords], 1).int()
    x = SparseTensor.from_unsorted(c4, s.values.float().reshape(-1, 1), s.resolution, 1)
    return vae.encode(x, sample=False)[1]


def _structure_posterior_mean(vae, s) -> torch.Tensor:
    from model.structure import occupancy_grid

    return vae.encode(occupancy_grid(s.coords, s.resolution)[None, None].float())[1]


# network -> (config class, module class, posterior mean of one sample): imported when used
def _networks() -> dict:
    from model.structure import StructureVAE, StructureVAEConfig
    from model.vae import SparseSDFVAE, VAEConfig

    return {"vae": (VAEConfig, SparseSDFVAE, _sparse_posterior_mean),
            "structure_vae": (StructureVAEConfig, StructureVAE, _structure_posterior_mean)}


@torch.no_grad()
def latent_statistics(vae, samples, max_shapes: int = 64, posterior_mean=_sparse_posterior_mean) -> dict:
    """Mean and standard deviation over every channel of the posterior means of ``samples``."""
    total, sq, count, shapes = 0.0, 0.0, 0, 0
    for s in samples:
        if shapes >= max_shapes:
            break
        m = posterior_mean(vae, s).double()
        total, sq, count, shapes = total + float(m.sum()), sq + float((m * m).sum()), count + m.numel(), shapes + 1
    if count == 0:
        raise ValueError("latent statistics: no shapes to encode")
    mu = total / count
    std = max(sq / count - mu * mu, 0.0) ** 0.5
    if std < 1e-6:
        raise ValueError(f"latent statistics: the latents are constant (std {std:.2e}); is the VAE trained?")
    return {"mean": mu, "std": std, "shapes": shapes, "values": count}


def calibrate(checkpoint: str, shards: str, resolution: int, out: str, max_shapes: int = 64,
              network: str = "vae") -> dict:
    """Copy a VAE training checkpoint (``network`` vae or structure_vae) to ``out`` with latents_scale = 1/σ
    and latents_shift = μ."""
    from pipeline.shards import read_samples
    from pipeline.train.checkpoints import export_folder, load_weights, model_config_of

    if network not in _networks():
        raise ValueError(f"network {network!r}: expected one of {sorted(_networks())}")
    config_cls, module_cls, posterior_mean = _networks()[network]
    weights = load_weights(checkpoint, network)
    cfg = dataclasses.replace(model_config_of(weights, config_cls), latents_scale=1.0, latents_shift=0.0)
    vae = module_cls(cfg).eval()
    vae.load_state_dict({k.removeprefix("vae."): v for k, v in weights["state_dict"].items()})
    stats = latent_statistics(vae, read_samples(shards, resolution=resolution, with_views=False), max_shapes,
                              posterior_mean)
    cfg = dataclasses.replace(cfg, latents_scale=1.0 / stats["std"], latents_shift=stats["mean"])
    meta = {"network": network, "model_config": repr(cfg), "resolution": weights.get("resolution", resolution),
            "step": weights.get("step"), "started_from": {"source": weights["source"]}, "latent_statistics": stats}
    blob = {**{k: v for k, v in weights.items() if k != "source"}, **meta}
    if network == "vae":  # the SS-VAE's own layout, which the generation cascade also reads
        blob["vae_config"] = dataclasses.asdict(cfg)
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, ".weights.pt.tmp")
    torch.save(blob, tmp)
    os.replace(tmp, os.path.join(out, "weights.pt"))
    with open(os.path.join(out, "meta.json"), "w") as f:
        json.dump(meta, f)
    export_folder(os.path.join(out, "model"), network, cfg, weights["state_dict"], meta)
    return stats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipeline.train.latents", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", help="VAE training checkpoint or run folder")
    p.add_argument("--network", choices=("vae", "structure_vae"), default="vae",
                   help="the SS-VAE (sparse latents) or the dense structure VAE (16³×8 latent)")
    p.add_argument("--shards", required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--out", required=True, help="folder for the calibrated checkpoint")
    p.add_argument("--max-shapes", type=int, default=64)
    args = p.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    try:
        stats = calibrate(args.checkpoint, args.shards, args.resolution, args.out, args.max_shapes, args.network)
    except (ValueError, FileNotFoundError) as e:
        print(f"latents: {e}", file=sys.stderr)
        return 2
    print(f"latent mean {stats['mean']:.4f}, std {stats['std']:.4f} over {stats['shapes']} shapes: "
          f"latents_scale {1 / stats['std']:.4f}, latents_shift {stats['mean']:.4f} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
