"""``s2 train {dit,structure-vae,structure-dit,vae}``: one training job on the current Ray cluster.

Every flag is a field of ``pipeline.train.config.TrainConfig``; ``--no-ray`` runs the same loop under
torchrun or the ``deepspeed`` launcher on hosts that have PyTorch alone.
"""
from __future__ import annotations

import json
import sys

from pipeline import config

NETWORKS = {"dit": "SS-DiT on sparse latents", "structure-vae": "64³ occupancy VAE of the dense structure stage",
            "structure-dit": "DiT over the structure VAE's 16³×8 latent", "vae": "sparse SDF VAE (SS-VAE)"}


def register(sub) -> None:
    p = sub.add_parser("train", help="train a network of the cascade (Ray Train + DeepSpeed ZeRO)")
    nets = p.add_subparsers(dest="network_command", metavar="NETWORK")
    for name, what in NETWORKS.items():
        n = nets.add_parser(name, help=what, description=f"Train the {what}.")
        config.later(n, lambda n, name=name: _arguments(n, name.replace("-", "_")))
        n.set_defaults(func=_run, check=_check, network_name=name.replace("-", "_"))
    p.set_defaults(func=lambda args: p.print_help() or 2)


def _arguments(n, network: str) -> None:
    """The TrainConfig fields that ``network`` reads (a field's metadata "networks"; default: all)."""
    import argparse

    from pipeline.train.config import TrainConfig

    config.add_arguments(n, TrainConfig, include=lambda f: f.name != "network" and network in f.metadata.get(
        "networks", (network,)))
    n.add_argument("--network", default=None, help=argparse.SUPPRESS)  # older job specs name it; must agree
    n.add_argument("--no-ray", action="store_true",
                   help="run under torchrun / the deepspeed launcher instead of Ray Train")


def _config(args):
    from pipeline.config import ConfigError
    from pipeline.train.config import TrainConfig

    if args.network is not None and args.network != args.network_name:
        raise ConfigError(f"--network {args.network} contradicts the subcommand 'train {args.network_command}'")
    args.network = args.network_name
    return config.from_args(TrainConfig, args)


def _check(args) -> None:
    _config(args)


def _run(args) -> int:
    import dataclasses

    cfg = _config(args)
    if args.no_ray:
        from pipeline.train.loop import run_without_ray

        out = run_without_ray(cfg)
        print(json.dumps({"step": out["step"], "final_loss": out["history"]["loss"][-1:],
                          "skipped_shapes": len(out["skipped_shapes"])}))
        return 0
    from pipeline.train import trainer

    try:
        results = (trainer.run_curriculum(cfg) if cfg.curriculum else [trainer.run(cfg)])
    except Exception as e:  # noqa: BLE001 - Ray Train wraps a worker's error in its own; name ours in one line
        line = bad_input_line(e)
        if line is None:
            raise
        print(f"s2 train: {line}", file=sys.stderr)
        return 1
    _summary(cfg, results, dataclasses)
    return 0


# Errors of ours that mean bad input (data, checkpoint, config), not a bug: one line, no traceback.
BAD_INPUT = ("TooManySkipped", "UnsafeCheckpoint", "CheckpointMismatch", "NoTrainableShapes", "ShardError", "BadRow")


def bad_input_line(e: BaseException) -> str | None:
    """The first 'Name: message' line of one of ``BAD_INPUT`` in an exception or the errors it wraps."""
    import re

    seen, stack = set(), [e]
    while stack:
        exc = stack.pop()
        if exc is None or id(exc) in seen:
            continue
        seen.add(id(exc))
        if type(exc).__name__ in BAD_INPUT:
            return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0]}"
        found = re.search(rf"\b({'|'.join(BAD_INPUT)}): ([^\n]+)", str(exc))
        if found:
            return f"{found.group(1)}: {found.group(2).strip()}"
        stack += [exc.__cause__, exc.__context__]
    return None


def _summary(cfg, results, dataclasses) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"s2 train {cfg.network}")
    for col in ("run", "steps", "final loss", "tokens/s/worker", "checkpoint", "skipped shards"):
        table.add_column(col)
    for r in results:
        m = r.metrics or {}
        table.add_row(str(r.path).rsplit("/", 1)[-1], str(m.get("step", "-")), f"{m.get('loss', float('nan')):.4f}",
                      f"{m.get('tokens_per_s_per_worker', 0):.0f}", str(r.checkpoint.path if r.checkpoint else "-"),
                      str(len(getattr(r, "skipped_shards", []))))
    Console().print(table)
