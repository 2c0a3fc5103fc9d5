"""USD / USDA / USDC / USDZ meshes through Pixar's reader (the optional `usd-core` package)."""

from __future__ import annotations

import os
import tempfile

import numpy as np

from pipeline.geometry.polygons import triangulate


class UsdError(ValueError):
    """The stage cannot be read; ``pipeline.geometry.mesh`` turns it into its MeshError."""


def read_usd(data: bytes, ext: str) -> tuple[np.ndarray, np.ndarray]:
    """Every UsdGeom.Mesh of the stage in world space, polygons triangulated. The stage API opens paths
    only, so the bytes go through a temporary file."""
    from pxr import Usd, UsdGeom  # optional: usd-core

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"mesh.{ext}")
        with open(path, "wb") as fh:
            fh.write(data)
        try:
            stage = Usd.Stage.Open(path)
        except Exception as exc:  # pxr raises Tf errors of its own types
            raise UsdError(f"cannot parse as .{ext}: {str(exc).strip().splitlines()[0][:200]}") from exc
        cache = UsdGeom.XformCache()
        verts, faces, offset = [], [], 0
        for prim in stage.Traverse():
            if not prim.IsA(UsdGeom.Mesh):
                continue
            mesh = UsdGeom.Mesh(prim)
            points = np.asarray(mesh.GetPointsAttr().Get() or [], np.float64).reshape(-1, 3)
            counts = np.asarray(mesh.GetFaceVertexCountsAttr().Get() or [], np.int64)
            index = np.asarray(mesh.GetFaceVertexIndicesAttr().Get() or [], np.int64)
            if not len(points) or not len(counts):
                continue
            m = np.asarray(cache.GetLocalToWorldTransform(prim), np.float64)  # row-vector convention
            points = points @ m[:3, :3] + m[3, :3]
            tris, at = [], 0
            for n in counts:
                tris.extend(triangulate(points, index[at : at + n].tolist()))
                at += n
            verts.append(points)
            faces.append(np.asarray(tris, np.int64).reshape(-1, 3) + offset)
            offset += len(points)
    if not verts:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    return np.concatenate(verts), np.concatenate(faces)
