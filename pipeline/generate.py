"""Batch generation of an asset library through the Serve app.

Images come from a folder, a Parquet/CSV manifest (column ``image``; optional ``seed``, ``name``) or an
``s3://`` prefix. Each image goes to the app's Generator through a DeploymentHandle, at most
``concurrency`` at a time (the Generator batches what is in flight). The library:

    <output>/meshes/<asset_id>.<format>    one mesh per image
    <output>/previews/<asset_id>.png       a rendered preview
    <output>/records/<asset_id>.json       one record per finished item, written last (atomic)
    <output>/index.parquet                 the records as a table (rebuilt during and after the run)
    <output>/gallery.html                  a static page of every asset

An item's key is the hash of (image content, seed, model id): re-running skips items whose record says
they succeeded with the same key; an item killed half-way has no record and is done again. A failure
becomes a record with its reason and the run goes on.
"""
from __future__ import annotations

import hashlib
import io
import json
import posixpath
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Literal

from pipeline import storage
from pipeline.config import ConfigError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
STAGES = ("load", "condition", "structure", "sparse", "decode", "refine", "refine_decode", "mesh")


@dataclass
class GenerateConfig:
    images: str = field(default="", metadata={
        "help": "folder or s3:// prefix of images, or a .parquet/.csv manifest with an 'image' column"})
    output: str = field(default="", metadata={"help": "library root: local path or s3://"})
    app_name: str = field(default="s2", metadata={"help": "name of the running Serve app"})
    serve_config: str = field(default="", metadata={
        "help": "Serve config file (jobs/serve.yaml) to start the app from when it is not running"})
    seed: int = field(default=0, metadata={"help": "seed of items without a manifest 'seed'"})
    format: Literal["glb", "obj", "ply"] = "glb"
    concurrency: int = field(default=8, metadata={"help": "requests in flight to the Generator"})
    preview_size: int = 256
    limit: int = field(default=0, metadata={"help": "only the first N images (0: all)"})
    retry_failed: bool = field(default=True, metadata={"help": "re-run items whose last attempt failed"})
    index_every_s: float = field(default=30.0, metadata={"help": "rewrite index.parquet this often during the run"})
    request_timeout_s: float = 1800.0
    title: str = "s2ray asset library"
    storage_options: dict = field(default_factory=dict, metadata={"help": "fsspec options (JSON); never written out"})

    def validate(self) -> None:
        if not self.images or not self.output:
            raise ConfigError("images and output are required")
        if self.concurrency < 1 or self.preview_size < 16 or self.limit < 0:
            raise ConfigError("concurrency >= 1, preview_size >= 16 and limit >= 0 are required")


@dataclass
class Item:
    source: str
    name: str
    seed: int


_USERINFO = re.compile(r"(://)[^/@]+@")


def redact(uri: str) -> str:
    """A URI without user:password@ (nothing secret reaches logs or the index)."""
    return _USERINFO.sub(r"\1", uri)


def _stem(uri: str) -> str:
    base = posixpath.basename(uri.rstrip("/")).rsplit(".", 1)[0]
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", base)[:60] or "image"


def list_items(cfg: GenerateConfig) -> list[Item]:
    """The images of ``cfg.images`` in a fixed order; a manifest row without an image is an error naming it."""
    src, opts = cfg.images, cfg.storage_options
    if src.lower().endswith((".parquet", ".csv")):
        import pyarrow.csv as pacsv
        import pyarrow.parquet as pq

        fs, path = storage.filesystem(src, opts)
        with fs.open(path, "rb") as f:
            table = pq.read_table(f) if src.lower().endswith(".parquet") else pacsv.read_csv(f)
        if "image" not in table.column_names:
            raise ConfigError(f"{redact(src)}: manifest has no 'image' column (columns: {table.column_names})")
        base = src.rsplit("/", 1)[0] if "/" in src else "."
        items = []
        for i, row in enumerate(table.to_pylist()):
            img = row.get("image")
            if not img:
                raise ConfigError(f"{redact(src)}: row {i} has no image")
            uri = img if ("://" in img or img.startswith("/")) else storage.join(base, img)
            seed = row.get("seed")
            items.append(Item(uri, str(row.get("name") or _stem(uri)), cfg.seed if seed is None else int(seed)))
    else:
        files = [u for u, _ in storage.list_files(src, opts) if u.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise ConfigError(f"{redact(src)}: no images ({', '.join(IMAGE_EXTENSIONS)})")
        items = [Item(u, _stem(u), cfg.seed) for u in files]
    return items[: cfg.limit] if cfg.limit else items


def model_id(info: dict) -> str:
    """A digest of what makes a mesh: the networks (configs, steps) and the sampling settings, not the device."""
    keep = {k: v for k, v in info.items() if k not in ("device", "limits", "api_key_required", "max_batch_size",
                                                        "batch_wait_timeout_s", "formats")}
    return hashlib.sha256(json.dumps(keep, sort_keys=True, default=str).encode()).hexdigest()[:12]


def item_key(image_sha: str, seed: int, model: str) -> str:
    return hashlib.sha256(f"{image_sha}:{seed}:{model}".encode()).hexdigest()


class Library:
    """The output folder: records, meshes, previews, the index and the gallery."""

    def __init__(self, root: str, storage_options: dict | None = None):
        self.root = root
        self.fs, self.path = storage.filesystem(root, storage_options)

    def _p(self, *parts: str) -> str:
        return posixpath.join(self.path, *parts)

    def write(self, rel: str, data: bytes) -> None:
        storage.write_atomic(self.fs, self._p(rel), data)

    def remove_stale_temps(self) -> int:
        """Delete the temporary files a killed run left in a local library (an hour old or more); S3 objects
        appear only when whole, so a remote library has none."""
        if storage.is_remote(self.root):
            return 0
        return sum(storage.remove_stale_temps(self._p(sub)) for sub in ("", "records", "meshes", "previews", "inputs"))

    def records(self) -> dict[str, dict]:
        """asset_id -> record of every finished item (a record that does not parse is ignored: redone)."""
        out = {}
        if not self.fs.exists(self._p("records")):
            return out
        for p in self.fs.glob(self._p("records", "*.json")):
            try:
                rec = json.loads(self.fs.cat_file(p))
                out[rec["asset_id"]] = rec
            except (ValueError, KeyError, OSError):
                continue
        return out

    def write_index(self, records: dict[str, dict], title: str) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        from pipeline.gallery import write_gallery

        rows = sorted(records.values(), key=lambda r: r["asset_id"])
        cols = ["asset_id", "name", "source", "image_sha256", "seed", "model_id", "key", "status", "error", "mesh",
                "preview", "format", "faces", "vertices", "seconds", "batch_size", "finished_at"]
        data = {c: [r.get(c) for r in rows] for c in cols}
        for s in STAGES + ("preview",):
            data[f"t_{s}"] = [r.get("timings", {}).get(s) for r in rows]
        schema = pa.schema([(c, pa.int64() if c in ("seed", "faces", "vertices", "batch_size") else
                             pa.float64() if c == "seconds" or c.startswith("t_") else pa.string()) for c in data])
        buf = io.BytesIO()
        pq.write_table(pa.table(data, schema=schema), buf, compression="zstd")
        self.write("index.parquet", buf.getvalue())
        write_gallery(self, rows, title)


def render_preview(mesh: bytes, fmt: str, size: int, camera=None) -> bytes:
    """The mesh, normalised as the corpus is, seen from ``camera`` (the input's; default: the front camera)."""
    import numpy as np

    from model.postprocess import read_mesh_bytes
    from pipeline.geometry.render import FRONT_CAMERA, render_view

    cam = camera or FRONT_CAMERA
    v, f = read_mesh_bytes(mesh, fmt)
    v = v - (v.max(0) + v.min(0)) / 2
    v = v * (0.95 / max(float(np.abs(v).max()), 1e-6))
    return render_view(v, f, elevation=cam.elevation, azimuth=cam.azimuth, fov_deg=cam.fov_deg, radius=cam.radius,
                       size=size).png()


class Job:
    def __init__(self, cfg: GenerateConfig, handle, info: dict):
        self.cfg, self.handle = cfg, handle
        self.lib = Library(cfg.output, cfg.storage_options)
        self.model = model_id(info)
        self.lock = threading.Lock()

    def _record(self, item: Item, image_sha: str, key: str, asset_id: str, **fields) -> dict:
        rec = {"asset_id": asset_id, "name": item.name, "source": redact(item.source), "image_sha256": image_sha,
               "seed": item.seed, "model_id": self.model, "key": key, "format": self.cfg.format,
               "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "status": "error", "error": None,
               "mesh": None, "preview": None, "faces": 0, "vertices": 0, "seconds": 0.0, "batch_size": 0,
               "timings": {}, **fields}
        self.lib.write(f"records/{asset_id}.json", json.dumps(rec).encode())
        return rec

    def run_item(self, item: Item, data: bytes) -> dict:
        from pipeline.gallery import save_input, write_asset_view
        from pipeline.geometry.render import FRONT_CAMERA, read_camera

        sha = hashlib.sha256(data).hexdigest()
        key = item_key(sha, item.seed, self.model)
        asset_id = f"{_stem(item.name)}-{key[:10]}"
        t0 = time.perf_counter()
        camera = read_camera(data) or FRONT_CAMERA  # the preview looks from the input's camera where it has one
        seen = {"input": save_input(self.lib, asset_id, data), "camera": camera.as_dict()}
        try:
            ans = self.handle.generate.remote({"name": item.name, "image": data, "seed": item.seed,
                                               "format": self.cfg.format}).result(timeout_s=self.cfg.request_timeout_s)
        except Exception as e:  # a replica that died or timed out fails this item only
            msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            return self._record(item, sha, key, asset_id, error=f"{item.name}: {type(e).__name__}: {msg[:300]}", **seen)
        if ans["error"]:
            return self._record(item, sha, key, asset_id, error=ans["error"], timings=ans["timings"], **seen)
        mesh_rel = f"meshes/{asset_id}.{self.cfg.format}"
        self.lib.write(mesh_rel, ans["mesh"])
        t = time.perf_counter()
        try:
            preview = render_preview(ans["mesh"], self.cfg.format, self.cfg.preview_size, camera)
            seen.update(write_asset_view(self.lib, asset_id, ans["mesh"], self.cfg.format))
        except ValueError as e:
            return self._record(item, sha, key, asset_id, error=f"{item.name}: preview: {e}", mesh=mesh_rel, **seen)
        self.lib.write(f"previews/{asset_id}.png", preview)
        timings = {**ans["timings"], "preview": time.perf_counter() - t}
        return self._record(item, sha, key, asset_id, status="ok", mesh=mesh_rel, preview=f"previews/{asset_id}.png",
                            **{**seen, "faces": ans["faces"], "vertices": ans["vertices"]},
                            seconds=time.perf_counter() - t0, batch_size=ans["batch_size"], timings=timings)


def read_source(item: Item, opts: dict) -> bytes:
    fs, path = storage.filesystem(item.source, opts)
    with fs.open(path, "rb") as f:
        return f.read()


def run(cfg: GenerateConfig, handle, info: dict, progress: bool = True) -> dict:
    """Generate every item of ``cfg.images`` not already in the library; returns a summary."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    cfg.validate()
    job = Job(cfg, handle, info)
    items = list_items(cfg)
    job.lib.remove_stale_temps()
    records = job.lib.records()
    done_keys = {r["key"] for r in records.values() if r["status"] == "ok" or not cfg.retry_failed}
    summary = {"items": len(items), "generated": 0, "skipped": 0, "failed": 0, "failures": [], "model_id": job.model}
    last_index = time.monotonic()
    t0 = time.monotonic()

    def work(item: Item):
        try:
            data = read_source(item, cfg.storage_options)
        except (OSError, ValueError) as e:
            sha = hashlib.sha256(item.source.encode()).hexdigest()
            key = item_key(sha, item.seed, job.model)
            return job._record(item, "", key, f"{_stem(item.name)}-{key[:10]}",
                               error=f"{item.name}: unreadable source ({type(e).__name__}: {e})"), False
        key = item_key(hashlib.sha256(data).hexdigest(), item.seed, job.model)
        if key in done_keys:
            return None, True
        return job.run_item(item, data), False

    with Progress(TextColumn("generate"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                  TextColumn("{task.fields[status]}"), disable=not progress) as bar, \
            ThreadPoolExecutor(cfg.concurrency) as pool:
        task = bar.add_task("generate", total=len(items), status="")
        futures = [pool.submit(work, it) for it in items]
        for fut in as_completed(futures):
            rec, skipped = fut.result()
            if skipped:
                summary["skipped"] += 1
            elif rec["status"] == "ok":
                summary["generated"] += 1
                records[rec["asset_id"]] = rec
            else:
                summary["failed"] += 1
                summary["failures"].append(rec["error"])
                records[rec["asset_id"]] = rec
            bar.update(task, advance=1, status=f"{summary['generated']} new, {summary['skipped']} skipped, "
                                               f"{summary['failed']} failed")
            if time.monotonic() - last_index > cfg.index_every_s:
                job.lib.write_index(records, cfg.title)
                last_index = time.monotonic()
    records = job.lib.records()  # what the library holds, including earlier runs
    job.lib.write_index(records, cfg.title)
    summary["seconds"] = time.monotonic() - t0
    summary["meshes_per_minute"] = summary["generated"] / max(summary["seconds"], 1e-9) * 60
    summary["library_assets"] = sum(r["status"] == "ok" for r in records.values())
    summary["gallery"] = storage.join(cfg.output, "gallery.html")
    return summary


def print_summary(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="asset library")
    t.add_column("items"), t.add_column("generated"), t.add_column("skipped"), t.add_column("failed")
    t.add_column("meshes/min"), t.add_column("in library")
    t.add_row(str(summary["items"]), str(summary["generated"]), str(summary["skipped"]), str(summary["failed"]),
              f"{summary['meshes_per_minute']:.1f}", str(summary["library_assets"]))
    con = Console()
    con.print(t)
    for f in summary["failures"][:20]:
        con.print(f"  failed: {f}", markup=False, highlight=False)
    con.print(f"gallery: {redact(summary['gallery'])}", markup=False, highlight=False)
