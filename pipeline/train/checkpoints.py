"""Checkpoint layout: DeepSpeed state (every rank's shard), EMA weights and a meta file naming the model.

    <ckpt>/meta.json      network, model config, step
    <ckpt>/weights.pt     EMA weights of the whole model, network, model config repr, step (rank 0; plain
                          data, loadable with weights_only=True): what sampling and the next stage load
    <ckpt>/state/...      DeepSpeed's engine, optimizer and scheduler state (one file per rank for ZeRO)

Ray Train uploads the directory of every worker into the same checkpoint, so the DeepSpeed shards of all
ranks end up side by side; a restarted worker group restores from ``ray.train.get_checkpoint()``.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

TAG = "state"


class CheckpointMismatch(ValueError):
    """A checkpoint of another network or model size."""


def describe(network: str, model_config) -> dict:
    return {"network": network, "model_config": repr(model_config)}


def check_compatible(meta: dict, network: str, model_config, where: str) -> None:
    want = describe(network, model_config)
    for key in ("network", "model_config"):
        if meta.get(key) != want[key]:
            raise CheckpointMismatch(f"{where}: checkpoint is for {key} {meta.get(key)!r}, this run trains {want[key]!r}")


def save(directory: str, engine, ema, *, network: str, model_config, step: int, rank: int) -> None:
    """Collective: every rank calls it with its own local ``directory``."""
    engine.save_checkpoint(directory, tag=TAG, client_state={"step": step}, save_latest=False)
    ema_full = ema.full_state_dict()
    if rank == 0:
        meta = {**describe(network, model_config), "step": step}
        blob = {"state_dict": ema_full, **meta}  # plain data only: readers load it with weights_only=True
        if network == "vae":  # also in the SS-VAE's own checkpoint layout, which the generation cascade reads
            import dataclasses

            blob["vae_config"] = dataclasses.asdict(model_config)
            blob["model"] = {k.removeprefix("vae."): v for k, v in ema_full.items()}
        torch.save(blob, os.path.join(directory, "weights.pt"))
        Path(directory, "meta.json").write_text(json.dumps(meta))


def restore(directory: str, engine, ema, *, network: str, model_config) -> int:
    """Load engine + EMA state from a checkpoint directory; returns the step it was taken at."""
    meta_path = Path(directory, "meta.json")
    if not meta_path.exists():
        raise CheckpointMismatch(f"{directory}: not a training checkpoint (no meta.json)")
    meta = json.loads(meta_path.read_text())
    check_compatible(meta, network, model_config, directory)
    _, client = engine.load_checkpoint(directory, tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    weights = torch.load(os.path.join(directory, "weights.pt"), map_location="cpu", weights_only=True)
    ema.load_full_state_dict(weights["state_dict"])
    return int(client["step"]) if client else int(meta["step"])


def load_weights(uri: str, network: str | None = None) -> dict:
    """EMA weights of a checkpoint (local path or s3:// URI) for sampling or as the next stage's start."""
    from pipeline import storage

    fs, path = storage.filesystem(uri.rstrip("/") + "/weights.pt")
    if not fs.exists(path):
        raise CheckpointMismatch(f"{uri}: no weights.pt; not a checkpoint of this trainer")
    with fs.open(path, "rb") as f:
        weights = torch.load(f, map_location="cpu", weights_only=True)
    if network is not None and weights.get("network") != network:
        raise CheckpointMismatch(f"{uri}: checkpoint is for network {weights.get('network')!r}, expected {network!r}")
    return weights


def model_config_of(weights: dict, cls: type):
    """The model config a checkpoint was trained with, rebuilt from its repr (literal values only)."""
    from model.cascade import parse_config_repr

    return parse_config_repr(str(weights.get("model_config")), cls, "checkpoint")
