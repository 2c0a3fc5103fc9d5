"""Condition views: grey shaded renders of a normalized mesh from random cameras, on the CPU.

A vectorized z-buffer rasterizer in PyTorch (no OpenGL, no system packages, no GPU).

Conventions
- World: the mesh lies in [-1, 1]^3 with +Y up (glTF's convention, which trimesh keeps).
- Camera on a sphere around the origin, looking at it: elevation is the angle above the XZ
  plane (towards +Y), azimuth the angle about +Y measured from +Z towards +X, both in degrees.
- Extrinsics: 4x4 world-to-camera [R | t] in OpenCV's convention (x right, y down, z forward),
  so a world point X lands at pixel K @ (R @ X + t) after dividing by its z.
- Intrinsics: 3x3 pinhole K in pixels; pixel centres at integer coordinates (OpenCV), so the
  principal point of a W x H image is ((W - 1) / 2, (H - 1) / 2).
- Image: H x W x 4 uint8 RGBA; RGB is already composited over the background colour (use
  image[..., :3] directly as the condition image) and alpha is the object's coverage.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
from dataclasses import dataclass

import numpy as np
import torch

_NEAR = 1e-3
_EDGE_TOLERANCE_PX = 1e-7  # a pixel centre this close outside an edge still counts: shared edges leave no gaps
_CHUNK = 1 << 22  # pixel candidates z-tested per step
_FACE_BATCH = 1 << 19  # faces set up per step; with _CHUNK this bounds memory for huge meshes


CAMERA_KEY = "s2ray:camera"  # PNG text chunk holding the camera a view was rendered from


@dataclass(frozen=True)
class Camera:
    """Where a view looks from: the angles of ``render_view``, its field of view and distance.

    ``radius`` None fits the mesh in the view (``render_view``'s default); ``source`` says where the camera
    came from: "image" (read from the input view) or "front" (``FRONT_CAMERA``, the input's is unknown)."""

    elevation: float
    azimuth: float
    fov_deg: float = 40.0
    radius: float | None = None
    source: str = "front"

    def to_json(self) -> str:
        return json.dumps({"elevation": self.elevation, "azimuth": self.azimuth, "fov_deg": self.fov_deg,
                           "radius": self.radius}, sort_keys=True)

    def as_dict(self) -> dict:
        return {"elevation": self.elevation, "azimuth": self.azimuth, "fov_deg": self.fov_deg,
                "radius": self.radius, "source": self.source}


# The front view for inputs without a camera (photos): glTF's convention, an asset's front faces +Z with +Y up
# (the release's code names no front; its own renders use a 40-degree field of view). On +Z at the horizon.
FRONT_CAMERA = Camera(elevation=0.0, azimuth=0.0, fov_deg=40.0, radius=None, source="front")


def read_camera(image: bytes) -> Camera | None:
    """The camera a PNG was rendered from (``View.png(camera=True)``); None for any other image.

    A value out of range is dropped (None, or a fitted distance for a radius inside [-1, 1]^3), never
    an error: the camera only places a preview."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(image)) as im:
            raw = im.info.get(CAMERA_KEY)
        d = json.loads(raw) if isinstance(raw, str) else None
        el, az, fov = float(d["elevation"]), float(d["azimuth"]), float(d.get("fov_deg", 40.0))
        radius = d.get("radius")
        radius = float(radius) if radius is not None else None
    except Exception:  # not an image, no chunk, or a chunk that does not parse: no camera
        return None
    if not (math.isfinite(el) and math.isfinite(az) and -90.0 < el < 90.0 and 1.0 <= fov <= 150.0):
        return None
    if radius is not None and not (math.isfinite(radius) and radius > math.sqrt(3.0)):
        radius = None
    return Camera(el, az % 360.0, fov, radius, source="image")


@dataclass
class View:
    """One rendered view and the camera that made it."""

    image: np.ndarray  # (H, W, 4) uint8: RGB over the background, alpha = coverage
    intrinsics: np.ndarray  # (3, 3) float32 pinhole K in pixels
    extrinsics: np.ndarray  # (4, 4) float32 world-to-camera, OpenCV axes
    elevation: float  # degrees above the XZ plane
    azimuth: float  # degrees about +Y from +Z towards +X

    @property
    def rgb(self) -> np.ndarray:
        return self.image[..., :3]

    @property
    def alpha(self) -> np.ndarray:
        return self.image[..., 3]

    @property
    def camera(self) -> Camera:
        """The camera as angles, field of view and distance (what a preview from this view needs)."""
        fov = math.degrees(2.0 * math.atan((self.image.shape[1] / 2.0) / float(self.intrinsics[0, 0])))
        radius = float(np.linalg.norm(self.extrinsics[:3, 3]))
        return Camera(self.elevation, self.azimuth, round(fov, 4), round(radius, 6), source="image")

    def png(self, camera: bool = False) -> bytes:
        """RGBA PNG bytes; the same image always gives the same bytes (fixed settings). Without ``camera``
        there is no metadata; with it, the camera rides along in a text chunk (``read_camera``)."""
        from PIL import Image
        from PIL.PngImagePlugin import PngInfo

        info = None
        if camera:
            info = PngInfo()
            info.add_text(CAMERA_KEY, self.camera.to_json())
        buf = io.BytesIO()
        Image.fromarray(self.image, mode="RGBA").save(buf, format="PNG", compress_level=6, pnginfo=info)
        return buf.getvalue()


@dataclass
class Raster:
    """Per-pixel result of rasterization: which face is visible, how far, and where on it."""

    face: torch.Tensor  # (H, W) int64, -1 where nothing is hit
    depth: torch.Tensor  # (H, W) float32 camera-space z, inf where nothing is hit
    bary: torch.Tensor  # (H, W, 3) float32 perspective-correct barycentric weights of the face's corners


def intrinsics_matrix(width: int, height: int, fov_deg: float) -> np.ndarray:
    """Pinhole K with a horizontal field of view `fov_deg` and square pixels."""
    f = (width / 2.0) / math.tan(math.radians(fov_deg) / 2.0)
    return np.array([[f, 0.0, (width - 1) / 2.0], [0.0, f, (height - 1) / 2.0], [0.0, 0.0, 1.0]], dtype=np.float32)


def camera_center(elevation: float, azimuth: float, radius: float) -> np.ndarray:
    el, az = math.radians(elevation), math.radians(azimuth)
    return radius * np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])


def look_at_extrinsics(elevation: float, azimuth: float, radius: float) -> np.ndarray:
    """World-to-camera 4x4 (OpenCV axes) for a camera on the sphere looking at the origin, +Y up."""
    c = camera_center(elevation, azimuth, radius)
    forward = -c / np.linalg.norm(c)
    right = np.cross(forward, [0.0, 1.0, 0.0])
    if np.linalg.norm(right) < 1e-9:  # straight above or below: any right vector will do
        right = np.array([1.0, 0.0, 0.0])
    right /= np.linalg.norm(right)
    down = np.cross(forward, right)
    rot = np.stack([right, down, forward])
    ext = np.eye(4)
    ext[:3, :3] = rot
    ext[:3, 3] = -rot @ c
    return ext.astype(np.float32)


def _check_mesh(vertices, faces) -> tuple[torch.Tensor, torch.Tensor]:
    v = torch.as_tensor(np.asarray(vertices), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(faces))
    if v.ndim != 2 or v.shape[1] != 3 or len(v) == 0:
        raise ValueError(f"vertices: expected a non-empty (V, 3) array, got shape {tuple(v.shape)}")
    if f.ndim != 2 or f.shape[1] != 3 or len(f) == 0:
        raise ValueError(f"faces: expected a non-empty (F, 3) array of triangles, got shape {tuple(f.shape)}")
    if f.is_floating_point() or f.dtype == torch.bool:
        raise ValueError(f"faces: expected integer vertex indices, got {f.dtype}")
    f = f.long()
    if not torch.isfinite(v).all():
        raise ValueError(
            f"vertices: {int((~torch.isfinite(v)).any(1).sum())} of {len(v)} have NaN or infinite coordinates"
        )
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"faces: vertex index out of range [0, {len(v)}): min {int(f.min())}, max {int(f.max())}")
    return v, f


@contextlib.contextmanager
def _one_thread():
    """Run on one intra-op thread: these small scatter-heavy ops gain nothing from more, and on a busy
    machine the thread pool's synchronisation made a view up to 40x slower; parallelism comes from
    rendering many meshes at once (one Ray task each). The previous setting is restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _barycentric_planes(px: torch.Tensor, py: torch.Tensor):
    """Screen-space barycentrics of each face as affine functions b_k(x, y) = ea_k x + eb_k y + ec_k.

    Each is the edge function of the edge opposite corner k over twice the signed area, so the
    winding does not matter; also returns twice the signed area and each edge's length."""
    area2 = (px[:, 1] - px[:, 0]) * (py[:, 2] - py[:, 0]) - (px[:, 2] - px[:, 0]) * (py[:, 1] - py[:, 0])
    nxt, prv = [1, 2, 0], [2, 0, 1]
    safe = torch.where(area2 == 0, torch.ones_like(area2), area2)[:, None]
    ea = -(py[:, prv] - py[:, nxt]) / safe
    eb = (px[:, prv] - px[:, nxt]) / safe
    ec = -(ea * px[:, nxt] + eb * py[:, nxt])
    edge_len = torch.hypot(px[:, prv] - px[:, nxt], py[:, prv] - py[:, nxt])
    return ea, eb, ec, area2, edge_len


def _scatter_faces(px, py, inv_z, face_ids, key_buf, height: int, width: int) -> None:
    """Z-test one batch of faces ((B, 3) screen corners, 1/z) into key_buf (float32 depth bits << 32 | face id)."""
    ea, eb, ec, area2, edge_len = _barycentric_planes(px, py)
    live = area2.abs() > 1e-12  # edge-on faces cover no pixel centre; their neighbours do
    live &= (px.max(1).values >= 0) & (px.min(1).values <= width - 1)
    live &= (py.max(1).values >= 0) & (py.min(1).values <= height - 1)
    keep = live.nonzero().squeeze(1)
    px, py, inv_z, face_ids = px[keep], py[keep], inv_z[keep], face_ids[keep]
    ea, eb, ec = ea[keep], eb[keep], ec[keep]
    tol = _EDGE_TOLERANCE_PX * edge_len[keep] / area2[keep].abs()[:, None]

    # one row of pixel centres per (face, row) in the face's bounding box ...
    y0 = py.min(1).values.ceil().clamp(min=0).long()
    y1 = py.max(1).values.floor().clamp(max=height - 1).long()
    xlo = px.min(1).values.ceil().clamp(min=0)
    xhi = px.max(1).values.floor().clamp(max=width - 1)
    rows_per_face = (y1 - y0 + 1).clamp(min=0)
    rf = torch.repeat_interleave(torch.arange(len(keep)), rows_per_face)
    first_row = torch.cumsum(rows_per_face, 0) - rows_per_face
    ry = (y0[rf] + torch.arange(len(rf)) - first_row[rf]).double()
    # ... then the exact span of x where all three barycentrics are >= -tol on that row
    a, rest = ea[rf], eb[rf] * ry[:, None] + ec[rf] + tol[rf]
    bound = -rest / torch.where(a == 0, torch.ones_like(a), a)
    lower = torch.where(a > 0, bound, torch.full_like(a, -math.inf)).max(1).values
    upper = torch.where(a < 0, bound, torch.full_like(a, math.inf)).min(1).values
    blocked = ((a == 0) & (rest < 0)).any(1)
    xl = torch.maximum(lower.ceil(), xlo[rf])
    xr = torch.minimum(upper.floor(), xhi[rf])
    span = torch.where(blocked, torch.zeros_like(xl), (xr - xl + 1).clamp(min=0)).long()
    # 1/z is affine in screen space: 1/z = ia x + (ib y + ic), the bracket fixed per row
    ia, ib, ic = ((coef * inv_z).sum(1) for coef in (ea, eb, ec))
    row_inv_z = ib[rf] * ry + ic[rf]
    row_ia = ia[rf]
    row_face = face_ids[rf]

    ends = torch.cumsum(span, 0)
    start = 0
    while start < len(span):
        stop = int(torch.searchsorted(ends, ends[start] - span[start] + _CHUNK, right=True).clamp(min=start + 1))
        s = span[start:stop]
        r = torch.repeat_interleave(torch.arange(start, stop), s)
        offset = torch.arange(len(r)) - (torch.cumsum(s, 0) - s).repeat_interleave(s)
        cx = xl[r] + offset
        depth = 1.0 / (row_ia[r] * cx + row_inv_z[r])
        key = (depth.float().view(torch.int32).long() << 32) | row_face[r]
        key_buf.scatter_reduce_(0, ry[r].long() * width + cx.long(), key, reduce="amin")
        start = stop


@_one_thread()
def rasterize(vertices, faces, intrinsics, extrinsics, height: int, width: int) -> Raster:
    """Z-buffer rasterization of triangles seen through K [R | t] (OpenCV axes), both sides of every face.

    Pixel centres inside a triangle, or on its edge within a tiny tolerance, are covered, so
    triangles that share an edge leave no gap; the nearest face wins, ties go to the lower index.
    Faces go through in batches, so memory stays bounded for meshes of millions of faces.
    """
    v, f = _check_mesh(vertices, faces)
    K = torch.as_tensor(np.asarray(intrinsics), dtype=torch.float64)
    E = torch.as_tensor(np.asarray(extrinsics), dtype=torch.float64)
    cam = v @ E[:3, :3].T + E[:3, 3]
    z = cam[:, 2]
    if (z[f] <= _NEAR).any():
        raise ValueError("mesh reaches behind the camera: move the camera further out (larger radius)")
    x = K[0, 0] * cam[:, 0] / z + K[0, 1] * cam[:, 1] / z + K[0, 2]
    y = K[1, 1] * cam[:, 1] / z + K[1, 2]

    # z-buffer of one int64 key per pixel: float32 depth bits (monotone for positive floats), then face id
    empty = torch.iinfo(torch.int64).max
    key_buf = torch.full((height * width,), empty, dtype=torch.int64)
    for lo in range(0, len(f), _FACE_BATCH):
        fb = f[lo : lo + _FACE_BATCH]
        _scatter_faces(x[fb], y[fb], 1.0 / z[fb], torch.arange(lo, lo + len(fb)), key_buf, height, width)

    pix = (key_buf != empty).nonzero().squeeze(1)
    won = key_buf[pix] & 0xFFFFFFFF
    face = torch.full((height * width,), -1, dtype=torch.int64)
    face[pix] = won
    depth_img = torch.full((height * width,), math.inf, dtype=torch.float32)
    depth_img[pix] = (key_buf[pix] >> 32).int().view(torch.float32)
    # perspective-correct barycentrics: weight each corner by its 1/z, then renormalize
    fw = f[won]
    ea, eb, ec, _, _ = _barycentric_planes(x[fw], y[fw])
    cx, cy = (pix % width).double(), (pix // width).double()
    b = (ea * cx[:, None] + eb * cy[:, None] + ec).clamp(min=0) / z[fw]
    b = b / b.sum(1, keepdim=True).clamp(min=1e-30)
    bary_img = torch.zeros((height * width, 3), dtype=torch.float32)
    bary_img[pix] = b.float()
    return Raster(face.view(height, width), depth_img.view(height, width), bary_img.view(height, width, 3))


@dataclass(frozen=True)
class Lighting:
    """Grey clay look: Lambert from a key and a fill light fixed to the camera, ambient and a rim term."""

    albedo: float = 0.62
    ambient: float = 0.28
    key: tuple[float, float, float, float] = (
        -0.45,
        -0.65,
        -0.6,
        0.75,
    )  # direction towards the light (camera axes), strength
    fill: tuple[float, float, float, float] = (0.7, -0.1, -0.7, 0.25)
    rim: float = 0.12  # brightens grazing angles so silhouettes read against a light background
    back_face: float = 0.8  # the inside of an open surface is drawn a little darker


def _corner_normals(v: torch.Tensor, f: torch.Tensor, smooth_deg: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Face normals (F, 3) and per-corner normals (F, 3, 3): smooth across edges flatter than smooth_deg."""
    cross = torch.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]], dim=1)
    face_n = cross / cross.norm(dim=1, keepdim=True).clamp(min=1e-30)
    vert_n = torch.zeros_like(v).index_add_(0, f.reshape(-1), cross.repeat_interleave(3, 0))  # area-weighted
    vert_n = vert_n / vert_n.norm(dim=1, keepdim=True).clamp(min=1e-30)
    corner = vert_n[f]
    sharp = (corner * face_n[:, None]).sum(-1) < math.cos(math.radians(smooth_deg))
    corner = torch.where(sharp[..., None], face_n[:, None].expand_as(corner), corner)
    return face_n, corner


@_one_thread()
def shade(
    raster: Raster,
    vertices,
    faces,
    intrinsics,
    extrinsics,
    *,
    background=(255, 255, 255),
    lighting: Lighting = Lighting(),
    smooth_deg: float = 35.0,
) -> torch.Tensor:
    """Shade a raster into (H, W, 4) float RGBA in [0, 1], RGB composited over `background` (0-255)."""
    v, f = _check_mesh(vertices, faces)
    height, width = raster.face.shape
    rot = torch.as_tensor(np.asarray(extrinsics), dtype=torch.float64)[:3, :3]
    K = torch.as_tensor(np.asarray(intrinsics), dtype=torch.float64)
    hit = raster.face >= 0
    fid = raster.face[hit]
    face_n, corner_n = _corner_normals(v, f, smooth_deg)
    n = torch.einsum("pk,pkc->pc", raster.bary[hit].double(), corner_n[fid]) @ rot.T  # camera axes
    n = n / n.norm(dim=1, keepdim=True).clamp(min=1e-30)
    # view ray through each pixel centre, camera axes
    ys, xs = hit.nonzero(as_tuple=True)
    ray = torch.stack(
        [
            (xs.double() - K[0, 2]) / K[0, 0],
            (ys.double() - K[1, 2]) / K[1, 1],
            torch.ones_like(xs, dtype=torch.float64),
        ],
        1,
    )
    ray = ray / ray.norm(dim=1, keepdim=True)
    back = ((face_n[fid] @ rot.T) * ray).sum(1) > 0  # the face turns away: we see its back side
    n = torch.where(back[:, None], -n, n)
    light = torch.full((len(fid),), lighting.ambient, dtype=torch.float64)
    for lx, ly, lz, strength in (lighting.key, lighting.fill):
        d = torch.tensor([lx, ly, lz], dtype=torch.float64)
        light += strength * (n @ (d / d.norm())).clamp(min=0)
    facing = (-(n * ray).sum(1)).clamp(0, 1)
    value = lighting.albedo * light * torch.where(back, lighting.back_face, 1.0) + lighting.rim * (1 - facing) ** 3
    value = value.clamp(0, 1) ** (1 / 2.2)  # linear light to display gamma
    bg = torch.tensor(background, dtype=torch.float64) / 255.0
    rgb = bg.expand(height, width, 3).clone()
    rgb[hit] = value[:, None].expand(-1, 3)
    return torch.cat([rgb, hit.double()[..., None]], dim=-1)


def _validate(n_views, size, elevation, fov_deg, radius, background, supersample) -> None:
    if not isinstance(n_views, int) or n_views < 1:
        raise ValueError(f"n_views: expected a positive integer, got {n_views!r}")
    if not isinstance(size, int) or size < 8:
        raise ValueError(f"size: expected an integer >= 8 pixels, got {size!r}")
    lo, hi = elevation
    if not -90.0 < lo <= hi < 90.0:
        raise ValueError(f"elevation: expected (low, high) degrees with -90 < low <= high < 90, got {elevation!r}")
    if not 1.0 <= fov_deg <= 150.0:
        raise ValueError(f"fov_deg: expected 1 to 150 degrees, got {fov_deg!r}")
    if radius is not None and not radius > math.sqrt(3.0):
        raise ValueError(f"radius: the camera must stay outside [-1, 1]^3, so radius > sqrt(3); got {radius!r}")
    if len(background) != 3 or not all(0 <= c <= 255 for c in background):
        raise ValueError(f"background: expected an RGB triple of 0-255, got {background!r}")
    if not isinstance(supersample, int) or not 1 <= supersample <= 4:
        raise ValueError(f"supersample: expected an integer 1 to 4, got {supersample!r}")


def render_view(
    vertices,
    faces,
    *,
    elevation: float,
    azimuth: float,
    size: int = 518,
    fov_deg: float = 40.0,
    radius: float | None = None,
    background=(255, 255, 255),
    supersample: int = 1,
    lighting: Lighting = Lighting(),
) -> View:
    """Render one view from (elevation, azimuth) degrees; see render_views for the arguments."""
    _validate(1, size, (elevation, elevation), fov_deg, radius, background, supersample)
    v, f = _check_mesh(vertices, faces)
    if v.abs().max() > 1.0 + 1e-4:
        raise ValueError(
            f"vertices: expected a mesh normalized into [-1, 1]^3, max |coordinate| is {float(v.abs().max()):.4g}"
        )
    if radius is None:
        # fit the mesh's bounding sphere about the origin, with a 5% margin, inside the field of view
        reach = float(v.norm(dim=1)[f].max())
        radius = max(1.05 * reach / math.sin(math.radians(fov_deg) / 2.0), reach + 0.1)
    ext = look_at_extrinsics(elevation, azimuth, radius)
    K = intrinsics_matrix(size, size, fov_deg)
    s = supersample
    K_big = K.copy()
    K_big[:2, :2] *= s
    K_big[:2, 2] = (K[:2, 2] + 0.5) * s - 0.5  # pixel centres of the finer grid
    big = size * s
    raster = rasterize(v, f, K_big, ext, big, big)
    img = shade(raster, v, f, K_big, ext, background=background, lighting=lighting)
    if s > 1:  # box filter: RGB already composited, alpha becomes fractional coverage
        img = img.view(size, s, size, s, 4).mean(dim=(1, 3))
    image = np.rint(np.clip(img.numpy() * 255.0, 0.0, 255.0)).astype(np.uint8)
    return View(image=image, intrinsics=K, extrinsics=ext, elevation=float(elevation), azimuth=float(azimuth))


def sample_cameras(n_views: int, elevation=(10.0, 40.0), seed: int = 0) -> list[tuple[float, float]]:
    """(elevation, azimuth) pairs: elevation uniform in the range, azimuth jittered in n equal sectors."""
    rng = np.random.default_rng(seed)
    el = rng.uniform(elevation[0], elevation[1], n_views)
    # one azimuth per sector keeps the views spread around the object
    az = (np.arange(n_views) + rng.uniform(0.0, 1.0, n_views)) * (360.0 / n_views) + rng.uniform(0.0, 360.0)
    return [(float(e), float(a % 360.0)) for e, a in zip(el, az, strict=True)]


def render_views(
    vertices,
    faces,
    *,
    n_views: int = 12,
    size: int = 518,
    elevation=(10.0, 40.0),
    fov_deg: float = 40.0,
    radius: float | None = None,
    seed: int = 0,
    background=(255, 255, 255),
    supersample: int = 1,
    lighting: Lighting = Lighting(),
) -> list[View]:
    """Render `n_views` grey views of a mesh normalized into [-1, 1]^3 from seeded random cameras.

    Elevation is uniform in `elevation` (degrees), azimuth jittered around the circle; the camera
    looks at the origin from `radius` (None: just far enough that the mesh fills the view with a
    5% margin) through a pinhole of horizontal field of view `fov_deg`. `supersample` > 1 renders
    at that many times the size and box-filters down (anti-aliased edges, fractional alpha).
    """
    _validate(n_views, size, elevation, fov_deg, radius, background, supersample)
    return [
        render_view(
            vertices,
            faces,
            elevation=el,
            azimuth=az,
            size=size,
            fov_deg=fov_deg,
            radius=radius,
            background=background,
            supersample=supersample,
            lighting=lighting,
        )
        for el, az in sample_cameras(n_views, elevation, seed)
    ]
