"""``s2 train-vae-local`` (one process) and ``s2 eval-vae`` (reconstruction table for a checkpoint)."""

from __future__ import annotations

import json

from pipeline import config


TRAIN_HELP = {
    "shards": "shard root (local path or s3://); empty: the built-in analytic corpus",
    "resolution": "grid resolution (a multiple of 8, at least 16)", "size": "VAE size: tiny, small or paper",
    "init_from": "a vae.pt to start from (its network config replaces --size), e.g. 256³ weights for 512³",
    "steps": "optimizer steps", "time_limit_s": "stop training after this many seconds (0: run all steps)",
    "batch_size": "shapes per step", "lr": "peak learning rate", "warmup_steps": "linear learning-rate warm-up",
    "grad_clip": "clip the gradient norm to this", "holdout": "samples kept out of training for the "
    "before/after evaluation", "max_samples": "most samples read (0: all)",
    "synthetic_count": "size of the analytic corpus when no shards are given",
    "weight_input": "loss weight of the input voxels' SDF", "weight_extra": "loss weight of the voxels the "
    "decoder adds", "weight_sharp": "loss weight of voxels at sharp edges", "weight_kl": "KL loss weight",
    "eval_points": "surface samples per mesh in the evaluation", "seed": "seed of data and initialisation",
    "device": "auto, cpu or cuda", "dtype": "float32 or bfloat16 (autocast on CUDA)",
    "threads": "torch intra-op threads on the CPU (0: leave as is)", "out_dir": "folder for vae.pt and metrics",
    "log_every": "steps between log lines"}


def register(sub) -> None:
    p = sub.add_parser("train-vae-local", help="train the SS-VAE on this machine, one process (shards or the analytic corpus)")
    config.later(p, _train_arguments)
    p.set_defaults(func=_train, check=_check_train)

    e = sub.add_parser("eval-vae", help="reconstruction table (Chamfer, F1@0.005, F1@0.001, normal consistency) for a VAE checkpoint")
    e.add_argument("--checkpoint", required=True, help="path written by train-vae-local (vae.pt)")
    e.add_argument("--shards", default="", help="shard root (path or s3://); empty: the analytic corpus")
    e.add_argument("--resolution", type=int, required=True, help="grid resolution of the samples")
    e.add_argument("--limit", type=int, default=8, help="samples to evaluate (0: all)")
    e.add_argument("--points", type=int, default=100_000, help="surface samples per mesh")
    e.add_argument("--chunk", type=int, default=0, help="decode in cubes of this many latent voxels (0: whole)")
    e.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="where the VAE runs")
    e.add_argument("--seed", type=int, default=1000, help="seed of the analytic corpus (differs from training's)")
    e.add_argument("--json", default="", help="also write the rows and means to this file")
    e.set_defaults(func=_eval)


def _train_arguments(p) -> None:
    from pipeline.vae_train import VAETrainConfig

    config.add_arguments(p, VAETrainConfig, helps=TRAIN_HELP)
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def _check_train(args) -> None:
    from pipeline.vae_train import VAETrainConfig

    if getattr(args, "config", None):
        return
    config.from_args(VAETrainConfig, args).validate()


def _train(args) -> int:
    from pipeline.vae_eval import print_table
    from pipeline.vae_train import VAETrainConfig, train_vae

    cfg = config.from_args(VAETrainConfig, args)
    result = train_vae(cfg, progress=not args.no_progress)
    if result["before"]:
        print_table(result["before"], "held-out reconstruction, untrained")
        print_table(result["after"], f"held-out reconstruction after {result['steps']} steps")
    print(json.dumps({k: v for k, v in result.items() if k not in ("before", "after")}, indent=1))
    return 0


def _eval(args) -> int:
    import torch

    from pipeline.vae_eval import evaluate, print_table
    from pipeline.vae_train import VAETrainConfig, load_checkpoint, load_samples

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    model, meta = load_checkpoint(args.checkpoint, device)
    cfg = VAETrainConfig(shards=args.shards, resolution=args.resolution, max_samples=args.limit,
                         synthetic_count=args.limit or 8, seed=args.seed)
    cfg.validate()
    samples = load_samples(cfg)
    result = evaluate(model, samples, args.points, device, args.chunk or None)
    print_table(result, f"SS-VAE reconstruction, {args.checkpoint} (step {meta.get('step')}) at {args.resolution}³")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(result, fh, indent=1)
    return 0
