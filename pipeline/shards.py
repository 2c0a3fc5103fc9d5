"""The shard format: one Parquet row per (mesh, resolution).

This module is the one place the schema is defined; the preprocess stage writes
through ``write_shard`` and every later stage reads through ``read_samples`` or
``read_dataset``. Layout under a dataset root::

    <root>/shards/<resolution>/part-<digest>.parquet   rows of one resolution
    <root>/manifest.parquet                            what is done (rebuilt from shards)
    <root>/errors.parquet                              what failed in the last run, and why

Columns (all shards; schema metadata ``s2.schema_version``):

==================  ==========================================  =========================================
column              type                                        meaning
==================  ==========================================  =========================================
mesh_id             string                                      ``<file stem>-<first 12 hex of content_hash>``
source_uri          string                                      where the mesh was read from
content_hash        string                                      sha256 of the mesh file's bytes
config_hash         string                                      hash of the settings that shape the row
resolution          int32                                       grid resolution R (256, 512, 1024, ...)
band                float32                                     band half-width in voxel widths
num_voxels          int64                                       N
coords              large_list<fixed_size_list<int32, 3>>       voxel indices (i, j, k) in [0, R), sorted by (i*R + j)*R + k
sdf                 large_list<float32>                         clip(signed distance / (band * 2/R), -1, 1), negative inside
center              fixed_size_list<float64, 3>                 normalized = (original - center) * scale
scale               float64
face_count          int64                                       after loading (scenes flattened)
vertex_count        int64
watertight          bool
views               list<struct<png, intrinsics, extrinsics,    condition views: PNG bytes, 3x3 K (pixels,
                    elevation, azimuth>>                        row-major), 4x4 world-to-camera (OpenCV axes)
==================  ==========================================  =========================================

Voxel (i, j, k) samples the point -1 + (i + 0.5) * 2/R in the normalized cube.
Every data page carries a CRC-32 (Parquet page checksums), checked on every read: a flipped bit is
a ``ShardError`` naming the file and row group, never a silently altered row. Every row read is
checked too (``validate_sample``): coordinates within [0, R), as many SDF values as voxels, finite
values, and the resolution of the folder it sits in.
The views are repeated in each resolution's row so that a training job reading
one resolution finds its conditions in the same row.
"""

from __future__ import annotations

import hashlib
import math
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

if TYPE_CHECKING:  # imported where used: `s2 preprocess --help` reads this module's config without torch
    import torch

from pipeline import storage

SCHEMA_VERSION = "1"

VIEW_TYPE = pa.struct([
    ("png", pa.binary()),
    ("intrinsics", pa.list_(pa.float32(), 9)),
    ("extrinsics", pa.list_(pa.float32(), 16)),
    ("elevation", pa.float32()),
    ("azimuth", pa.float32()),
])

SCHEMA = pa.schema(
    [
        ("mesh_id", pa.string()),
        ("source_uri", pa.string()),
        ("content_hash", pa.string()),
        ("config_hash", pa.string()),
        ("resolution", pa.int32()),
        ("band", pa.float32()),
        ("num_voxels", pa.int64()),
        ("coords", pa.large_list(pa.list_(pa.int32(), 3))),
        ("sdf", pa.large_list(pa.float32())),
        ("center", pa.list_(pa.float64(), 3)),
        ("scale", pa.float64()),
        ("face_count", pa.int64()),
        ("vertex_count", pa.int64()),
        ("watertight", pa.bool_()),
        ("views", pa.list_(VIEW_TYPE)),
    ],
    metadata={"s2.schema_version": SCHEMA_VERSION},
)

# Columns a reader needs to know what is done, without touching the voxels.
INDEX_COLUMNS = ["mesh_id", "source_uri", "content_hash", "config_hash", "resolution", "num_voxels"]


class ShardError(ValueError):
    """A shard cannot be read or does not have our schema; the message names the file."""


class BadRow(ShardError):
    """One row of a shard fails its checks (or its pages their checksums); the message names file and mesh."""


@dataclass
class View:
    png: bytes
    intrinsics: np.ndarray  # (3, 3) float32
    extrinsics: np.ndarray  # (4, 4) float32 world-to-camera
    elevation: float
    azimuth: float


@dataclass
class SparseSDFSample:
    """One mesh at one resolution, as stored in a shard row."""

    mesh_id: str
    source_uri: str
    content_hash: str
    resolution: int
    band: float
    coords: torch.Tensor  # (N, 3) int32, zero-copy view of the Arrow buffer
    values: torch.Tensor  # (N,) float32, zero-copy view of the Arrow buffer
    center: np.ndarray
    scale: float
    face_count: int = 0
    vertex_count: int = 0
    watertight: bool = False
    views: list[View] = field(default_factory=list)

    @property
    def num_voxels(self) -> int:
        return int(self.coords.shape[0])


@dataclass
class ShardRow:
    """What the preprocess stage hands to ``write_shard`` for one (mesh, resolution)."""

    mesh_id: str
    source_uri: str
    content_hash: str
    config_hash: str
    resolution: int
    band: float
    coords: np.ndarray  # (N, 3) int32
    sdf: np.ndarray  # (N,) float32
    center: np.ndarray
    scale: float
    face_count: int
    vertex_count: int
    watertight: bool
    views: list[View]


def mesh_id_for(source_uri: str, content_hash: str) -> str:
    stem = posixpath.basename(source_uri).rsplit(".", 1)[0] or "mesh"
    return f"{stem}-{content_hash[:12]}"


def _large_list(flat: pa.Array, lengths: list[int]) -> pa.Array:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), flat)


def rows_to_table(rows: list[ShardRow]) -> pa.Table:
    """Build an Arrow table with ``SCHEMA`` from rows, without per-voxel Python work."""
    for r in rows:
        if r.coords.ndim != 2 or r.coords.shape[1] != 3 or r.sdf.shape != (r.coords.shape[0],):
            raise ShardError(f"{r.mesh_id}: coords must be (N, 3) and sdf (N,), got "
                             f"{tuple(r.coords.shape)} and {tuple(r.sdf.shape)}")
    lengths = [int(r.coords.shape[0]) for r in rows]
    flat_coords = np.concatenate([np.ascontiguousarray(r.coords, dtype=np.int32).reshape(-1) for r in rows]) \
        if rows else np.zeros(0, np.int32)
    flat_sdf = np.concatenate([np.ascontiguousarray(r.sdf, dtype=np.float32) for r in rows]) \
        if rows else np.zeros(0, np.float32)
    coords = _large_list(pa.FixedSizeListArray.from_arrays(pa.array(flat_coords), 3), lengths)
    sdf = _large_list(pa.array(flat_sdf), lengths)
    views = pa.array(
        [[{"png": v.png,
           "intrinsics": np.asarray(v.intrinsics, np.float32).reshape(9).tolist(),
           "extrinsics": np.asarray(v.extrinsics, np.float32).reshape(16).tolist(),
           "elevation": float(v.elevation), "azimuth": float(v.azimuth)} for v in r.views] for r in rows],
        type=pa.list_(VIEW_TYPE),
    )
    cols = {
        "mesh_id": pa.array([r.mesh_id for r in rows], pa.string()),
        "source_uri": pa.array([r.source_uri for r in rows], pa.string()),
        "content_hash": pa.array([r.content_hash for r in rows], pa.string()),
        "config_hash": pa.array([r.config_hash for r in rows], pa.string()),
        "resolution": pa.array([r.resolution for r in rows], pa.int32()),
        "band": pa.array([r.band for r in rows], pa.float32()),
        "num_voxels": pa.array(lengths, pa.int64()),
        "coords": coords,
        "sdf": sdf,
        "center": pa.array([np.asarray(r.center, np.float64).tolist() for r in rows], pa.list_(pa.float64(), 3)),
        "scale": pa.array([float(r.scale) for r in rows], pa.float64()),
        "face_count": pa.array([r.face_count for r in rows], pa.int64()),
        "vertex_count": pa.array([r.vertex_count for r in rows], pa.int64()),
        "watertight": pa.array([bool(r.watertight) for r in rows], pa.bool_()),
        "views": views,
    }
    return pa.Table.from_pydict(cols, schema=SCHEMA)


def shard_dir(root: str, resolution: int) -> str:
    return storage.join(root, "shards", str(int(resolution)))


def shard_name(rows: Iterable[ShardRow]) -> str:
    """A name fixed by the shard's content keys, so a retried task overwrites, never duplicates."""
    h = hashlib.sha256()
    for key in sorted(f"{r.content_hash}:{r.config_hash}:{r.resolution}" for r in rows):
        h.update(key.encode())
    return f"part-{h.hexdigest()[:20]}.parquet"


def write_shard(root: str, rows: list[ShardRow], *, storage_options: dict | None = None,
                compression: str = "zstd", compression_level: int | None = 3) -> list[tuple[str, int]]:
    """Write rows as one shard per resolution, atomically. Returns [(uri, bytes)]."""
    written = []
    by_res: dict[int, list[ShardRow]] = {}
    for r in rows:
        by_res.setdefault(int(r.resolution), []).append(r)
    for res, group in sorted(by_res.items()):
        table = rows_to_table(group)
        sink = pa.BufferOutputStream()
        # One row group per row: readers stream a mesh at a time.
        pq.write_table(table, sink, compression=compression, compression_level=compression_level,
                       row_group_size=1, write_page_checksum=True)
        data = sink.getvalue().to_pybytes()
        uri = storage.join(shard_dir(root, res), shard_name(group))
        fs, path = storage.filesystem(uri, storage_options)
        storage.write_atomic(fs, path, data)
        written.append((uri, len(data)))
    return written


def list_shards(root: str, resolution: int | None = None, *, storage_options: dict | None = None) -> list[str]:
    """Shard URIs under ``root`` (one resolution or all), sorted."""
    base = shard_dir(root, resolution) if resolution is not None else storage.join(root, "shards")
    fs, path = storage.filesystem(base, storage_options)
    if not fs.exists(path):
        return []
    return sorted(storage.full_uri(fs, p) for p in fs.find(path)
                  if p.endswith(".parquet") and not posixpath.basename(p).startswith("."))


def _open_parquet(uri: str, storage_options: dict | None) -> pq.ParquetFile:
    fs, path = storage.filesystem(uri, storage_options)
    try:
        pf = pq.ParquetFile(fs.open(path, "rb"), page_checksum_verification=True)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ShardError(f"{uri}: not a readable Parquet file ({exc})") from exc
    missing = [n for n in SCHEMA.names if n not in pf.schema_arrow.names]
    if missing:
        raise ShardError(f"{uri}: not a shard of this project (missing columns: {', '.join(missing)})")
    return pf


def samples_from_table(table: pa.Table) -> list[SparseSDFSample]:
    """Rows of a shard table as samples; voxel arrays are zero-copy views into Arrow buffers."""
    out = []
    table = table.combine_chunks()
    coords_col = table.column("coords").chunk(0) if table.num_rows else None
    sdf_col = table.column("sdf").chunk(0) if table.num_rows else None
    for i in range(table.num_rows):
        c = coords_col[i].values  # FixedSizeListArray of this row
        s = sdf_col[i].values
        # flatten() honours the row's offset and length (.values would be the whole column's child).
        c_np = c.flatten().to_numpy(zero_copy_only=True)
        s_np = s.to_numpy(zero_copy_only=True)
        n_declared = table.column("num_voxels")[i].as_py()
        if len(c_np) != 3 * len(s_np) or n_declared != len(s_np):
            raise BadRow(f"mesh {table.column('mesh_id')[i].as_py()}: {len(c_np) // 3} coordinates, {len(s_np)} SDF "
                         f"values, num_voxels {n_declared}; they must be equal")
        # Arrow buffers are read-only; the tensors share them (nothing here writes to them).
        coords = _readonly_tensor(c_np.reshape(-1, 3))
        values = _readonly_tensor(s_np)
        row = {n: table.column(n)[i] for n in ("mesh_id", "source_uri", "content_hash", "resolution", "band",
                                               "center", "scale", "face_count", "vertex_count", "watertight")}
        views = [View(png=v["png"], intrinsics=np.asarray(v["intrinsics"], np.float32).reshape(3, 3),
                      extrinsics=np.asarray(v["extrinsics"], np.float32).reshape(4, 4),
                      elevation=float(v["elevation"]), azimuth=float(v["azimuth"]))
                 for v in (table.column("views")[i].as_py() or [])] if "views" in table.column_names else []
        out.append(SparseSDFSample(
            mesh_id=row["mesh_id"].as_py(), source_uri=row["source_uri"].as_py(),
            content_hash=row["content_hash"].as_py(), resolution=int(row["resolution"].as_py()),
            band=float(row["band"].as_py()), coords=coords, values=values,
            center=np.asarray(row["center"].as_py(), np.float64), scale=float(row["scale"].as_py()),
            face_count=int(row["face_count"].as_py()), vertex_count=int(row["vertex_count"].as_py()),
            watertight=bool(row["watertight"].as_py()), views=views))
    return out


def validate_sample(sample: SparseSDFSample, resolution: int | None = None) -> None:
    """Refuse a row that would train on garbage: coords outside [0, R), non-finite SDF, wrong resolution.

    ``resolution`` is that of the folder the row was read from (``shards/<R>/``).
    """
    res = sample.resolution
    if resolution is not None and res != resolution:
        raise BadRow(f"mesh {sample.mesh_id}: resolution {res} in a folder of resolution {resolution}")
    if res < 1:
        raise BadRow(f"mesh {sample.mesh_id}: resolution {res}")
    if sample.num_voxels == 0:
        raise BadRow(f"mesh {sample.mesh_id}: no voxels")
    lo, hi = int(sample.coords.min()), int(sample.coords.max())
    if lo < 0 or hi >= res:
        raise BadRow(f"mesh {sample.mesh_id}: coordinates span [{lo}, {hi}], outside [0, {res}) at resolution {res}")
    import torch

    finite = torch.isfinite(sample.values)
    if not bool(finite.all()):
        raise BadRow(f"mesh {sample.mesh_id}: {int((~finite).sum())} non-finite SDF values")
    if not (math.isfinite(sample.scale) and np.isfinite(sample.center).all() and math.isfinite(sample.band)):
        raise BadRow(f"mesh {sample.mesh_id}: non-finite center, scale or band")


def read_row_group(pf: pq.ParquetFile, uri: str, group: int, columns: list[str] | None = None) -> pa.Table:
    """One row group, its page checksums verified; a damaged one is a BadRow naming the file and, if readable, the mesh."""
    try:
        return pf.read_row_group(group, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        try:
            mesh = pf.read_row_group(group, columns=["mesh_id"]).column(0)[0].as_py()
        except (OSError, pa.ArrowInvalid, IndexError):
            mesh = "(unreadable id)"
        raise BadRow(f"{uri}: row group {group}, mesh {mesh}: damaged ({exc})") from exc


def checked_samples(table: pa.Table, uri: str, resolution: int | None) -> list[SparseSDFSample]:
    """``samples_from_table`` plus ``validate_sample``; errors name the file."""
    try:
        out = samples_from_table(table)
        for s in out:
            validate_sample(s, resolution)
    except BadRow as exc:
        raise BadRow(f"{uri}: {exc}") from None
    return out


def _readonly_tensor(a: np.ndarray) -> torch.Tensor:
    import warnings

    import torch

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*not writable.*")
        return torch.from_numpy(a)


def read_samples(root: str, resolution: int | None = None, *, storage_options: dict | None = None,
                 on_error: str = "raise", errors: list[str] | None = None,
                 with_views: bool = True) -> Iterator[SparseSDFSample]:
    """Stream samples from every shard under ``root``, one row group at a time, each row checked.

    ``on_error="skip"`` skips unreadable shards and bad rows and appends their one-line error to
    ``errors`` (if given) instead of raising.
    """
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    columns = SCHEMA.names if with_views else [n for n in SCHEMA.names if n != "views"]
    for uri in list_shards(root, resolution, storage_options=storage_options):
        folder_res = _folder_resolution(uri)
        try:
            pf = _open_parquet(uri, storage_options)
        except ShardError as exc:
            if on_error == "raise":
                raise
            if errors is not None:
                errors.append(str(exc))
            continue
        for g in range(pf.num_row_groups):
            try:
                yield from checked_samples(read_row_group(pf, uri, g, columns), uri, folder_res)
            except ShardError as exc:
                if on_error == "raise":
                    raise
                if errors is not None:
                    errors.append(str(exc))


def _folder_resolution(uri: str) -> int | None:
    """R of ``.../shards/<R>/part-....parquet``, or None for a file elsewhere."""
    parent = posixpath.basename(posixpath.dirname(uri.replace("\\", "/")))
    return int(parent) if parent.isdigit() else None


def read_index(root: str, *, storage_options: dict | None = None) -> pa.Table:
    """The index columns of every readable shard, with a ``shard`` column; unreadable shards are skipped."""
    tables = []
    for uri in list_shards(root, storage_options=storage_options):
        try:
            pf = _open_parquet(uri, storage_options)
            t = pf.read(columns=INDEX_COLUMNS)
        except (ShardError, OSError, pa.ArrowInvalid):
            continue
        tables.append(t.append_column("shard", pa.array([uri] * t.num_rows, pa.string())))
    if not tables:
        return pa.table({**{n: pa.array([], SCHEMA.field(n).type) for n in INDEX_COLUMNS},
                         "shard": pa.array([], pa.string())})
    return pa.concat_tables(tables)


def read_dataset(root: str, resolution: int, *, storage_options: dict | None = None, **read_kwargs: Any):
    """The shards of one resolution as a Ray Dataset (rows carry the SCHEMA columns)."""
    import ray.data

    uris = list_shards(root, resolution, storage_options=storage_options)
    if not uris:
        raise ShardError(f"{root}: no shards at resolution {resolution}")
    fs, _ = storage.filesystem(uris[0], storage_options)
    paths = [storage.filesystem(u, storage_options)[1] for u in uris]
    from pyarrow.fs import PyFileSystem, FSSpecHandler

    return ray.data.read_parquet(paths, filesystem=PyFileSystem(FSSpecHandler(fs)), **read_kwargs)
