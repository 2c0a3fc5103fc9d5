"""Checkpoint layout: DeepSpeed state (every rank's shard), EMA weights and a meta file naming the model.

    <ckpt>/meta.json      network, model config, grid resolution, step, the weights the run started from
    <ckpt>/weights.pt     EMA weights of the whole model, network, model config repr, resolution, step (rank 0;
                          plain data, loadable with weights_only=True): what sampling and the next stage load
    <ckpt>/state/...      DeepSpeed's engine, optimizer and scheduler state (one file per rank for ZeRO)
    <ckpt>/loop-rank<r>.pt where rank r's data stands (epoch, items consumed) and its random generators
    <ckpt>/files-rank<r>.json every file rank r wrote into the checkpoint, with its size (``write_manifest``)

Ray Train uploads the directory of every worker into the same checkpoint, so the DeepSpeed shards of all
ranks end up side by side; a restarted worker group restores from the newest checkpoint whose every rank's
manifest and files are there (``finished_meta``), which is ``ray.train.get_checkpoint()`` unless Ray Train's
record lags behind the run folder or holds none (a worker lost before the controller recorded them).

Nothing read here can run code: every ``.pt`` file, DeepSpeed's own included, is unpickled with
``weights_only=True`` and only the few DeepSpeed classes its state holds (``SAFE_GLOBALS``) allowed
besides tensors and plain data. A file that names anything else fails with ``UnsafeCheckpoint``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import posixpath
from pathlib import Path

import torch

from model.cascade import parse_config_repr
from model.checkpoint import CheckpointError, from_pretrained, save_pretrained
from pipeline import storage
from pipeline.train.reshard import load_resharded
# the errors and the safe reader, where every reader of checkpoints finds them
from pipeline.train.safe_load import CheckpointMismatch, UnsafeCheckpoint, safe_load  # noqa: F401

TAG = "state"
RESHARDABLE = (0, 1, 2, 3)  # ZeRO stages whose checkpoints resume on another number of workers


def guard_engine(engine) -> None:
    """Make DeepSpeed read its checkpoint files through ``safe_load`` (it unpickles with weights_only=False).

    ``load_checkpoint`` reads every model, optimizer and ZeRO partition file through the engine's
    checkpoint engine; swapping that one method covers all of them for ZeRO stages 0-3.
    """
    engine.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, str(path), map_location or "cpu")


def describe(network: str, model_config) -> dict:
    return {"network": network, "model_config": repr(model_config)}


def check_compatible(meta: dict, network: str, model_config, where: str) -> None:
    want = describe(network, model_config)
    for key in ("network", "model_config"):
        if meta.get(key) != want[key]:
            raise CheckpointMismatch(f"{where}: checkpoint is for {key} {meta.get(key)!r}, this run trains {want[key]!r}")


def weights_digest(state_dict: dict) -> str:
    """SHA-256 of named fp32 tensors: which weights a run started from, comparable across files."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().float().contiguous().cpu()
        h.update(f"{name}:{tuple(t.shape)}:".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def save(directory: str, engine, ema, *, network: str, model_config, resolution: int, step: int, rank: int,
         world_size: int, started_from: dict | None = None, latent_space: str | None = None) -> None:
    """Collective: every rank calls it with its own local ``directory``.

    ``resolution`` is the grid the network was trained at (the generation cascade refuses a DiT used at
    another one); ``started_from`` names the checkpoint whose weights began the run (``init_from``).
    """
    engine.save_checkpoint(directory, tag=TAG, client_state={"step": step}, save_latest=False)
    # the EMA covers the trained parameters; persistent buffers (a DiT's position table) complete the state
    ema_full = {**persistent_buffers(engine.module), **ema.full_state_dict()}
    if rank == 0:
        meta = {**describe(network, model_config), "resolution": resolution, "step": step, "world_size": world_size,
                "zero_stage": engine.zero_optimization_stage(), "started_from": started_from}
        blob = {"state_dict": ema_full, **meta}  # plain data only: readers load it with weights_only=True
        if network == "vae":  # also in the SS-VAE's own checkpoint layout, which the generation cascade reads
            blob["vae_config"] = dataclasses.asdict(model_config)
            blob["model"] = {k.removeprefix("vae."): v for k, v in ema_full.items()}
        if latent_space:
            blob["latent_space"] = meta["latent_space"] = latent_space
        torch.save(blob, os.path.join(directory, "weights.pt"))
        Path(directory, "meta.json").write_text(json.dumps(meta))
        export_folder(os.path.join(directory, "model"), network, model_config, ema_full, meta)


def persistent_buffers(module: torch.nn.Module) -> dict:
    """The buffers a state dict holds (not the non-persistent ones), as CPU copies; never partitioned by ZeRO."""
    out = {}
    for prefix, mod in module.named_modules():
        for name, buf in mod.named_buffers(recurse=False):
            if buf is not None and name not in mod._non_persistent_buffers_set:
                out[f"{prefix}.{name}" if prefix else name] = buf.detach().to("cpu", copy=True)
    return out


def export_folder(path: str, network: str, model_config, state_dict: dict, meta: dict) -> str:
    """The network alone in the one checkpoint format (config.json + model.safetensors): what generation
    and fine-tuning read, the same as a converted release network."""
    folder_net, prefix = FOLDER_NETWORKS[network]
    state = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    keep = {k: meta.get(k) for k in ("step", "resolution", "latent_space", "started_from") if meta.get(k) is not None}
    return save_pretrained(None, model_config, path, network=folder_net, meta=keep, state_dict=state)


def check_resumable(meta: dict, where: str, *, network: str, resolution: int, world_size: int) -> None:
    """Can this run continue the checkpoint ``meta`` describes? (The model config is checked by check_compatible.)"""
    if meta.get("network") != network:
        raise CheckpointMismatch(f"{where}: checkpoint is for network {meta.get('network')!r}, this run trains {network!r}")
    if meta.get("resolution", resolution) != resolution:
        # Resuming is for the same run; another resolution is a new curriculum stage (a new name + init_from).
        raise CheckpointMismatch(f"{where}: checkpoint was trained at resolution {meta['resolution']}, this run "
                                 f"trains at {resolution}; start a new run name with init_from instead")
    if meta.get("world_size", world_size) != world_size and meta.get("zero_stage") not in RESHARDABLE:
        # meta.json without the stage: its DeepSpeed state cannot be told apart, so it is not resharded
        stage = f"ZeRO stage {meta['zero_stage']}" if "zero_stage" in meta else "a checkpoint of an earlier version"
        raise CheckpointMismatch(f"{where}: checkpoint was written by {meta['world_size']} workers, this run has "
                                 f"{world_size}; {stage} resumes only on the same number (ZeRO 0-3 reshard), or "
                                 f"start a new run name with init_from")


def read_meta(folder: str, storage_options: dict | None = None) -> dict:
    """meta.json of a checkpoint folder (local path or s3:// URI)."""
    fs, path = storage.filesystem(folder.rstrip("/") + "/meta.json", storage_options)
    with fs.open(path, "rb") as f:
        return json.loads(f.read())


def restore(directory: str, engine, ema, *, network: str, model_config, resolution: int, world_size: int) -> int:
    """Load engine + EMA state from a checkpoint directory; returns the step it was taken at."""
    meta_path = Path(directory, "meta.json")
    if not meta_path.exists():
        raise CheckpointMismatch(f"{directory}: not a training checkpoint (no meta.json)")
    meta = json.loads(meta_path.read_text())
    check_compatible(meta, network, model_config, directory)
    check_resumable(meta, directory, network=network, resolution=resolution, world_size=world_size)
    guard_engine(engine)
    if meta.get("world_size", world_size) != world_size and engine.zero_optimization_stage() in (1, 2, 3):
        client = load_resharded(engine, directory, TAG)  # DeepSpeed itself refuses another ZeRO world size
    else:
        _, client = engine.load_checkpoint(directory, tag=TAG, load_optimizer_states=True,
                                           load_lr_scheduler_states=True)
    weights = safe_load(os.path.join(directory, "weights.pt"), os.path.join(directory, "weights.pt"))
    ema.load_full_state_dict(weights["state_dict"])
    return int(client["step"]) if client else int(meta["step"])


MANIFEST = "files-rank{}.json"


def write_manifest(directory: str, rank: int, step: int) -> None:
    """Name every file this rank put in its checkpoint ``directory``, with its size: the proof, read by
    ``finished_meta``, that this rank's part of the checkpoint arrived whole in storage."""
    files = {p.relative_to(directory).as_posix(): p.stat().st_size for p in sorted(Path(directory).rglob("*"))
             if p.is_file() and not (p.name.startswith("files-rank") and p.suffix == ".json")}
    Path(directory, MANIFEST.format(rank)).write_text(json.dumps({"rank": rank, "step": step, "files": files}))


def finished_meta(fs, path: str) -> dict | None:
    """meta.json of the checkpoint at ``path`` on ``fs`` if every rank that wrote it finished: each rank's
    manifest is there for the same step and names files that are all there at their size; None otherwise
    (a rank lost mid-upload, a checkpoint from before manifests, a folder without meta.json)."""
    try:
        meta = json.loads(fs.cat_file(posixpath.join(path, "meta.json")))
        sizes = {posixpath.relpath(p, path): info.get("size") for p, info in fs.find(path, detail=True).items()}
        for rank in range(int(meta["world_size"])):
            name = MANIFEST.format(rank)
            if name not in sizes:
                return None
            manifest = json.loads(fs.cat_file(posixpath.join(path, name)))
            if manifest.get("step") != meta["step"]:
                return None
            if any(sizes.get(rel) != size for rel, size in manifest["files"].items()):
                return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return meta


def _loop_file(directory: str, rank: int) -> str:
    return os.path.join(directory, f"loop-rank{rank}.pt")


def save_loop_state(directory: str, rank: int, position: dict, task, device) -> None:
    """This rank's data position and random generators: what a resumed run needs to continue the same stream."""
    state = {"epoch": int(position["epoch"]), "consumed": int(position["consumed"]),
             "names": list(position.get("names", ())), "clauses": [list(c) for c in position.get("clauses", ())],
             "python_rng": list(task.rng.getstate()[1]), "python_rng_version": task.rng.getstate()[0],
             "python_rng_gauss": task.rng.getstate()[2],
             "condition_rng": task.gen.get_state(), "torch_rng": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda_rng"] = torch.cuda.get_rng_state(device)
    torch.save(state, _loop_file(directory, rank))


def restore_loop_state(directory: str, rank: int, task, device) -> dict | None:
    """Restore what ``save_loop_state`` wrote; None for a checkpoint without it (a run then restarts its epoch)."""
    path = _loop_file(directory, rank)
    if not os.path.exists(path):
        return None
    state = safe_load(path, path)
    _set_generators(state, task, device)
    return {"epoch": state["epoch"], "consumed": state["consumed"], "names": list(state.get("names", [])),
            "clauses": [list(c) for c in state.get("clauses", [])]}


def _set_generators(state: dict, task, device) -> None:
    task.rng.setstate((state["python_rng_version"], tuple(state["python_rng"]), state["python_rng_gauss"]))
    task.gen.set_state(state["condition_rng"])
    torch.set_rng_state(state["torch_rng"])
    if device.type == "cuda" and "cuda_rng" in state:
        torch.cuda.set_rng_state(state["cuda_rng"], device)


def owner(name: str, world: int) -> int:
    """The rank that trains shape ``name`` among ``world`` workers (stable across epochs and restarts)."""
    import zlib

    return zlib.crc32(name.encode()) % world


def regroup_loop_state(directory: str, old_world: int, rank: int, world: int, task, device) -> dict | None:
    """Data position of rank ``rank`` of ``world`` from a checkpoint written by ``old_world`` workers.

    Shapes are split among workers by a hash of their id, so another worker count splits them anew. The run
    continues the epoch of the slowest old worker; a shape counts as done in it when its old worker had
    trained it there (its name is in that worker's list) or had already moved on to the next epoch (its
    whole share was done: a clause (old_world, [ranks])). Each new worker skips its done shapes, so no
    shape of that epoch is trained twice or left out, also across several changes within one epoch. What
    an old worker had trained of a later epoch is trained again. None when a worker's file is missing.
    """
    states = []
    for r in range(old_world):
        path = _loop_file(directory, r)
        if not os.path.exists(path):
            return None
        states.append(safe_load(path, path))
    epoch = min(int(s["epoch"]) for s in states)
    names: set[str] = set()
    clauses: list[list] = []
    for s in states:
        if int(s["epoch"]) == epoch:
            names.update(s.get("names", []))
            clauses += [list(c) for c in s.get("clauses", []) if list(c) not in clauses]
    ahead = [r for r, s in enumerate(states) if int(s["epoch"]) > epoch]
    if ahead:
        clauses.append([old_world, ahead])
    if rank < old_world:  # continue that worker's random streams; a new rank keeps its seeded ones
        _set_generators(states[rank], task, device)
    return {"epoch": epoch, "consumed": 0, "names": sorted(n for n in names if owner(n, world) == rank),
            "clauses": clauses}


def is_done(name: str, names: set, clauses: list) -> bool:
    """Whether ``regroup_loop_state``'s record marks shape ``name`` as trained in the current epoch."""
    return name in names or any(owner(name, w) in ranks for w, ranks in clauses)


def resolve(uri: str, storage_options: dict | None = None) -> str:
    """A checkpoint folder (local path or s3:// URI) from itself or from a run folder ``<storage>/<name>``.

    A run folder resolves to its checkpoint of the highest step that holds ``weights.pt`` (Ray Train names
    checkpoints by time, the launcher path by step; the step in meta.json orders both).
    """
    uri = uri.rstrip("/")
    fs, path = storage.filesystem(uri, storage_options)
    if fs.exists(posixpath.join(path, "weights.pt")):
        return uri
    best = None
    for meta_path in fs.glob(posixpath.join(path, "checkpoint_*", "meta.json")):
        folder = posixpath.dirname(meta_path)
        if not fs.exists(posixpath.join(folder, "weights.pt")):
            continue
        with fs.open(meta_path, "rb") as f:
            step = int(json.loads(f.read()).get("step", -1))
        if best is None or step > best[0]:
            best = (step, folder)
    if best is None:
        raise CheckpointMismatch(f"{uri}: no weights.pt; not a checkpoint of this trainer nor a run folder holding one")
    return storage.join(uri, posixpath.basename(best[1]))


def load_weights(uri: str, network: str | None = None) -> dict:
    """EMA weights of a checkpoint or of a run's newest checkpoint (local path or s3:// URI).

    What sampling loads, and what the next curriculum stage starts from (``init_from``). The dict gets
    ``"source"``: the checkpoint folder the weights came from.
    """
    pretrained = _pretrained_folder(uri)
    if pretrained is not None:
        return _weights_of_pretrained(pretrained, uri, network)
    folder = resolve(uri)
    fs, path = storage.filesystem(folder + "/weights.pt")
    with fs.open(path, "rb") as f:
        weights = safe_load(f, folder + "/weights.pt")
    weights["source"] = folder
    if network is not None and weights.get("network") != network:
        raise CheckpointMismatch(f"{uri}: checkpoint is for network {weights.get('network')!r}, expected {network!r}")
    return weights


# trainer network -> (network of a checkpoint folder, the prefix of the training objective's keys)
FOLDER_NETWORKS = {"dit": ("sparse_dit", "dit."), "structure_dit": ("dense_dit", "dit."),
                   "structure_vae": ("dense_vae", "vae."), "vae": ("ss_vae", "vae.")}


def _pretrained_folder(uri: str) -> str | None:
    """``uri`` when it is a checkpoint folder of the one format (config.json: a converted release network, or
    a run checkpoint's ``model/``), else None. A training checkpoint itself is read from its weights.pt,
    with the run's own config checks."""
    uri = uri.rstrip("/")
    fs, path = storage.filesystem(uri + "/config.json")
    return uri if fs.exists(path) else None


def _weights_of_pretrained(folder: str, uri: str, network: str | None) -> dict:
    """A checkpoint folder (config.json + model.safetensors: a converted release network, or the export
    of a run) as the dict ``load_weights`` returns."""
    def opener(u):
        fs, path = storage.filesystem(u)
        return fs.open(path, "rb")

    want = FOLDER_NETWORKS[network][0] if network else None
    try:
        p = from_pretrained(folder, want, opener=opener)
    except CheckpointError as e:
        raise CheckpointMismatch(str(e)) from None
    trainer_net = network or next(k for k, (v, _) in FOLDER_NETWORKS.items() if v == p.network)
    prefix = FOLDER_NETWORKS[trainer_net][1]
    state = {prefix + k: v for k, v in p.module.state_dict().items()}
    return {"state_dict": state, "network": trainer_net, "model_config": repr(p.config), "config": p.config,
            "step": p.meta.get("step"), "resolution": p.meta.get("resolution"),
            "latent_space": p.meta.get("latent_space"), "source": uri.rstrip("/"), "pretrained": True}


def model_config_of(weights: dict, cls: type):
    """The model config a checkpoint was trained with, rebuilt from its repr (literal values only)."""
    if isinstance(weights.get("config"), cls):  # a checkpoint folder: its typed config.json
        return weights["config"]
    return parse_config_repr(str(weights.get("model_config")), cls, "checkpoint")
