"""The preprocess stage on Ray Data: mesh corpus -> narrow-band sparse SDF shards.

Driver: list the corpus, read what the output already holds (by content hash),
and stream the files through ``process_meshes`` tasks. Each task reads, hashes,
loads, normalizes, computes the sparse SDF at every resolution, renders the
condition views and writes its own shards atomically under names fixed by their
content, so a retried task (a worker died) overwrites instead of duplicating.
The tasks return one small summary row per file; the driver writes
``manifest.parquet`` (rebuilt from the shards themselves), ``errors.parquet``,
``stats.parquet`` (seconds, voxels, faces, bytes per mesh) and ``sources.parquet``
(each file's size and ETag or mtime when last done, so a rerun skips unchanged
files without reading them), logs a progress line every few seconds and prints
a summary table.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Optional

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline import shards, storage
from pipeline.config import ConfigError
from pipeline.geometry.budget import BudgetError
from pipeline.geometry.mesh import (MESH_EXTENSIONS, SIDECAR_EXTENSIONS, MeshError, extension, load_mesh,
                                    normalize)


@dataclass
class PreprocessConfig:
    input: str = field(default="", metadata={"help": "mesh corpus: a folder, a file, or an s3:// prefix"})
    output: str = field(default="", metadata={"help": "dataset root for shards, manifest and errors (path or s3://)"})
    resolutions: list[int] = field(default_factory=lambda: [256, 512, 1024],
                                   metadata={"help": "grid resolutions of the sparse SDF"})
    band: float = field(default=2.0, metadata={"help": "narrow band half-width in voxel widths"})
    sdf_backend: Literal["native", "mesh_to_sdf"] = field(
        default="native", metadata={"help": "native (ours) or mesh_to_sdf (reference, slow)"})
    views: int = field(default=12, metadata={"help": "condition views rendered per mesh"})
    view_size: int = field(default=518, metadata={"help": "view width and height in pixels"})
    elevation: tuple[float, float] = field(default=(10.0, 40.0), metadata={"help": "view elevation range, degrees"})
    seed: int = field(default=0, metadata={"help": "seed of the view cameras"})
    meshes_per_task: int = field(default=4, metadata={"help": "meshes a task processes and writes as one shard"})
    cpus_per_task: float = field(default=1.0, metadata={"help": "CPUs reserved per task (torch threads follow)"})
    gpus_per_task: float = field(default=0.0, metadata={
        "help": "GPUs reserved per task; > 0 computes the sparse SDF on the task's GPU (Triton kernel)"})
    memory_per_task_gb: Optional[float] = field(default=None, metadata={
        "help": "memory reserved per task, GiB; a mesh whose estimate exceeds it is cut into slabs or refused "
                "(default none: no Ray reservation, the budget is this node's memory per CPU)"})
    progress_seconds: float = field(default=5.0, metadata={"help": "seconds between progress lines in the log"})
    concurrency: Optional[int] = field(default=None, metadata={"help": "most tasks at once (default: cluster CPUs)"})
    max_faces: int = field(default=10_000_000, metadata={"help": "meshes with more faces are rejected"})
    max_file_mb: float = field(default=2048.0, metadata={"help": "files larger than this are rejected"})
    limit: Optional[int] = field(default=None, metadata={"help": "process only the first N files (sorted)"})
    storage_options: dict[str, Any] = field(default_factory=dict,
                                            metadata={"help": "fsspec options as JSON (e.g. S3 endpoint)"})
    compression: str = field(default="zstd", metadata={"help": "Parquet compression codec"})

    def validate(self) -> None:
        if not self.input:
            raise ConfigError("input: required (a folder, a file or an s3:// prefix of meshes)")
        if not self.output:
            raise ConfigError("output: required (a folder or an s3:// prefix for the shards)")
        if not self.resolutions:
            raise ConfigError("resolutions: at least one is required")
        for r in self.resolutions:
            if r < 8 or r > 4096 or r % 8:
                raise ConfigError(f"resolutions: {r} must be a multiple of 8 between 8 and 4096")
        if len(set(self.resolutions)) != len(self.resolutions):
            raise ConfigError(f"resolutions: duplicates in {self.resolutions}")
        if not (0 < self.band <= 16):
            raise ConfigError(f"band: {self.band} must be in (0, 16] voxel widths")
        if self.views < 0 or (self.views and self.view_size < 16):
            raise ConfigError("views must be >= 0 and view_size >= 16")
        lo, hi = self.elevation
        if not (-90 <= lo <= hi <= 90):
            raise ConfigError(f"elevation: {self.elevation} must be an increasing range within [-90, 90]")
        if self.meshes_per_task < 1 or self.cpus_per_task <= 0:
            raise ConfigError("meshes_per_task >= 1, cpus_per_task > 0 are required")
        if self.gpus_per_task < 0:
            raise ConfigError(f"gpus_per_task: {self.gpus_per_task} must be >= 0")
        if self.max_faces < 1 or self.max_file_mb <= 0:
            raise ConfigError("max_faces and max_file_mb must be positive")
        if self.memory_per_task_gb is not None and self.memory_per_task_gb <= 0:
            raise ConfigError(f"memory_per_task_gb: {self.memory_per_task_gb} must be > 0")

    def budget_bytes(self) -> float:
        """Memory one task may use: the reservation, else this node's memory per CPU times cpus_per_task."""
        if self.memory_per_task_gb is not None:
            return self.memory_per_task_gb * 2**30
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return total / (os.cpu_count() or 1) * self.cpus_per_task

    def row_config_hash(self) -> str:
        """Hash of every setting that changes a row's content (not where or how fast it runs)."""
        keys = {"band": self.band, "sdf_backend": self.sdf_backend, "views": self.views,
                "view_size": self.view_size, "elevation": list(self.elevation), "seed": self.seed,
                "schema": shards.SCHEMA_VERSION}
        return hashlib.sha256(json.dumps(keys, sort_keys=True).encode()).hexdigest()[:16]


SUMMARY_SCHEMA = pa.schema([
    ("source_uri", pa.string()), ("mesh_id", pa.string()), ("content_hash", pa.string()),
    ("status", pa.string()), ("stage", pa.string()), ("error", pa.string()),
    ("voxels", pa.int64()), ("bytes", pa.int64()), ("seconds", pa.float64()),
    ("faces", pa.int64()), ("pieces", pa.int64()), ("estimated_gib", pa.float64()),
    ("size", pa.int64()), ("stamp", pa.string()), ("config_hash", pa.string()),
])
# What a rerun needs to skip a file unread: its listing (size, stamp) when it was last done.
SOURCES_FILE, STATS_FILE = "sources.parquet", "stats.parquet"


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{text}" if isinstance(exc, (MeshError, ValueError)) and text else f"{type(exc).__name__}: {text}"


def _views_for(mesh, cfg: PreprocessConfig, content_hash: str) -> list[shards.View]:
    if cfg.views == 0:
        return []
    from pipeline.geometry.render import render_views

    # Seed per mesh from the config seed and the content, so views are reproducible and varied.
    seed = (cfg.seed * 1_000_003 + int(content_hash[:8], 16)) % (2**31)
    out = []
    for v in render_views(mesh.vertices, mesh.faces, n_views=cfg.views, size=cfg.view_size,
                          elevation=tuple(cfg.elevation), seed=seed):
        out.append(shards.View(png=v.png(), intrinsics=np.asarray(v.intrinsics, np.float32),
                               extrinsics=np.asarray(v.extrinsics, np.float32),
                               elevation=float(v.elevation), azimuth=float(v.azimuth)))
    return out


def _sdf(mesh, resolutions: list[int], cfg: PreprocessConfig, row: dict) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """(coords, values) per resolution within the task's memory budget: planned from the face count and
    surface area before any band work (geometry/budget.py), cut into slabs where the band would not fit,
    refused (BudgetError naming the resolution and the need) where even the output would not."""
    from pipeline.geometry.budget import plan, sdf_in_pieces, surface_area
    from pipeline.geometry.sdf import prepare_mesh, sparse_sdf_multi

    plans = plan(surface_area(mesh.vertices, mesh.faces), mesh.face_count, resolutions, cfg.band, cfg.budget_bytes())
    row["pieces"] = max(p.pieces for p in plans)
    row["estimated_gib"] = max(p.peak_bytes for p in plans) / 2**30
    device = "cpu"
    if cfg.gpus_per_task > 0:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError("gpus_per_task > 0 but this worker sees no CUDA device")
        device = "cuda"
    out = {}
    if cfg.sdf_backend == "mesh_to_sdf":
        sdfs = sparse_sdf_multi(mesh.vertices, mesh.faces, resolutions, band=cfg.band, backend=cfg.sdf_backend)
    else:
        prepared = prepare_mesh(mesh.vertices, mesh.faces, device=device)
        sdfs = {p.resolution: sdf_in_pieces(prepared, p.resolution, cfg.band, p.pieces) for p in plans}
    for res, s in sdfs.items():
        out[res] = (np.asarray(s.coords.cpu().numpy(), np.int32), np.asarray(s.values.cpu().numpy(), np.float32))
    return out


def process_one(uri: str, data: bytes, cfg: PreprocessConfig, done: set[str], resolver=None) -> tuple[dict, list[shards.ShardRow]]:
    """Everything for one file; failures become a summary row with the stage and reason."""
    t0 = time.perf_counter()
    row = {**dict.fromkeys(SUMMARY_SCHEMA.names), "source_uri": uri, "status": "ok", "voxels": 0,
           "bytes": len(data), "seconds": 0.0, "size": len(data), "config_hash": cfg.row_config_hash()}
    stage = "hash"
    try:
        content_hash = hashlib.sha256(data).hexdigest()
        row["content_hash"] = content_hash
        row["mesh_id"] = shards.mesh_id_for(uri, content_hash)
        cfg_hash = cfg.row_config_hash()
        todo = [r for r in cfg.resolutions if f"{content_hash}:{cfg_hash}:{r}" not in done]
        if not todo:
            row["status"] = "skipped"
            return row, []
        stage = "load"
        vertices, faces = load_mesh(data, extension(uri), max_faces=cfg.max_faces, resolver=resolver)
        stage = "normalize"
        mesh = normalize(vertices, faces)
        row["faces"] = mesh.face_count
        rows = []
        stage = "sdf@" + ",".join(map(str, todo))  # one shared call; its errors name the resolution
        sdfs = _sdf(mesh, todo, cfg, row)
        for res in todo:
            stage = f"sdf@{res}"
            coords, values = sdfs[res]
            if len(coords) == 0:
                raise MeshError(f"empty narrow band at {res}^3")
            if not np.isfinite(values).all():
                raise MeshError(f"non-finite SDF values at {res}^3")
            rows.append(shards.ShardRow(
                mesh_id=row["mesh_id"], source_uri=uri, content_hash=content_hash, config_hash=cfg_hash,
                resolution=res, band=cfg.band, coords=coords, sdf=values, center=mesh.center, scale=mesh.scale,
                face_count=mesh.face_count, vertex_count=mesh.vertex_count, watertight=mesh.watertight,
                views=[]))
            row["voxels"] += len(coords)
        stage = "render"
        views = _views_for(mesh, cfg, content_hash)
        for r in rows:
            r.views = views
        return row, rows
    except Exception as exc:  # one bad mesh never stops the batch
        row.update(status="failed", stage="memory" if isinstance(exc, BudgetError) else stage,
                   error=_one_line(exc), voxels=0)
        return row, []
    finally:
        row["seconds"] = time.perf_counter() - t0


_DONE_CACHE: dict[str, set[str]] = {}


def _done_set(ref) -> set[str]:
    import ray

    if ref is None:
        return set()
    key = ref.hex()
    if key not in _DONE_CACHE:
        _DONE_CACHE.clear()
        _DONE_CACHE[key] = ray.get(ref)
    return _DONE_CACHE[key]


def _sibling_resolver(fs, path: str):
    """Files a mesh refers to (a .gltf's buffers, an .obj's materials), read beside it on its filesystem."""
    import posixpath

    import trimesh.resolvers

    class Siblings(trimesh.resolvers.Resolver):
        def __init__(self, folder: str):
            self.folder = folder

        def get(self, name: str) -> bytes:
            return fs.cat_file(posixpath.join(self.folder, name))

        def write(self, name, data):
            raise PermissionError("the input corpus is read-only")

        def namespaced(self, namespace: str):
            return Siblings(posixpath.join(self.folder, namespace))

        def keys(self):
            return iter(())

    return Siblings(posixpath.dirname(path))


def process_meshes(batch: dict[str, np.ndarray], *, cfg_dict: dict, done_ref=None) -> pa.Table:
    """Ray Data task: a batch of file URIs in, their summary rows out; shards written on the way."""
    import torch

    cfg = PreprocessConfig(**cfg_dict)
    torch.set_num_threads(max(1, int(cfg.cpus_per_task)))
    done = _done_set(done_ref)
    summaries, rows = [], []
    for uri, size, stamp in zip(batch["uri"], batch["size"], batch["stamp"]):
        uri = str(uri)
        listed = {**dict.fromkeys(SUMMARY_SCHEMA.names), "source_uri": uri, "status": "failed", "stage": "read",
                  "voxels": 0, "bytes": int(size), "seconds": 0.0, "size": int(size), "stamp": str(stamp),
                  "config_hash": cfg.row_config_hash()}
        if size > cfg.max_file_mb * 2**20:
            summaries.append({**listed, "error": f"file of {size / 2**20:.0f} MiB is over max_file_mb"})
            continue
        try:
            fs, path = storage.filesystem(uri, cfg.storage_options)
            data = fs.cat_file(path)
        except Exception as exc:
            summaries.append({**listed, "error": _one_line(exc)})
            continue
        summary, mesh_rows = process_one(uri, data, cfg, done, resolver=_sibling_resolver(fs, path))
        summaries.append({**summary, "size": int(size), "stamp": str(stamp)})
        rows.extend(mesh_rows)
    if rows:
        written = dict(shards.write_shard(cfg.output, rows, storage_options=cfg.storage_options,
                                          compression=cfg.compression))
        total = sum(written.values())
        voxels = sum(len(r.coords) for r in rows) or 1
        for s in summaries:  # attribute shard bytes to meshes by their voxel share
            if s["status"] == "ok":
                s["bytes"] = int(total * s["voxels"] / voxels)
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


@dataclass
class PreprocessResult:
    summary: pa.Table  # one row per input file of this run
    manifest: pa.Table
    errors: pa.Table
    wall_seconds: float

    def counts(self) -> dict[str, int]:
        status = self.summary.column("status").to_pylist()
        return {k: status.count(k) for k in ("ok", "skipped", "failed")}


def _classify_inputs(cfg: PreprocessConfig) -> tuple[list[dict], list[dict]]:
    files = storage.list_files_with_stamps(cfg.input, cfg.storage_options)
    todo, rejected = [], []
    for uri, size, stamp in files:
        ext = extension(uri)
        if ext in MESH_EXTENSIONS:
            todo.append({"uri": uri, "size": size, "stamp": stamp})
        elif ext in SIDECAR_EXTENSIONS:
            continue
        else:
            rejected.append({**dict.fromkeys(SUMMARY_SCHEMA.names), "source_uri": uri, "status": "failed",
                             "stage": "read", "voxels": 0, "bytes": size, "seconds": 0.0, "size": size,
                             "stamp": stamp,
                             "error": f"unsupported file type '.{ext}' (supported: {', '.join(MESH_EXTENSIONS)})"})
    if cfg.limit is not None:
        todo = todo[: cfg.limit]
    return todo, rejected


def _read_table(uri: str, storage_options: dict) -> pa.Table | None:
    """A Parquet file of ours, or None if it is missing or unreadable (then it is rebuilt)."""
    try:
        fs, path = storage.filesystem(uri, storage_options)
        if not fs.exists(path):
            return None
        with fs.open(path, "rb") as fh:
            return pq.read_table(fh)
    except (OSError, pa.ArrowInvalid):
        return None


def _unchanged(todo: list[dict], sources: pa.Table | None, cfg: PreprocessConfig) -> tuple[list[dict], list[dict]]:
    """Split the listed files into (to do, skipped unread): a file is skipped when sources.parquet holds it
    with the same size and stamp (ETag or mtime), the same row settings and every wanted resolution."""
    if sources is None or not todo:
        return todo, []
    cfg_hash, wanted = cfg.row_config_hash(), set(cfg.resolutions)
    cols = {name: sources.column(name).to_pylist() for name in ("source_uri", "size", "stamp", "config_hash",
                                                                  "resolutions")}
    previous = {u: i for i, u in enumerate(cols["source_uri"])}
    rows = None
    keep, skipped = [], []
    for item in todo:
        i = previous.get(item["uri"])
        if (i is None or not item["stamp"] or cols["size"][i] != item["size"] or cols["stamp"][i] != item["stamp"]
                or cols["config_hash"][i] != cfg_hash or not wanted <= set(cols["resolutions"][i] or ())):
            keep.append(item)
            continue
        rows = rows if rows is not None else sources.select(SUMMARY_SCHEMA.names).to_pylist()
        # Same outcome as last time; a failure keeps its reason so errors.parquet still lists it.
        skipped.append({**rows[i], "status": "skipped", "seconds": 0.0})
    return keep, skipped


def _write_table(table: pa.Table, uri: str, storage_options: dict) -> None:
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression="zstd")
    fs, path = storage.filesystem(uri, storage_options)
    storage.write_atomic(fs, path, sink.getvalue().to_pybytes())


def build_manifest(cfg: PreprocessConfig) -> pa.Table:
    """What the output holds, one row per (mesh, resolution), read from the shards themselves."""
    index = shards.read_index(cfg.output, storage_options=cfg.storage_options)
    seen, keep = set(), []
    for i, (h, c, r) in enumerate(zip(index.column("content_hash").to_pylist(),
                                      index.column("config_hash").to_pylist(),
                                      index.column("resolution").to_pylist())):
        if (h, c, r) not in seen:
            seen.add((h, c, r))
            keep.append(i)
    return index.take(pa.array(keep, pa.int64())) if index.num_rows else index


def run(cfg: PreprocessConfig, *, progress: bool = True) -> PreprocessResult:
    """Run the stage on the current Ray cluster (or a local one), blocking until done."""
    cfg.validate()
    t0 = time.perf_counter()
    listed, rejected = _classify_inputs(cfg)
    out_uri = lambda name: storage.join(cfg.output, name)  # noqa: E731
    sources = _read_table(out_uri(SOURCES_FILE), cfg.storage_options)
    todo, skipped = _unchanged(listed, sources, cfg)
    print(f"preprocess: {len(listed)} mesh files listed, {len(skipped)} unchanged since the last run "
          f"(skipped unread), {len(todo)} to read", flush=True)
    tables = [pa.Table.from_pylist(rejected + skipped, schema=SUMMARY_SCHEMA)]
    manifest = _read_table(out_uri("manifest.parquet"), cfg.storage_options)
    if todo:
        manifest = manifest if manifest is not None else build_manifest(cfg)
        tables += _run_tasks(cfg, todo, manifest, progress)
    summary = pa.concat_tables([t.cast(SUMMARY_SCHEMA) for t in tables])
    wrote = pc.sum(pc.equal(summary.column("status"), "ok")).as_py()
    if wrote or manifest is None:
        manifest = build_manifest(cfg)
    status, error = summary.column("status"), summary.column("error")
    errors = summary.filter(pc.or_(pc.equal(status, "failed"),
                                   pc.and_(pc.equal(status, "skipped"), pc.is_valid(error))))
    _write_table(manifest, out_uri("manifest.parquet"), cfg.storage_options)
    _write_table(errors, out_uri("errors.parquet"), cfg.storage_options)
    if todo or sources is None:
        _write_table(_sources(summary, sources, cfg), out_uri(SOURCES_FILE), cfg.storage_options)
        _write_table(_stats(summary, _read_table(out_uri(STATS_FILE), cfg.storage_options)), out_uri(STATS_FILE),
                     cfg.storage_options)
    return PreprocessResult(summary=summary, manifest=manifest, errors=errors,
                            wall_seconds=time.perf_counter() - t0)


def _run_tasks(cfg: PreprocessConfig, todo: list[dict], manifest: pa.Table, progress: bool) -> list[pa.Table]:
    """The Ray Data map over the files to read, with a progress line every cfg.progress_seconds."""
    import ray

    done = {f"{h}:{c}:{r}" for h, c, r in zip(manifest.column("content_hash").to_pylist(),
                                                manifest.column("config_hash").to_pylist(),
                                                manifest.column("resolution").to_pylist())}
    if not ray.is_initialized():
        from pipeline.ray_address import connect

        connect(start_if_none=True, log_to_driver=True)  # RAY_ADDRESS in any of Ray's forms
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = progress
    blocks = max(1, math.ceil(len(todo) / cfg.meshes_per_task))
    ds = ray.data.from_items(todo, override_num_blocks=blocks)
    # Ray Data retries a task whose worker died; shard names fixed by content make that safe.
    out = ds.map_batches(
        process_meshes, batch_size=cfg.meshes_per_task, batch_format="numpy",
        fn_kwargs={"cfg_dict": asdict(cfg), "done_ref": ray.put(done)},
        num_cpus=cfg.cpus_per_task, num_gpus=cfg.gpus_per_task or None, concurrency=cfg.concurrency,
        memory=int(cfg.memory_per_task_gb * 2**30) if cfg.memory_per_task_gb else None)
    tables, counts = [], {"ok": 0, "skipped": 0, "failed": 0}
    start = last = time.perf_counter()
    for block in out.iter_batches(batch_size=None, batch_format="pyarrow"):
        tables.append(block)
        for k in counts:
            counts[k] += pc.sum(pc.equal(block.column("status"), k)).as_py() or 0
        now = time.perf_counter()
        n = sum(counts.values())
        if now - last >= cfg.progress_seconds or n == len(todo):
            last = now
            print(progress_line(n, len(todo), counts, now - start), flush=True)
    return tables


def progress_line(n: int, total: int, counts: dict[str, int], seconds: float) -> str:
    """One log line: files done of total, by outcome, meshes per second and the time left at that rate."""
    rate = n / seconds if seconds > 0 else 0.0
    left = (total - n) / rate if rate > 0 else float("inf")
    eta = "?" if left == float("inf") else time.strftime("%H:%M:%S", time.gmtime(left)) if left < 86400 else f"{left / 86400:.1f} d"
    return (f"preprocess: {n}/{total} files ({100 * n / max(total, 1):.0f}%)  ok {counts['ok']}  skipped "
            f"{counts['skipped']}  failed {counts['failed']}  {rate:.2f} meshes/s  ETA {eta}")


def _sources(summary: pa.Table, previous: pa.Table | None, cfg: PreprocessConfig) -> pa.Table:
    """What the next run skips unread: every file with an outcome that reading it again would repeat
    (done, or failed on its content); read errors and memory refusals are tried again."""
    rows = [r for r in summary.to_pylist()
            if r["status"] == "ok" or (r["status"] in ("failed", "skipped") and r["stage"] not in ("read", "memory"))]
    for r in rows:
        r["resolutions"] = r.get("resolutions") or list(cfg.resolutions)
    fresh = {r["source_uri"] for r in rows}
    if previous is not None:
        rows += [r for r in previous.to_pylist() if r["source_uri"] not in fresh]
    schema = SUMMARY_SCHEMA.append(pa.field("resolutions", pa.list_(pa.int64())))
    return pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)


def _stats(summary: pa.Table, previous: pa.Table | None) -> pa.Table:
    """Per-mesh cost table beside the manifest: this run's processed files plus earlier rows of the others."""
    done = summary.filter(pc.is_in(summary.column("status"), pa.array(["ok", "failed"])))
    if previous is None:
        return done
    keep = pc.invert(pc.is_in(previous.column("source_uri"), done.column("source_uri")))
    return pa.concat_tables([done, previous.filter(keep).cast(SUMMARY_SCHEMA)])


def print_summary(result: PreprocessResult, cfg: PreprocessConfig) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    counts = result.counts()
    processed = counts["ok"]
    t = Table(title="preprocess summary")
    t.add_column("item")
    t.add_column("value", justify="right")
    t.add_row("meshes ok", str(counts["ok"]))
    t.add_row("meshes skipped (unchanged or already done)", str(counts["skipped"]))
    t.add_row("meshes failed", str(counts["failed"]))
    res_col = result.manifest.column("resolution").to_pylist()
    vox_col = result.manifest.column("num_voxels").to_pylist()
    for r in sorted(set(res_col)):
        vox = sum(v for rr, v in zip(res_col, vox_col) if rr == r)
        t.add_row(f"voxels at {r}^3 (whole output)", f"{vox:,}")
    ok_mask = [s == "ok" for s in result.summary.column("status").to_pylist()]
    written = sum(b for b, m in zip(result.summary.column("bytes").to_pylist(), ok_mask) if m)
    t.add_row("shard bytes written", f"{written / 2**20:,.1f} MiB")
    t.add_row("wall time", f"{result.wall_seconds:,.1f} s")
    t.add_row("meshes per second", f"{processed / max(result.wall_seconds, 1e-9):.2f}")
    t.add_row("output", cfg.output)
    console.print(t)
    if result.errors.num_rows:
        e = Table(title=f"failed meshes ({result.errors.num_rows}; full list in errors.parquet)")
        e.add_column("file")
        e.add_column("stage")
        e.add_column("reason")
        for row in result.errors.slice(0, 25).to_pylist():
            e.add_row(os.path.basename(row["source_uri"]), row["stage"] or "", row["error"] or "")
        console.print(e)
