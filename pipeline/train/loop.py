"""``train_loop_per_worker``: the one loop that trains every network, run by Ray Train on each worker.

It also runs without Ray (``run_without_ray``) under torchrun or the ``deepspeed`` launcher, for GPU
hosts that have PyTorch alone: the same loop with a local checkpoint folder and no dataset shard.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import os
import posixpath
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from kernels.sparse_conv import gather_gemm
from pipeline import shards as shard_format
from pipeline import storage
from pipeline.config import from_dict
from pipeline.train import checkpoints
from pipeline.train.config import TrainConfig
from pipeline.train.data import (EpochCache, NoTrainableShapes, Skipped, SkipGuard, iter_samples, readable_shards,
                                 shard_tables, token_batches)
from pipeline.train.engine import EMA, make_engine
from pipeline.train.holdout import HeldOutEvaluation, is_held_out
from pipeline.train.plot import CurveLog, loss_curve_png
from pipeline.train.synthetic import synthetic_rows
from pipeline.train.tasks import build_task

log = logging.getLogger(__name__)


class RaySession:
    """Where the loop gets its rank, data and checkpoint, and where it reports: Ray Train."""

    def __init__(self):
        import ray.train

        self.train = ray.train
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()

    def device(self, use_gpu: bool) -> torch.device:
        if use_gpu:
            import ray.train.torch

            return ray.train.torch.get_device()
        return torch.device("cpu")

    def batches(self):
        return self.train.get_dataset_shard("train").iter_batches(batch_size=1, batch_format="pyarrow")

    def checkpoint_dir(self):
        ckpt = self.train.get_checkpoint()
        return ckpt.as_directory() if ckpt else None

    def checkpoint_step(self) -> int | None:
        """The step of the checkpoint Ray Train hands the workers (None: none handed)."""
        ckpt = self.train.get_checkpoint()
        if ckpt is None:
            return None
        try:
            with ckpt.filesystem.open_input_stream(posixpath.join(ckpt.path, "meta.json")) as f:
                return int(json.loads(f.read())["step"])
        except (OSError, ValueError, KeyError, TypeError) as e:  # restoring it names the problem, if it has one
            log.warning("checkpoint %s handed by Ray Train: no readable step (%s)", ckpt.path, e)
            return -1

    def report(self, metrics: dict, directory: str | None) -> None:
        ckpt = self.train.Checkpoint.from_directory(directory) if directory else None
        self.train.report(metrics, checkpoint=ckpt)


class ThreadsFile:
    """``TrainConfig.threads_file``: between steps, torch's CPU threads follow the number in a local file.

    Read again only when its modification time changes (one ``stat`` a step). A missing file keeps the threads
    as they are; content that is not a positive integer is named once in the log and ignored."""

    def __init__(self, path: str):
        self.path, self.seen, self.warned = path, None, False

    def poll(self) -> int | None:
        """The thread count just applied, or None when nothing changed."""
        if not self.path:
            return None
        try:
            mtime = os.stat(self.path).st_mtime_ns
        except OSError:
            return None
        if mtime == self.seen:
            return None
        self.seen = mtime
        try:
            with open(self.path) as f:
                text = f.read().strip()
        except OSError:
            return None
        n = int(text) if text.isdigit() else 0
        if n < 1:
            if not self.warned:
                log.warning("threads_file %s: expected a positive integer, got %r; threads unchanged",
                            self.path, text[:40])
                self.warned = True
            return None
        if n == torch.get_num_threads():
            return None
        torch.set_num_threads(n)
        log.info("threads_file %s: now %d CPU threads", self.path, n)
        return n


def _mine(sample, rank: int, world: int) -> bool:
    """Each worker keeps the shapes whose id hashes to its rank (stable across epochs and restarts)."""
    return checkpoints.owner(sample.mesh_id, world) == rank


def _mean_across_ranks(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def run_loop(cfg: TrainConfig, session) -> dict:
    rank, world = session.rank, session.world
    device = session.device(cfg.use_gpu)
    dtype = torch.bfloat16 if cfg.bf16 else torch.float32
    torch.manual_seed(cfg.seed)  # identical initial weights on every rank
    frozen = checkpoints.load_weights(cfg.structure_vae, "structure_vae") if cfg.network == "structure_dit" else None
    start = checkpoints.load_weights(cfg.init_from, cfg.network) if cfg.init_from else None
    # a checkpoint folder (a converted release network) brings its own typed config: fine-tune that network
    override = start["config"] if start is not None and start.get("pretrained") else None
    task = build_task(cfg, seed=cfg.seed * 1009 + rank, frozen_weights=frozen, model_config=override).to(device)
    started_from = None
    if cfg.init_from:
        if not start.get("pretrained"):  # a folder's own config built the network: nothing to compare
            checkpoints.check_compatible(start, cfg.network, task.model_config, cfg.init_from)
        task.module.load_state_dict(start["state_dict"])
        # Digest of the weights as loaded into the module: the checkpoint records what it really started from.
        loaded = {n: p for n, p in task.module.named_parameters() if n in start["state_dict"]}
        started_from = {"checkpoint": start["source"], "step": start.get("step"), "resolution": start.get("resolution"),
                        "weights_sha256": checkpoints.weights_digest(loaded)}
        log.info("rank %d starts from %s (step %s, resolution %s)", rank, start["source"], start.get("step"),
                 start.get("resolution"))
    # the held-out evaluation compares the weights the run began from (the same on a rerun: seeded, or init_from)
    holdout = (HeldOutEvaluation(task.model_config, task.module.state_dict(), cfg.eval_points)
               if cfg.network == "vae" and cfg.holdout and rank == 0 else None)
    engine, _, _ = make_engine(task.module, cfg)
    ema = EMA(engine.module, cfg.ema_decay, warmup=not cfg.init_from)
    if cfg.init_from:
        ema.load_full_state_dict(start["state_dict"])

    step, history = 0, {"step": [], "loss": [], "tokens_per_s": [], "workers": [], "restarted_from": []}
    # names: shapes trained in this epoch by this rank; clauses: whole shares of an earlier worker count done
    position = {"epoch": 0, "consumed": 0, "names": [], "clauses": []}
    # Ray Train hands the newest checkpoint its controller recorded, which may lag behind what every rank
    # finished (or be none) when a worker was lost: continue from the newest finished one.
    restored = recovered_checkpoint(cfg, rank, device, task.model_config, after=session.checkpoint_step())
    if restored is None:
        restored = session.checkpoint_dir()
    if restored is not None:
        with restored as d:
            step = checkpoints.restore(d, engine, ema, network=cfg.network, model_config=task.model_config,
                                       resolution=cfg.resolution, world_size=world)
            written_by = json.loads(Path(d, "meta.json").read_text()).get("world_size", world)
            if written_by == world:
                position = checkpoints.restore_loop_state(d, rank, task, device) or position
            else:
                position = checkpoints.regroup_loop_state(d, written_by, rank, world, task, device) or position
                log.info("rank %d: checkpoint of %d workers continues on %d (epoch %d, %d of this rank's shapes "
                         "done)", rank, written_by, world, position["epoch"], len(position["names"]))
            prev = json.loads(Path(d, "history.json").read_text())
            history = {k: v[:step] if k != "restarted_from" else v for k, v in prev.items()}
            history["workers"] = prev.get("workers", [None] * step)[:step]
            history["restarted_from"].append(step)
        log.info("rank %d resumed at step %d (epoch %d, item %d)", rank, step, position["epoch"], position["consumed"])

    skipped = Skipped()
    name = f"{cfg.network}-{cfg.model}"
    cache = EpochCache(int(cfg.cache_gb * 2**30), seed=cfg.seed + rank)
    guard = SkipGuard(cfg.max_skipped_share, skipped, where=cfg.shards)
    curves = CurveLog(storage.join(cfg.storage, cfg.name), cfg.name, dataclasses.asdict(cfg), first_step=step + 1,
                      enabled=rank == 0)

    def trained_here(sample) -> bool:
        if is_held_out(sample.mesh_id, cfg.holdout):
            if holdout is not None:
                holdout.add(sample)
            return False
        return _mine(sample, rank, world)

    def fresh(skip: int):
        samples = (s for s in iter_samples(session.batches(), skipped, cfg.resolution, seen=guard)
                   if trained_here(s))
        return (task.prepare(s) for s in itertools.islice(samples, skip, None))

    def undone(items, counts: dict):
        """The epoch's items without those trained before a change of worker count (regroup_loop_state)."""
        done, clauses = set(position["names"]), position["clauses"]
        for pos, item in items:
            if (done or clauses) and checkpoints.is_done(item.name, done, clauses):
                counts["done"] += 1
                continue
            yield pos, item

    threads = ThreadsFile(cfg.threads_file)
    gather_gemm.GEMM_DTYPE = gather_gemm.gemm_dtype(cfg.cpu_conv_precision)  # this process's CPU convolutions
    if cfg.cpu_conv_precision != "fp32":
        log.info("CPU convolutions: %s GEMM operands (cpu_conv_precision=%s; this CPU's bfloat16 GEMMs: %s)",
                 "bfloat16" if gather_gemm.GEMM_DTYPE is not None else "float32", cfg.cpu_conv_precision,
                 gather_gemm.cpu_bf16_gemm() or "emulated")
    if cfg.cpu_dit_precision != "fp32" and getattr(task.module, "cpu_bf16", None) is not None:
        log.info("CPU DiT linear layers: %s (cpu_dit_precision=%s; this CPU's bfloat16 GEMMs: %s); attention float32",
                 "bfloat16" if task.module.cpu_bf16 else "float32", cfg.cpu_dit_precision,
                 gather_gemm.cpu_bf16_gemm() or "emulated")
    while step < cfg.steps:
        start, counts = position["consumed"], {"done": 0, "steps": 0}
        items = undone(cache.epoch(position["epoch"], fresh, start), counts)
        for group in token_batches(items, cfg.token_budget, lambda i: i[1].tokens, lambda i: i[1].name, skipped):
            threads.poll()
            t0 = time.perf_counter()
            batch = task.collate([i for _, i in group], device, dtype)
            loss, parts = engine(**batch)
            engine.backward(loss)
            engine.step()
            ema.update(step)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            dt = time.perf_counter() - t0
            step += 1
            counts["steps"] += 1
            position["consumed"] = group[-1][0] + 1
            position["names"].extend(i.name for _, i in group)
            tokens = sum(i.tokens for _, i in group)
            mean_loss, tok_s = _mean_across_ranks([float(loss.detach()), tokens / dt], device)
            history["step"].append(step)
            history["loss"].append(mean_loss)
            history["tokens_per_s"].append(tok_s)
            history["workers"].append(world)
            metrics = {"step": step, "loss": mean_loss, "tokens_per_s_per_worker": tok_s, "step_time_s": dt,
                       "tokens": tokens, "shapes": len(group), "skipped_shapes": len(skipped.shapes),
                       "lr": engine.get_lr()[0], **{k: float(v) for k, v in parts.items()}}
            if device.type == "cuda":
                metrics["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
            if rank == 0:
                log.info("%s step %d/%d loss %.4f %.0f tok/s/worker", name, step, cfg.steps, mean_loss, tok_s)
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                with tempfile.TemporaryDirectory(prefix="s2ckpt-") as tmp:
                    checkpoints.save(tmp, engine, ema, network=cfg.network, model_config=task.model_config,
                                     resolution=cfg.resolution, step=step, rank=rank, world_size=world,
                                     started_from=started_from, latent_space=task.latent_space)
                    checkpoints.save_loop_state(tmp, rank, position, task, device)
                    if step == cfg.steps and cfg.network == "vae" and cfg.holdout:
                        final = ema.full_state_dict()  # collective: every rank calls it
                        result = holdout.run(final, device) if holdout is not None else None
                        if result is not None:
                            Path(tmp, "eval.json").write_text(json.dumps(result, default=float))
                            metrics.update({f"heldout_{k}": result["after"][k] for k in
                                            ("chamfer", "f1@0.005", "f1@0.001", "normal_consistency")})
                    curves.write(metrics)
                    if rank == 0:
                        Path(tmp, "history.json").write_text(json.dumps(history))
                        if step == cfg.steps:
                            loss_curve_png(history["step"], history["loss"], os.path.join(tmp, "loss_curve.png"),
                                           title=f"{name} loss")
                    checkpoints.write_manifest(tmp, rank, step)  # last: names every file above
                    session.report(metrics, tmp)
            elif step % cfg.report_every == 0:
                curves.write(metrics)
                session.report(metrics, None)
            if step >= cfg.steps:
                break
        if step >= cfg.steps:
            break
        guard.check()
        if not counts["steps"] and not counts["done"] and start == 0:
            raise NoTrainableShapes(f"{cfg.shards}: worker {rank} got no trainable shapes "
                                    f"({len(skipped.shapes)} skipped; first: {skipped.shapes[:1]})")
        position = {"epoch": position["epoch"] + 1, "consumed": 0, "names": [], "clauses": []}
    curves.close()
    return {"step": step, "skipped_shapes": skipped.shapes, "history": history}


def complete_checkpoints(fs, run_path: str) -> list[str]:
    """Paths (on ``fs``) of the checkpoints in a run folder that hold meta.json, sorted by name (the launcher's
    names carry the zero-padded step, Ray Train's the time)."""
    return sorted(posixpath.dirname(m) for m in fs.glob(posixpath.join(run_path, "checkpoint_*", "meta.json")))


def newest_finished(cfg: TrainConfig, model_config) -> tuple[str | None, int | None, list[str]]:
    """(URI and step of the newest checkpoint of the run folder that every rank finished and this run can
    continue, or None, None; every checkpoint folder with meta.json found). Never raises: best effort."""
    try:
        run_uri = storage.join(cfg.storage, cfg.name)
        fs, path = storage.filesystem(run_uri)
        found = complete_checkpoints(fs, path)
        candidates = []
        for folder in found:
            meta = checkpoints.finished_meta(fs, folder)
            if meta is None:
                continue
            try:
                checkpoints.check_compatible(meta, cfg.network, model_config, folder)
                checkpoints.check_resumable(meta, folder, network=cfg.network, resolution=cfg.resolution,
                                            world_size=int(meta["world_size"]))
            except checkpoints.CheckpointMismatch as e:
                log.warning("run %s: not resuming %s: %s", cfg.name, posixpath.basename(folder), e)
                continue
            candidates.append((int(meta["step"]), folder))
    except Exception as e:  # storage unreachable: the run starts, and says so
        log.warning("run %s: could not list its checkpoints (%s: %s)", cfg.name, type(e).__name__, e)
        return None, None, []
    if not candidates:
        return None, None, found
    step, best = max(candidates)
    return storage.join(run_uri, posixpath.relpath(best, path)), step, found


def recovered_checkpoint(cfg: TrainConfig, rank: int, device, model_config, after: int | None):
    """Collective. The newest checkpoint of the run folder that every rank finished, if it is newer than the
    one the session hands the workers (step ``after``; None: it hands none). Ray Train hands the newest one
    its controller recorded, which can lag behind the run folder or be none at all when a worker is lost
    first: redoing those steps, or the whole run, is not needed. Rank 0 picks, every rank opens the same.
    A context manager yielding a local folder, or None (nothing newer: the session's own, if any)."""
    choice = [None]
    if rank == 0:
        uri, step, found = newest_finished(cfg, model_config)
        if uri is not None and (after is None or step > after):
            choice = [uri]
            handed = "no checkpoint" if after is None else f"the checkpoint of step {after}"
            log.warning("run %s: Ray Train handed the workers %s; resuming from %s (step %d), the newest one every "
                        "rank finished", cfg.name, handed, uri, step)
        elif uri is None and after is None and found:
            log.warning("run %s: no checkpoint handed to the workers and none of the %d in its folder finished by "
                        "every rank (the last by name: %s); training starts again from step 0", cfg.name,
                        len(found), posixpath.basename(found[-1]))
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(choice, src=0, device=device if device.type == "cuda" else None)
    if choice[0] is None:
        return None
    fs, path = storage.filesystem(choice[0])
    return _downloaded(fs, path) if storage.is_remote(choice[0]) else contextlib.nullcontext(path)


def train_loop_per_worker(config: dict) -> None:
    """Entry point for Ray Train's TorchTrainer; ``config`` is a TrainConfig as a dict."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    run_loop(from_dict(TrainConfig, config, where="train config"), RaySession())


class LocalSession:
    """torchrun / deepspeed launcher: rank from the environment, shards read directly, checkpoints in a folder.

    Checkpoints go to ``<storage>/<name>/checkpoint_<step>`` on a local path or ``s3://`` (endpoint and
    credentials as for every URI of the project: ``pipeline.storage``). Every rank uploads its own files;
    ``meta.json`` goes last, after a barrier, so a checkpoint without it is incomplete and never resumed.
    """

    def __init__(self, cfg: TrainConfig):
        if not dist.is_initialized():
            backend = "nccl" if cfg.use_gpu else "gloo"
            dist.init_process_group(backend)
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.cfg = cfg
        self.run_uri = storage.join(cfg.storage, cfg.name)
        self.fs, self.run_path = storage.filesystem(self.run_uri)
        if self.rank == 0:
            self.fs.makedirs(self.run_path, exist_ok=True)  # on S3: creates the bucket if it is missing

    def device(self, use_gpu: bool) -> torch.device:
        if use_gpu:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            return torch.device("cuda", local)
        return torch.device("cpu")

    def batches(self):
        if self.cfg.shards == "synthetic":
            yield shard_format.rows_to_table(synthetic_rows(self.cfg.synthetic_shapes, self.cfg.resolution,
                                                            seed=self.cfg.seed))
            return
        good, bad = readable_shards(self.cfg.shards, self.cfg.resolution)
        for line in bad:
            log.warning("skipping shard %s", line)
        for uri in good:
            yield from shard_tables(uri)

    def complete_checkpoints(self) -> list[str]:
        """Paths (on ``self.fs``) of this run's checkpoints that hold meta.json, oldest first."""
        return complete_checkpoints(self.fs, self.run_path)

    def checkpoint_step(self) -> int | None:
        """The step of the checkpoint ``checkpoint_dir`` opens (None: the run folder holds none)."""
        complete = self.complete_checkpoints()
        return int(json.loads(self.fs.cat_file(posixpath.join(complete[-1], "meta.json")))["step"]) if complete else None

    def checkpoint_dir(self):
        complete = self.complete_checkpoints()
        if not complete:
            return None
        if not storage.is_remote(self.run_uri):
            return contextlib.nullcontext(complete[-1])
        return _downloaded(self.fs, complete[-1])

    def report(self, metrics: dict, directory: str | None) -> None:
        if directory:
            target = posixpath.join(self.run_path, f"checkpoint_{metrics['step']:08d}")
            files = sorted(p for p in Path(directory).rglob("*") if p.is_file())
            for f in files:  # each rank adds its own files
                if f.name != "meta.json":
                    self._put(f, posixpath.join(target, f.relative_to(directory).as_posix()))
            dist.barrier()
            if self.rank == 0:
                self._put(Path(directory, "meta.json"), posixpath.join(target, "meta.json"))
                for old in self.complete_checkpoints()[:-self.cfg.keep_checkpoints]:
                    self.fs.rm(old, recursive=True)
            dist.barrier()
        if self.rank == 0:
            print(json.dumps(metrics), flush=True)

    def _put(self, local: Path, path: str) -> None:
        if not storage.is_remote(self.run_uri):
            self.fs.makedirs(posixpath.dirname(path), exist_ok=True)
        self.fs.put_file(str(local), path)


@contextlib.contextmanager
def _downloaded(fs, path: str):
    """A remote checkpoint copied into a temporary local folder for DeepSpeed to read."""
    with tempfile.TemporaryDirectory(prefix="s2ckpt-") as tmp:
        for remote in fs.find(path):
            local = Path(tmp, posixpath.relpath(remote, path))
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(remote, str(local))
        yield tmp


def worker_env(cfg: TrainConfig) -> dict:
    """Environment of the training workers: DeepSpeed's accelerator and where the S3 store is.

    No DeepSpeed op is compiled at run time (``engine.skip_shm_op``), so no build folder or lock is
    shared between runs; nothing here touches another run's files.
    """
    env = {}
    # Where the S3-compatible store is (not a secret): workers read init_from / structure_vae URIs there too.
    for key in ("AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION"):
        if os.environ.get(key):
            env[key] = os.environ[key]
    if not cfg.use_gpu:
        env["DS_ACCELERATOR"] = "cpu"  # else DeepSpeed probes for CUDA and fails on CPU-only nodes
    return env


def run_without_ray(cfg: TrainConfig) -> dict:
    """Run the loop under torchrun / the deepspeed launcher (env:// rendezvous) without Ray."""
    storage.check_writable(cfg.storage, what="storage")  # before the process group and any work
    for key, value in worker_env(cfg).items():  # as Ray Train's workers get them; the launcher's env wins
        os.environ.setdefault(key, value)
    if "RANK" not in os.environ and "WORLD_SIZE" not in os.environ:
        # started as a plain `python -m pipeline.train`: one process, its own rendezvous on a free port
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)})
    return run_loop(cfg, LocalSession(cfg))
