"""Load a mesh file, validate it, and normalize it into the unit cube.

Normalization (paper, data preparation): bounding-box centre to the origin and
the longest half-extent scaled to 0.95, so ``normalized = (original - center) * scale``.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass

import numpy as np

from pipeline.geometry.usd import UsdError, read_usd

MESH_EXTENSIONS = ("obj", "ply", "stl", "off", "glb", "gltf", "dae", "usd", "usda", "usdc", "usdz", "fbx")
# Formats read by an optional package: extension -> (module to import, pip name).
_OPTIONAL_READERS = {"dae": ("collada", "pycollada"), "usd": ("pxr", "usd-core"), "usda": ("pxr", "usd-core"),
                     "usdc": ("pxr", "usd-core"), "usdz": ("pxr", "usd-core")}
_CONVERT = "convert it to .glb (Blender: File > Export > glTF 2.0; or `assimp export in.{ext} out.glb`)"
# Files that sit beside meshes in real corpora and are not inputs themselves.
SIDECAR_EXTENSIONS = ("mtl", "json", "md", "txt", "png", "jpg", "jpeg", "bin", "csv")


class MeshError(ValueError):
    """The mesh cannot be used; the message says why (the caller adds the item's name)."""


@dataclass
class NormalizedMesh:
    vertices: np.ndarray  # (V, 3) float64, in [-0.95, 0.95]^3
    faces: np.ndarray  # (F, 3) int64
    center: np.ndarray  # (3,) float64
    scale: float
    watertight: bool

    @property
    def face_count(self) -> int:
        return int(self.faces.shape[0])

    @property
    def vertex_count(self) -> int:
        return int(self.vertices.shape[0])


def extension(uri: str) -> str:
    name = posixpath.basename(uri).lower()
    return name.rsplit(".", 1)[1] if "." in name else ""


def load_mesh(data: bytes, ext: str, *, max_faces: int = 10_000_000, resolver=None) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and faces of a mesh file's bytes; scenes are flattened with their node transforms.

    resolver: trimesh resolver for files the mesh refers to (a .gltf's buffers, an .obj's .mtl).
    """
    ext = ext.lower()
    if ext not in MESH_EXTENSIONS:
        raise MeshError(f"unsupported file type '.{ext}' (supported: {', '.join(MESH_EXTENSIONS)})")
    if not data:
        raise MeshError("empty file")
    if ext == "fbx":  # no maintained reader installs with pip
        raise MeshError("FBX has no pip-installable reader: " + _CONVERT.format(ext=ext))
    if ext in _OPTIONAL_READERS:
        module, pip_name = _OPTIONAL_READERS[ext]
        try:
            __import__(module)
        except ImportError:
            raise MeshError(f"reading .{ext} needs the optional package {pip_name} (pip install {pip_name}), "
                            "or " + _CONVERT.format(ext=ext)) from None
        if module == "pxr":
            try:
                verts, faces = read_usd(data, ext)
            except UsdError as e:
                raise MeshError(str(e)) from e
            return _check_faces(verts, faces, max_faces)
    meshes = _load_scene(data, ext, resolver)
    if not meshes:
        raise MeshError("no triangles (the file holds no faces)")
    total_faces = sum(f.shape[0] for _, f, _ in meshes)
    if total_faces > max_faces:
        raise MeshError(f"{total_faces:,} faces is over the limit of {max_faces:,} (max_faces)")
    verts, faces, offset = [], [], 0
    for v, f, t in meshes:
        if f.min() < 0 or f.max() >= len(v):
            raise MeshError(f"face index out of range (faces reference vertex {int(f.max())}, "
                            f"the mesh has {len(v)})")
        v = v @ np.asarray(t[:3, :3]).T + np.asarray(t[:3, 3])
        verts.append(v)
        faces.append(f + offset)
        offset += len(v)
    return np.concatenate(verts), np.concatenate(faces)


def _check_faces(v: np.ndarray, f: np.ndarray, max_faces: int) -> tuple[np.ndarray, np.ndarray]:
    if len(f) == 0:
        raise MeshError("no triangles (the file holds no faces)")
    if len(f) > max_faces:
        raise MeshError(f"{len(f):,} faces is over the limit of {max_faces:,} (max_faces)")
    return v, f


def _load_scene(data: bytes, ext: str, resolver) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(vertices, faces, transform) of every triangle geometry of the file, by trimesh; an OFF file
    trimesh cannot triangulate is read by our own polygon reader."""
    import trimesh

    try:
        # process=False: keep the file's own vertices, so NaNs and bad indices reach validate() instead of
        # being dropped silently.
        scene = trimesh.load_scene(io.BytesIO(data), file_type=ext, process=False, resolver=resolver)
    except Exception as exc:  # trimesh raises many types on corrupt input; name the cause, keep one line
        if ext == "off":
            from pipeline.geometry.polygons import PolygonError, read_off

            try:
                v, f = read_off(data)
            except PolygonError as own:
                raise MeshError(f"cannot parse as .off: {own}") from exc
            return [(v, f, np.eye(4))] if len(f) else []
        raise MeshError(f"cannot parse as .{ext}: {_reason(exc)}") from exc
    meshes = []
    for node in scene.graph.nodes_geometry:
        transform, geom_name = scene.graph[node]
        geom = scene.geometry.get(geom_name)
        if isinstance(geom, trimesh.Trimesh) and len(geom.faces):
            meshes.append((np.asarray(geom.vertices, np.float64), np.asarray(geom.faces, np.int64), transform))
    return meshes


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    msg = text.splitlines()[0] if text else type(exc).__name__
    if "draco" in text.lower():
        msg = "Draco-compressed geometry (decompress first, e.g. `gltf-transform copy in.glb out.glb`)"
    elif isinstance(exc, (FileNotFoundError, KeyError)) or "resolver" in text.lower():
        msg = f"a file it refers to is missing ({msg}): keep .bin/.mtl/textures beside it or use .glb"
    return msg[:200]


def validate(vertices: np.ndarray, faces: np.ndarray) -> None:
    if vertices.ndim != 2 or vertices.shape[1] != 3:
        raise MeshError(f"vertices must be (V, 3), got {vertices.shape}")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise MeshError(f"faces must be triangles (F, 3), got {faces.shape}")
    if len(faces) == 0:
        raise MeshError("no triangles (the file holds no faces)")
    if not np.isfinite(vertices).all():
        bad = int((~np.isfinite(vertices)).any(axis=1).sum())
        raise MeshError(f"{bad} vertices are NaN or infinite")
    if faces.min() < 0 or faces.max() >= len(vertices):
        raise MeshError(f"face index out of range (max {int(faces.max())}, {len(vertices)} vertices)")
    used = vertices[np.unique(faces)]
    extent = used.max(axis=0) - used.min(axis=0)
    if not (extent.max() > 0):
        raise MeshError("degenerate mesh: all vertices coincide")
    # A surface needs two independent directions; vertices on (or within rounding of) one line have none.
    centred = used - used.mean(axis=0)
    sv = np.linalg.svd(centred[:: max(1, len(centred) // 100_000)], compute_uv=False)
    if sv[1] <= 1e-4 * sv[0]:
        raise MeshError(f"degenerate mesh: all {len(used)} vertices lie on one line (no surface)")


def normalize(vertices: np.ndarray, faces: np.ndarray, *, half_extent: float = 0.95) -> NormalizedMesh:
    """Centre the bounding box of the used vertices at the origin; longest half-extent -> ``half_extent``."""
    import trimesh

    validate(vertices, faces)
    used = np.unique(faces)
    # Drop vertices no face uses, so stray points cannot stretch the bounding box.
    remap = np.full(len(vertices), -1, np.int64)
    remap[used] = np.arange(len(used))
    v = vertices[used]
    f = remap[faces]
    lo, hi = v.min(axis=0), v.max(axis=0)
    center = (lo + hi) / 2.0
    scale = half_extent / float((hi - lo).max() / 2.0)
    v = (v - center) * scale
    watertight = bool(trimesh.Trimesh(v, f, process=True, validate=False).is_watertight)
    return NormalizedMesh(vertices=v, faces=f, center=center, scale=scale, watertight=watertight)
