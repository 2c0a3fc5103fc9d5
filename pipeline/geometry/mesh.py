"""Load a mesh file, validate it, and normalize it into the unit cube.

Normalization (paper, data preparation): bounding-box centre to the origin and
the longest half-extent scaled to 0.95, so ``normalized = (original - center) * scale``.
"""

from __future__ import annotations

import io
import posixpath
from dataclasses import dataclass

import numpy as np

MESH_EXTENSIONS = ("obj", "ply", "stl", "off", "glb", "gltf")
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


def load_mesh(data: bytes, ext: str, *, max_faces: int = 10_000_000) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and faces of a mesh file's bytes; scenes are flattened with their node transforms."""
    import trimesh

    ext = ext.lower()
    if ext not in MESH_EXTENSIONS:
        raise MeshError(f"unsupported file type '.{ext}' (supported: {', '.join(MESH_EXTENSIONS)})")
    if not data:
        raise MeshError("empty file")
    try:
        # process=False: keep the file's own vertices, so NaNs and bad indices reach validate() instead of
        # being dropped silently.
        scene = trimesh.load_scene(io.BytesIO(data), file_type=ext, process=False)
    except MeshError:
        raise
    except Exception as exc:  # trimesh raises many types on corrupt input; name the cause, keep one line
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MeshError(f"cannot parse as .{ext}: {msg[:200]}") from exc
    meshes = []
    for node in scene.graph.nodes_geometry:
        transform, geom_name = scene.graph[node]
        geom = scene.geometry.get(geom_name)
        if isinstance(geom, trimesh.Trimesh) and len(geom.faces):
            meshes.append((np.asarray(geom.vertices, np.float64), np.asarray(geom.faces, np.int64), transform))
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
