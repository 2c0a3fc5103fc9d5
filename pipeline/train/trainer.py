"""Ray Train's TorchTrainer around ``train_loop_per_worker``, and the resolution curriculum."""
from __future__ import annotations

import dataclasses
import logging
import os

from pyarrow.fs import FSSpecHandler, PyFileSystem

from pipeline import storage
from pipeline.train import checkpoints
from pipeline.train.config import TrainConfig
from pipeline.train.data import build_dataset
from pipeline.train.loop import train_loop_per_worker, worker_env

log = logging.getLogger(__name__)


def run_storage(uri: str, storage_options: dict | None = None):
    """(storage_path, storage_filesystem) for Ray Train's RunConfig from the job's ``storage`` URI.

    A remote URI goes through the project's own fsspec filesystem (``pipeline.storage``), so Ray Train
    finds a custom S3 endpoint (MinIO, moto, any S3-compatible store) and credentials exactly where the
    rest of the project does: ``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ... or ``storage_options``.
    """
    if not storage.is_remote(uri):
        return uri, None  # absolute already (absolute_paths)
    fs, path = storage.filesystem(uri, storage_options)
    return path.rstrip("/"), PyFileSystem(FSSpecHandler(fs))


def check_rerun(cfg: TrainConfig, storage_options: dict | None = None) -> str | None:
    """On the driver: the run's newest checkpoint, refused if this config cannot resume it.

    Workers check it too, but a refusal there costs ``max_failures`` restarts of the worker group first.
    """
    try:
        folder = checkpoints.resolve(storage.join(cfg.storage, cfg.name), storage_options)
    except (checkpoints.CheckpointMismatch, FileNotFoundError):
        return None  # a new run
    checkpoints.check_resumable(checkpoints.read_meta(folder, storage_options), folder, network=cfg.network,
                                resolution=cfg.resolution, world_size=cfg.num_workers)
    return folder


def absolute_paths(cfg: TrainConfig) -> TrainConfig:
    """Local paths of the job made absolute on the driver: Ray Train's workers run in another directory."""
    keys = ("storage", "shards", "init_from", "structure_vae", "latent")
    special = {"synthetic", "pooled"}
    return dataclasses.replace(cfg, **{k: os.path.abspath(os.path.expanduser(v.removeprefix("file://")))
                                       for k in keys if (v := getattr(cfg, k)) and v not in special
                                       and not storage.is_remote(v)})


def run(cfg: TrainConfig, storage_options: dict | None = None):
    """Train ``cfg.network``; returns Ray Train's Result (metrics, checkpoint, path). Rerunning a name resumes it."""
    cfg = absolute_paths(cfg)
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    storage.check_writable(cfg.storage, storage_options, what="storage")  # before any other work
    resumes = check_rerun(cfg, storage_options)
    if resumes:
        log.info("%s: resuming from %s", cfg.name, resumes)
    env = worker_env(cfg)
    if not ray.is_initialized():
        from pipeline.commands.cluster import connect

        connect(start_if_none=True, runtime_env={"env_vars": env})
    dataset, skipped = build_dataset(cfg.shards, cfg.resolution, synthetic_shapes=cfg.synthetic_shapes,
                                     seed=cfg.seed, storage_options=storage_options)
    if skipped.shards:
        log.warning("%d shard(s) skipped: %s", len(skipped.shards), "; ".join(skipped.shards))
    storage_path, storage_fs = run_storage(cfg.storage, storage_options)
    resources = {"CPU": cfg.cpus_per_worker} if not cfg.use_gpu else {"CPU": cfg.cpus_per_worker, "GPU": 1}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=dataclasses.asdict(cfg),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=(cfg.min_workers, cfg.num_workers) if cfg.elastic else cfg.num_workers,
                                     use_gpu=cfg.use_gpu, resources_per_worker=resources,
                                     elastic_resize_monitor_interval_s=cfg.resize_check_s),
        run_config=RunConfig(name=cfg.name, storage_path=storage_path, storage_filesystem=storage_fs,
                             failure_config=FailureConfig(max_failures=cfg.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
                             worker_runtime_env={"env_vars": env}),
        datasets={"train": dataset},
        # Every worker reads the rows and keeps its hash share: token-budget batches differ in count per
        # worker, and a streaming split would make the workers wait on each other at epoch ends.
        dataset_config=DataConfig(datasets_to_split=[]),
    )
    result = trainer.fit()
    result.skipped_shards = skipped.shards
    return result


def curriculum_configs(cfg: TrainConfig) -> list[TrainConfig]:
    """One config per resolution of ``cfg.curriculum``; stage i starts from stage i-1's final checkpoint.

    Stage names are ``<name>-<resolution>``; the last stage's checkpoint is found at run time, so a stage
    that was already finished is resumed (and does no work) rather than repeated.
    """
    resolutions = [int(r) for r in cfg.curriculum.split(",") if r.strip()]
    return [dataclasses.replace(cfg, resolution=r, name=f"{cfg.name}-{r}", curriculum="") for r in resolutions]


def run_curriculum(cfg: TrainConfig, storage_options: dict | None = None) -> list:
    cfg = absolute_paths(cfg)
    results, previous = [], cfg.init_from
    for stage in curriculum_configs(cfg):
        stage = dataclasses.replace(stage, init_from=previous)
        log.info("curriculum stage %s at %d³ from %s", stage.name, stage.resolution, previous or "scratch")
        result = run(stage, storage_options)
        results.append(result)
        if result.checkpoint is None:
            raise RuntimeError(f"curriculum stage {stage.name} ended without a checkpoint; later stages need one")
        # The stage's run folder, as a job spec of the next stage names it: init_from takes its newest checkpoint.
        previous = storage.join(stage.storage, stage.name)
    return results
