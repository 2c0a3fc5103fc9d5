"""``s2 eval-vae``: the reconstruction table of an SS-VAE checkpoint on shards or the analytic shapes.

The SS-VAE trains like every network, with ``s2 train vae`` (Ray Train) or ``python -m pipeline.train vae``
(one process or torchrun, no Ray); its held-out shapes are measured there (``--holdout``).
"""

from __future__ import annotations

import itertools
import json


def register(sub) -> None:
    e = sub.add_parser("eval-vae", help="reconstruction table (Chamfer, F1@0.005, F1@0.001, normal consistency) for a VAE checkpoint")
    e.add_argument("--checkpoint", required=True,
                   help="an SS-VAE checkpoint: a training checkpoint, a run folder (its newest one) or a model folder")
    e.add_argument("--shards", default="", help="shard root (path or s3://); empty: the analytic shapes")
    e.add_argument("--resolution", type=int, required=True, help="grid resolution of the samples")
    e.add_argument("--limit", type=int, default=8, help="samples to evaluate (0: all)")
    e.add_argument("--points", type=int, default=100_000, help="surface samples per mesh")
    e.add_argument("--chunk", type=int, default=0, help="decode in cubes of this many latent voxels (0: whole)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the VAE runs")
    e.add_argument("--seed", type=int, default=1000, help="seed of the analytic shapes (differs from training's)")
    e.add_argument("--json", default="", help="also write the rows and means to this file")
    e.set_defaults(func=_eval)


def samples(shards: str, resolution: int, limit: int, seed: int) -> list:
    """Shard samples at ``resolution`` (the first ``limit``; 0: all), or ``limit`` analytic shapes when no shards."""
    from pipeline.shards import read_samples, rows_to_table, samples_from_table
    from pipeline.train.synthetic import synthetic_rows

    if not shards:
        return samples_from_table(rows_to_table(synthetic_rows(limit or 8, resolution, seed=seed)))
    found = read_samples(shards, resolution=resolution, with_views=False)
    out = list(itertools.islice(found, limit) if limit else found)
    if not out:
        raise ValueError(f"{shards}: no samples at resolution {resolution}")
    return out


def load_vae(uri: str, device: str):
    """The SS-VAE of a checkpoint (EMA weights) and what it says of itself (step, resolution)."""
    from model.vae import SparseSDFVAE, VAEConfig
    from pipeline.train.checkpoints import load_weights, model_config_of

    weights = load_weights(uri, "vae")
    model = SparseSDFVAE(model_config_of(weights, VAEConfig))
    model.load_state_dict({k.removeprefix("vae."): v for k, v in weights["state_dict"].items()})
    return model.to(device), {k: weights.get(k) for k in ("source", "step", "resolution")}


def _eval(args) -> int:
    import torch

    from pipeline.vae_eval import evaluate, print_table

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    model, meta = load_vae(args.checkpoint, device)
    result = evaluate(model, samples(args.shards, args.resolution, args.limit, args.seed), args.points, device,
                      args.chunk or None)
    print_table(result, f"SS-VAE reconstruction, {meta['source']} (step {meta['step']}) at {args.resolution}³")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0
