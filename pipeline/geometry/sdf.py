"""Narrow-band sparse SDF of a normalized triangle mesh (the preprocess stage's numeric core).

Grid at resolution R: voxel width h = 2/R, voxel (i,j,k) sampled at its centre
-1 + (i+0.5)h. Kept voxels: |d| < band*h for the exact Euclidean distance d to
the triangles; stored value clip(s*|d|/(band*h), -1, 1), s = -1 inside (paper
Sec. 3.1: the SDF is truncated to the band and scaled to [-1, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import numpy as np
import torch

from pipeline.geometry.band import band_pairs
from pipeline.geometry.sign import (
    WINDING_THRESHOLD,
    WindingNumber,
    boundary_feature_mask,
    feature_side,
    mesh_topology,
    pseudo_normals,
    winding_side_values,
)

SIGN_METHODS = ("winding", "pseudonormal", "none")
BACKENDS = ("native", "mesh_to_sdf")
MAX_RESOLUTION = 1024  # linear keys (i*R+j)*R+k must fit 31 bits for the packed sort in band.py


@dataclass
class SparseSDF:
    """Band voxels sorted by linear key (i*R + j)*R + k, with scaled truncated SDF values."""

    coords: torch.Tensor  # (N,3) int32 voxel indices in [0, R)
    values: torch.Tensor  # (N,) float32 in [-1, 1]
    resolution: int
    band: float  # band half-width in voxel widths

    @property
    def voxel_size(self) -> float:
        return 2.0 / self.resolution

    def distance(self) -> torch.Tensor:
        """Signed distance in normalized mesh units (values times band*h)."""
        return self.values * (self.band * self.voxel_size)

    def centers(self) -> torch.Tensor:
        """(N,3) float32 sample points of the voxels."""
        return -1.0 + (self.coords.float() + 0.5) * self.voxel_size


@dataclass
class SDFConfig:
    """Options of `sparse_sdf`; unknown keys are errors (see `from_dict`)."""

    resolution: int = 512
    band: float = 2.0
    sign: str = "winding"
    backend: str = "native"
    chunk: int | None = None  # candidate (voxel, triangle) pairs per chunk, bounds peak memory; None: by device
    mesh_to_sdf_kwargs: dict = field(default_factory=lambda: {"surface_point_method": "sample", "sign_method": "normal"})

    @classmethod
    def from_dict(cls, d: dict) -> "SDFConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown SDF config key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


def _as_tensor(x, dtype) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x.detach().to(dtype)
    return torch.as_tensor(np.asarray(x), dtype=dtype)


def validate_mesh(vertices, faces) -> tuple[torch.Tensor, torch.Tensor]:
    """Checked float64 vertices (V,3) and int64 faces (F,3), zero-area faces removed; ValueError otherwise."""
    v = _as_tensor(vertices, torch.float64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must have shape (V, 3), got {tuple(v.shape)}")
    if isinstance(faces, torch.Tensor):
        if faces.is_floating_point():
            raise ValueError(f"faces must be integers, got {faces.dtype}")
    elif not np.issubdtype(np.asarray(faces).dtype, np.integer) and np.asarray(faces).size:
        raise ValueError(f"faces must be integers, got {np.asarray(faces).dtype}")
    f = _as_tensor(faces, torch.int64)
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"faces must have shape (F, 3), got {tuple(f.shape)}")
    if v.shape[0] == 0 or f.shape[0] == 0:
        raise ValueError(f"empty mesh: {v.shape[0]} vertices, {f.shape[0]} faces")
    bad = ~torch.isfinite(v).all(dim=1)
    if bad.any():
        raise ValueError(f"{int(bad.sum())} vertices are NaN or infinite (first: vertex {int(bad.nonzero()[0])})")
    if f.min() < 0 or f.max() >= v.shape[0]:
        raise ValueError(f"face indices out of range [0, {v.shape[0]}): min {int(f.min())}, max {int(f.max())}")
    if v.abs().max() > 1.0 + 1e-6:
        raise ValueError(f"vertices outside [-1, 1]^3 (max |coordinate| {float(v.abs().max()):.4g}): normalize the mesh first")
    tri = v[f]
    area2 = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1).norm(dim=1)
    # Zero-area faces carry no surface: their edges are covered by neighbours or they are noise.
    ok = area2 > 1e-14
    if not ok.any():
        raise ValueError(f"all {f.shape[0]} faces are degenerate (zero area)")
    return v, f[ok]


def _check_options(resolution: int, band: float, sign: str, backend: str, chunk: int) -> None:
    if not isinstance(resolution, int) or not 2 <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be an int in [2, {MAX_RESOLUTION}], got {resolution!r}")
    if not band > 0 or not np.isfinite(band):
        raise ValueError(f"band must be a positive number of voxel widths, got {band!r}")
    if sign not in SIGN_METHODS:
        raise ValueError(f"unknown sign method {sign!r}: expected one of {SIGN_METHODS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown SDF backend {backend!r}: expected one of {BACKENDS}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


def _signs(sign, points, tri, faces, tri_id, feature, num_vertices):
    """-1 inside, +1 outside for each band voxel (see sign.py for the method)."""
    if sign == "none":
        return torch.ones(points.shape[0], dtype=points.dtype, device=points.device)
    topo = mesh_topology(faces, num_vertices)
    normals = pseudo_normals(tri, topo, faces, num_vertices)
    side = feature_side(points, tri, faces, tri_id, feature, normals, topo)
    if sign == "pseudonormal" or (topo.closed and topo.components == 1):
        return side
    wn = WindingNumber(tri)
    by_side = winding_side_values(tri, wn)  # (F,2): outer, inner
    w = by_side[tri_id, (side < 0).long()]
    near_open = boundary_feature_mask(faces, tri_id, feature, topo, num_vertices)
    if near_open.any():
        w[near_open] = wn(points[near_open])
    return torch.where(w >= WINDING_THRESHOLD, -1.0, 1.0).to(points.dtype)


@torch.no_grad()
def sparse_sdf(
    vertices,
    faces,
    resolution: int,
    band: float = 2.0,
    *,
    sign: str = "winding",
    backend: str = "native",
    device=None,
    chunk: int | None = None,
    mesh_to_sdf_kwargs: dict | None = None,
) -> SparseSDF:
    """Narrow-band sparse SDF of a mesh normalized into [-1, 1]^3.

    sign: "winding" (inside iff generalized winding number >= 0.5; right for open
    and multi-shell meshes), "pseudonormal" (local, for closed meshes) or "none"
    (unsigned). backend "mesh_to_sdf" evaluates the optional reference library on
    the native band's voxels. device: where to compute (default: the input
    tensor's device, else CPU); on CUDA the distance runs as a Triton kernel.
    """
    if device is None:
        device = vertices.device if isinstance(vertices, torch.Tensor) else torch.device("cpu")
    device = torch.device(device)
    if chunk is None:  # CPU: cache-sized pieces are fastest; GPU: 8M pairs fill it and stay under 1 GiB
        chunk = 1 << 23 if device.type == "cuda" else 1 << 18
    _check_options(resolution, band, sign, backend, chunk)
    v64, f = validate_mesh(vertices, faces)
    if backend == "mesh_to_sdf":
        return _mesh_to_sdf_backend(v64, f, resolution, band, chunk, mesh_to_sdf_kwargs or {})
    v = v64.to(device=device, dtype=torch.float32)
    f = f.to(device)
    tri = v[f]
    bp = band_pairs(tri, resolution, band, chunk=chunk)
    coords = _decode(bp.keys, resolution)
    h = 2.0 / resolution
    points = -1.0 + (coords.float() + 0.5) * h
    s = _signs(sign, points, tri, f, bp.tri, bp.feature, v.shape[0])
    values = (s * bp.d2.sqrt() / (band * h)).clamp(-1.0, 1.0)
    return SparseSDF(coords, values.float(), resolution, float(band))


def _decode(keys: torch.Tensor, res: int) -> torch.Tensor:
    """(N,3) int32 voxel indices of linear keys; keys < 2^30 so int32 arithmetic is exact (and faster)."""
    keys = keys.to(torch.int32)
    ij = torch.div(keys, res, rounding_mode="floor")
    i = torch.div(ij, res, rounding_mode="floor")
    return torch.stack([i, ij - i * res, keys - ij * res], dim=1)


def _mesh_to_sdf_backend(v64, f, resolution, band, chunk, kwargs) -> SparseSDF:
    """mesh-to-sdf's values on the voxels of a one-voxel-wider native band (reference and baseline)."""
    try:
        import mesh_to_sdf
        import trimesh
    except ImportError as e:  # optional extra: pip install s2ray[reference]
        raise ValueError(f"backend 'mesh_to_sdf' needs the optional package mesh-to-sdf ({e})") from e
    wide = sparse_sdf(v64, f, resolution, band + 1.0, sign="none", chunk=chunk)
    mesh = trimesh.Trimesh(v64.numpy(), f.numpy(), process=False)
    pts = wide.centers().double().numpy()
    d = torch.as_tensor(mesh_to_sdf.mesh_to_sdf(mesh, pts, **kwargs), dtype=torch.float32)
    h = 2.0 / resolution
    keep = d.abs() < band * h
    return SparseSDF(wide.coords[keep], (d[keep] / (band * h)).clamp(-1, 1), resolution, float(band))
