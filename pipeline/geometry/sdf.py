"""Narrow-band sparse SDF of a normalized triangle mesh (the preprocess stage's numeric core).

Grid at resolution R: voxel width h = 2/R, voxel (i,j,k) sampled at its centre
-1 + (i+0.5)h. Kept voxels: |d| < band*h for the exact Euclidean distance d to
the triangles; stored value clip(s*|d|/(band*h), -1, 1), s = -1 inside (paper
Sec. 3.1: the SDF is truncated to the band and scaled to [-1, 1]).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from pipeline.geometry.band import band_pairs, cuda_items
from pipeline.geometry.sign import SignPrep, band_signs, prepare_sign
from model.configs import strict_from_dict

SIGN_METHODS = ("winding", "pseudonormal", "none")
BACKENDS = ("native", "mesh_to_sdf")
MAX_RESOLUTION = 1024  # linear keys (i*R+j)*R+k must fit 31 bits for the packed sort in band.py
_PAIR_BYTES = 100  # GPU memory per candidate pair of the band search (its bound, candidate_counts)


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
        return strict_from_dict(cls, d, "SDF config")


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
    # Zero-area faces carry no surface: their edges are covered by neighbours or they are noise. (Indices
    # clamped so the areas can be taken before the range is known: every check is one host read.)
    tri = v[f.clamp(0, v.shape[0] - 1)]
    ok = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1).norm(dim=1) > 1e-14
    n_bad, f_min, f_max, v_max, n_ok = torch.stack([bad.sum().double(), f.min().double(), f.max().double(),
                                                    v.abs().max(), ok.sum().double()]).tolist()
    if n_bad:
        raise ValueError(f"{int(n_bad)} vertices are NaN or infinite (first: vertex {int(bad.nonzero()[0])})")
    if f_min < 0 or f_max >= v.shape[0]:
        raise ValueError(f"face indices out of range [0, {v.shape[0]}): min {int(f_min)}, max {int(f_max)}")
    if v_max > 1.0 + 1e-6:
        raise ValueError(f"vertices outside [-1, 1]^3 (max |coordinate| {v_max:.4g}): normalize the mesh first")
    if not n_ok:
        raise ValueError(f"all {f.shape[0]} faces are degenerate (zero area)")
    return v, (f if n_ok == f.shape[0] else f[ok])


def _check_options(resolution: int, band: float, sign: str, backend: str, chunk: int) -> None:
    _check_grid(resolution, band, chunk)
    if sign not in SIGN_METHODS:
        raise ValueError(f"unknown sign method {sign!r}: expected one of {SIGN_METHODS}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown SDF backend {backend!r}: expected one of {BACKENDS}")


def _check_grid(resolution: int, band: float, chunk: int) -> None:
    if not isinstance(resolution, int) or not 2 <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"resolution must be an int in [2, {MAX_RESOLUTION}], got {resolution!r}")
    if not band > 0 or not np.isfinite(band):
        raise ValueError(f"band must be a positive number of voxel widths, got {band!r}")
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")


@dataclass
class PreparedMesh:
    """A validated mesh on the compute device with its grid-independent sign data (shared by resolutions)."""

    tri: torch.Tensor  # (F,3,3) float32 triangles, zero-area faces removed
    sign: SignPrep


def prepare_mesh(vertices, faces, sign: str = "winding", device=None) -> PreparedMesh:
    """Validate the mesh, move it to `device`, turn closed components outward and build its topology,
    pseudo-normals and winding data."""
    device = _device_of(vertices, device)
    if sign not in SIGN_METHODS:
        raise ValueError(f"unknown sign method {sign!r}: expected one of {SIGN_METHODS}")
    v64, f = validate_mesh(vertices, faces)
    v = v64.to(device=device, dtype=torch.float32)
    f = f.to(device)
    tri = v[f]
    if sign != "none":  # weld equal positions (files split at UV or normal seams) so edges are shared
        v, inv = torch.unique(v, dim=0, return_inverse=True)
        f = inv[f]
    prep, tri = prepare_sign(sign, tri, f, v)
    return PreparedMesh(tri, prep)


def _device_of(vertices, device) -> torch.device:
    if device is None:
        device = vertices.device if isinstance(vertices, torch.Tensor) else torch.device("cpu")
    return torch.device(device)


def _default_chunk(device: torch.device) -> int:
    # CPU: pieces of ~350k candidates (per-op overhead against cache). CUDA: as many as a quarter of the
    # free memory holds, so a mesh of ~100k faces at 1024^3 is one chunk (each chunk repeats ~100 small
    # kernels, a sort and host reads: the GPU path is bound by launches, not by work).
    return 1 << 20 if device.type != "cuda" else cuda_items(device, _PAIR_BYTES, 1 << 23, 1 << 27)


@torch.no_grad()
def sdf_on_grid(mesh: PreparedMesh, resolution: int, band: float = 2.0, chunk: int | None = None,
                region: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None) -> SparseSDF:
    """The narrow-band sparse SDF of a prepared mesh at one resolution; region (lo, hi), voxel indices
    with hi exclusive, keeps only the band inside that box (the triangles near it are all searched)."""
    chunk = _default_chunk(mesh.tri.device) if chunk is None else chunk
    _check_grid(resolution, band, chunk)
    h = 2.0 / resolution
    tri, ids = mesh.tri, None
    if region is not None:
        lo = torch.tensor(region[0], device=tri.device) * h - 1 - band * h
        hi = torch.tensor(region[1], device=tri.device) * h - 1 + band * h
        ids = ((tri.min(1).values <= hi) & (tri.max(1).values >= lo)).all(1).nonzero().squeeze(1)
        tri = tri[ids]
    # Signs counted along grid lines (or none) need no closest triangle: the band skips finding it.
    closest = mesh.sign.method not in ("lines", "none")
    bp = band_pairs(tri, resolution, band, chunk=chunk, closest=closest)
    coords = _decode(bp.keys, resolution)
    if region is not None:
        inside = ((coords >= torch.tensor(region[0], device=coords.device))
                  & (coords < torch.tensor(region[1], device=coords.device))).all(1).nonzero().squeeze(1)
        coords, bp.d2 = coords[inside], bp.d2[inside]
        if closest:
            bp.tri, bp.feature = ids[bp.tri[inside]], bp.feature[inside]
    points = -1.0 + (coords.float() + 0.5) * h if closest else None  # signs along lines need no points
    lines = None if region is None else (tuple(region[0][:2]), tuple(region[1][:2]))
    s = band_signs(mesh.sign, points, bp.tri, bp.feature, band * h, coords, resolution, lines)
    values = bp.d2.sqrt().mul_(s).div_(band * h).clamp_(-1.0, 1.0)
    return SparseSDF(coords, values.float(), resolution, float(band))


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
    device = _device_of(vertices, device)
    chunk = _default_chunk(device) if chunk is None else chunk
    _check_options(resolution, band, sign, backend, chunk)
    if backend == "mesh_to_sdf":
        v64, f = validate_mesh(vertices, faces)
        return _mesh_to_sdf_backend(v64, f, resolution, band, chunk, mesh_to_sdf_kwargs or {})
    return sdf_on_grid(prepare_mesh(vertices, faces, sign, device), resolution, band, chunk)


@torch.no_grad()
def sparse_sdf_multi(vertices, faces, resolutions, band: float = 2.0, **kw) -> dict[int, SparseSDF]:
    """`sparse_sdf` at several resolutions of one mesh; validation, topology, pseudo-normals and the
    winding-number structure are built once. Same keyword options as `sparse_sdf`; an error at one
    resolution names it."""
    resolutions = list(resolutions)
    if not resolutions:
        raise ValueError("resolutions is empty")
    unknown = sorted(set(kw) - {"sign", "backend", "device", "chunk", "mesh_to_sdf_kwargs"})
    if unknown:
        raise ValueError(f"unknown sparse_sdf option(s) {unknown}")
    device = _device_of(vertices, kw.get("device"))
    sign, backend, chunk = kw.get("sign", "winding"), kw.get("backend", "native"), kw.get("chunk")
    for res in resolutions:
        try:
            _check_options(res, band, sign, backend, _default_chunk(device) if chunk is None else chunk)
        except ValueError as e:
            raise ValueError(f"at resolution {res!r}: {e}") from e
    if backend == "mesh_to_sdf":
        return {res: sparse_sdf(vertices, faces, res, band, **kw) for res in resolutions}
    mesh = prepare_mesh(vertices, faces, sign, device)
    out = {}
    for res in resolutions:
        try:
            out[res] = sdf_on_grid(mesh, res, band, chunk)
        except ValueError as e:
            raise ValueError(f"at {res}^3: {e}") from e
    return out


def _decode(keys: torch.Tensor, res: int) -> torch.Tensor:
    """(N,3) int32 voxel indices of linear keys; keys < 2^30 so int32 arithmetic is exact (and faster)."""
    keys = keys.to(torch.int32)
    if res & (res - 1) == 0:  # the usual power-of-two grids: shifts and masks instead of divisions
        b = res.bit_length() - 1
        if keys.is_cuda:
            return torch.stack([keys >> (2 * b), (keys >> b) & (res - 1), keys & (res - 1)], dim=1)
        k, out = keys.numpy(), np.empty((keys.shape[0], 3), dtype=np.int32)  # numpy: 5x faster than stack
        np.right_shift(k, 2 * b, out=out[:, 0])
        np.bitwise_and(k >> b, res - 1, out=out[:, 1])
        np.bitwise_and(k, res - 1, out=out[:, 2])
        return torch.from_numpy(out)
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
