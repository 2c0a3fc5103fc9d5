"""The CPU condition-view renderer: cameras, projection, occlusion, coverage, determinism, bad input."""

import io
import math

import numpy as np
import pytest
import trimesh
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from scipy import ndimage

from pipeline.geometry.render import (
    CAMERA_KEY,
    FRONT_CAMERA,
    intrinsics_matrix,
    look_at_extrinsics,
    rasterize,
    read_camera,
    render_view,
    render_views,
    sample_cameras,
)


def _project(K, E, points):
    cam = points @ E[:3, :3].T + E[:3, 3]
    uvw = cam @ K.T
    return uvw[:, :2] / uvw[:, 2:], cam[:, 2]


def _pixel(K, E, point):
    uv, _ = _project(np.asarray(K, np.float64), np.asarray(E, np.float64), np.asarray(point, np.float64)[None])
    return uv[0]


def test_small_sphere_is_drawn_where_its_centre_projects():
    centre = np.array([0.3, -0.2, 0.5])
    ball = trimesh.creation.icosphere(3, radius=0.05).apply_translation(centre)
    view = render_view(ball.vertices, ball.faces, elevation=20.0, azimuth=50.0, size=160, radius=4.0)
    u, v = _pixel(view.intrinsics, view.extrinsics, centre)
    ys, xs = np.nonzero(view.alpha)
    assert len(xs) > 20
    assert abs(xs.mean() - u) < 0.3 and abs(ys.mean() - v) < 0.3


def test_depth_and_pixel_of_a_triangle_match_the_pinhole_model():
    tri = np.array([[-0.6, -0.5, 0.2], [0.7, -0.4, -0.3], [0.0, 0.8, 0.1]])
    K = intrinsics_matrix(96, 64, 45.0).astype(np.float64)
    E = look_at_extrinsics(15.0, 30.0, 3.0).astype(np.float64)
    r = rasterize(tri, np.array([[0, 1, 2]]), K, E, 64, 96)
    ys, xs = np.nonzero(r.face.numpy() == 0)
    assert len(xs) > 100
    # the 3D point the barycentrics name projects back to its own pixel centre, at the stored depth
    p = (r.bary.numpy()[ys, xs][:, :, None] * tri[None]).sum(1)
    uv, z = _project(K, E, p)
    np.testing.assert_allclose(uv[:, 0], xs, atol=1e-3)
    np.testing.assert_allclose(uv[:, 1], ys, atol=1e-3)
    np.testing.assert_allclose(r.depth.numpy()[ys, xs], z, rtol=1e-5)


@pytest.mark.parametrize("far_first", [False, True])
def test_near_box_hides_far_box(far_first):
    near = trimesh.creation.box(extents=(0.4, 0.4, 0.4)).apply_translation((0, 0, 0.6))
    far = trimesh.creation.box(extents=(0.9, 0.9, 0.9)).apply_translation((0, 0, -0.4))
    parts = [far, near] if far_first else [near, far]
    mesh = trimesh.util.concatenate(parts)
    near_ids = set(range(12)) if not far_first else set(range(12, 24))
    K = intrinsics_matrix(128, 128, 40.0)
    E = look_at_extrinsics(0.0, 0.0, 4.0)  # camera on +Z, looking down -Z
    r = rasterize(mesh.vertices, mesh.faces, K, E, 128, 128)
    face = r.face.numpy()
    u, v = _pixel(K, E, [0.0, 0.0, 0.8])
    centre = face[int(round(v)), int(round(u))]
    assert centre in near_ids
    assert r.depth[int(round(v)), int(round(u))] == pytest.approx(4.0 - 0.8, abs=1e-4)
    # the far box still shows around the near one
    visible = set(np.unique(face[face >= 0]).tolist())
    assert visible - near_ids


def test_small_batches_give_the_same_raster(monkeypatch):
    import pipeline.geometry.render as render

    mesh = trimesh.util.concatenate(
        [trimesh.creation.icosphere(3, radius=0.6), trimesh.creation.box(extents=(1.5, 0.2, 1.5))]
    )
    K, E = intrinsics_matrix(96, 96, 40.0), look_at_extrinsics(25.0, 40.0, 4.0)
    whole = rasterize(mesh.vertices, mesh.faces, K, E, 96, 96)
    monkeypatch.setattr(render, "_FACE_BATCH", 97)
    monkeypatch.setattr(render, "_CHUNK", 500)
    parts = rasterize(mesh.vertices, mesh.faces, K, E, 96, 96)
    assert (whole.face == parts.face).all() and (whole.depth == parts.depth).all()
    assert (whole.face >= 0).sum() > 1000


def test_sphere_silhouette_area_matches_perspective_formula():
    r_s, dist, size, fov = 0.8, 3.0, 256, 40.0
    sphere = trimesh.creation.icosphere(5, radius=r_s)
    view = render_view(sphere.vertices, sphere.faces, elevation=25.0, azimuth=10.0, size=size, fov_deg=fov, radius=dist)
    f = view.intrinsics[0, 0]
    rho = f * r_s / math.sqrt(dist**2 - r_s**2)  # image radius of a sphere's silhouette cone
    area = (view.alpha > 0).sum()
    assert area == pytest.approx(math.pi * rho**2, rel=0.01)


def test_same_seed_same_bytes_other_seed_other_cameras():
    mesh = trimesh.creation.torus(0.6, 0.2, 24, 12)
    a = render_views(mesh.vertices, mesh.faces, n_views=3, size=64, seed=7)
    b = render_views(mesh.vertices, mesh.faces, n_views=3, size=64, seed=7)
    c = render_views(mesh.vertices, mesh.faces, n_views=3, size=64, seed=8)
    assert [v.png() for v in a] == [v.png() for v in b]
    assert [v.azimuth for v in a] != [v.azimuth for v in c]
    assert a[0].png()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cameras_agree_with_elevation_and_azimuth():
    mesh = trimesh.creation.icosphere(2, radius=0.9)
    views = render_views(mesh.vertices, mesh.faces, n_views=6, size=48, seed=3, radius=3.5)
    for view in views:
        assert 10.0 <= view.elevation <= 40.0 and 0.0 <= view.azimuth < 360.0
        R, t = view.extrinsics[:3, :3].astype(np.float64), view.extrinsics[:3, 3].astype(np.float64)
        np.testing.assert_allclose(R @ R.T, np.eye(3), atol=1e-6)
        assert np.linalg.det(R) == pytest.approx(1.0, abs=1e-6)
        el, az = math.radians(view.elevation), math.radians(view.azimuth)
        expected = 3.5 * np.array([math.cos(el) * math.sin(az), math.sin(el), math.cos(el) * math.cos(az)])
        np.testing.assert_allclose(-R.T @ t, expected, atol=1e-5)
        # the origin lands on the principal point, world up points up the image (-y in OpenCV axes)
        u, v = _pixel(view.intrinsics, view.extrinsics, [0.0, 0.0, 0.0])
        assert (u, v) == pytest.approx((23.5, 23.5), abs=1e-4)
        assert (R @ np.array([0.0, 1.0, 0.0]))[1] < 0
    azimuths = sorted(a for _, a in sample_cameras(12, seed=0))
    assert max(np.diff(azimuths + [azimuths[0] + 360.0])) < 60.0  # one view per 30-degree sector


def test_watertight_sphere_silhouette_has_no_holes():
    sphere = trimesh.creation.icosphere(4, radius=0.9)
    for view in render_views(sphere.vertices, sphere.faces, n_views=3, size=200, seed=1):
        mask = view.alpha > 0
        assert (ndimage.binary_fill_holes(mask) == mask).all()
        assert ndimage.label(mask)[1] == 1


def test_finely_tessellated_square_covers_every_pixel():
    # a jittered grid: thousands of triangles meeting at shared edges in arbitrary directions
    rng = np.random.default_rng(0)
    n = 40
    g = np.stack(np.meshgrid(np.linspace(-0.9, 0.9, n), np.linspace(-0.9, 0.9, n), indexing="ij"), -1)
    g[1:-1, 1:-1] += rng.uniform(-0.015, 0.015, (n - 2, n - 2, 2))
    verts = np.concatenate([g.reshape(-1, 2), np.zeros((n * n, 1))], 1)
    i, j = np.meshgrid(np.arange(n - 1), np.arange(n - 1), indexing="ij")
    a, b, c, d = i * n + j, (i + 1) * n + j, (i + 1) * n + j + 1, i * n + j + 1
    faces = np.concatenate([np.stack([a, b, c], -1).reshape(-1, 3), np.stack([a, c, d], -1).reshape(-1, 3)])
    K = intrinsics_matrix(300, 300, 40.0)
    E = look_at_extrinsics(0.0, 0.0, 3.0)
    face = rasterize(verts, faces, K, E, 300, 300).face.numpy()
    corners, _ = _project(K.astype(np.float64), E.astype(np.float64), np.array([[-0.9, -0.9, 0], [0.9, 0.9, 0]]))
    lo, hi = np.ceil(corners.min(0)).astype(int) + 1, np.floor(corners.max(0)).astype(int) - 1
    inside = face[lo[1] : hi[1] + 1, lo[0] : hi[0] + 1]
    assert inside.size > 20000 and (inside >= 0).all()


def test_open_tube_shows_its_inside_without_holes():
    theta = np.linspace(0, 2 * np.pi, 48, endpoint=False)
    ring = np.stack([0.5 * np.cos(theta), np.zeros_like(theta), 0.5 * np.sin(theta)], 1)
    verts = np.concatenate([ring + [0, -0.8, 0], ring + [0, 0.8, 0]])
    k = np.arange(48)
    faces = np.concatenate(
        [np.stack([k, (k + 1) % 48, k + 48], 1), np.stack([(k + 1) % 48, (k + 1) % 48 + 48, k + 48], 1)]
    )
    view = render_view(verts, faces, elevation=35.0, azimuth=20.0, size=160)
    mask = view.alpha > 0
    assert (ndimage.binary_fill_holes(mask) == mask).all()
    r = rasterize(verts, faces, view.intrinsics, view.extrinsics, 160, 160)
    seen = np.unique(r.face.numpy()[r.face.numpy() >= 0])
    normals = trimesh.Trimesh(verts, faces, process=False).face_normals[seen]
    centre = -view.extrinsics[:3, :3].T @ view.extrinsics[:3, 3]
    to_cam = centre - verts[faces[seen]].mean(1)
    assert ((normals * to_cam).sum(1) < 0).any()  # back faces of the far wall are drawn


def test_supersampling_gives_soft_edges_and_same_coverage():
    sphere = trimesh.creation.icosphere(3, radius=0.8)
    hard = render_view(sphere.vertices, sphere.faces, elevation=20.0, azimuth=0.0, size=64)
    soft = render_view(sphere.vertices, sphere.faces, elevation=20.0, azimuth=0.0, size=64, supersample=2)
    assert set(np.unique(hard.alpha)) == {0, 255}
    assert ((soft.alpha > 0) & (soft.alpha < 255)).sum() > 20
    assert soft.alpha.sum() / 255 == pytest.approx(hard.alpha.sum() / 255, rel=0.03)
    assert soft.image.shape == (64, 64, 4) and soft.image.dtype == np.uint8


def test_background_colour_and_grey_object():
    cube = trimesh.creation.box(extents=(1, 1, 1))
    view = render_view(cube.vertices, cube.faces, elevation=30.0, azimuth=45.0, size=64, background=(0, 0, 255))
    assert tuple(view.rgb[0, 0]) == (0, 0, 255) and view.alpha[0, 0] == 0
    obj = view.rgb[view.alpha == 255].astype(int)
    assert (obj[:, 0] == obj[:, 1]).all() and (obj[:, 1] == obj[:, 2]).all()
    assert len(np.unique(obj[:, 0])) >= 3  # three visible cube faces, three shades


@pytest.mark.parametrize(
    "vertices, faces, kwargs, match",
    [
        ([[0, 0, 0], [1, 0, 0], [0, np.nan, 0]], [[0, 1, 2]], {}, "NaN"),
        ([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 3]], {}, "out of range"),
        ([[0, 0, 0], [1, 0, 0], [0, 1, 0]], np.zeros((0, 3), int), {}, "faces"),
        ([[0, 0, 0], [3, 0, 0], [0, 1, 0]], [[0, 1, 2]], {}, r"\[-1, 1\]"),
        ([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0.0, 1.0, 2.0]], {}, "integer"),
        ([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], {"n_views": 0}, "n_views"),
        ([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], {"elevation": (40.0, 10.0)}, "elevation"),
        ([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]], {"radius": 1.0}, "radius"),
    ],
)
def test_bad_input_is_a_clear_value_error(vertices, faces, kwargs, match):
    with pytest.raises(ValueError, match=match):
        render_views(
            np.asarray(vertices, dtype=float), np.asarray(faces), size=32, n_views=kwargs.pop("n_views", 1), **kwargs
        )


def test_every_corpus_mesh_renders(tmp_path):
    from pipeline.corpus import generate_corpus

    report = generate_corpus(tmp_path, seed=0)
    for entry in report.valid:
        loaded = trimesh.load(tmp_path / entry.path)
        mesh = loaded.to_mesh() if isinstance(loaded, trimesh.Scene) else loaded
        v = mesh.vertices - mesh.bounds.mean(0)
        v = v * (0.95 / np.abs(v).max())
        (view,) = render_views(v, mesh.faces, n_views=1, size=48, seed=entry.faces)
        coverage = (view.alpha > 0).mean()
        assert 0.01 < coverage < 0.9, entry.path


def test_agrees_with_an_opengl_renderer():
    """Cross-check conventions against pyrender (EGL): same silhouette, same depth, up to MSAA sampling."""
    import os

    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    try:
        import pyrender
    except Exception as exc:  # missing package, or OpenGL without a usable platform library
        pytest.skip(f"pyrender unavailable: {exc}")
    mesh = trimesh.creation.torus(0.6, 0.25, 48, 24)
    mesh.apply_transform(trimesh.transformations.rotation_matrix(0.7, (1, 0.3, 0)))
    mesh.apply_translation((0.1, -0.05, 0.0))
    H, W = 120, 160
    K, E = intrinsics_matrix(W, H, 50.0), look_at_extrinsics(25.0, 70.0, 3.0)
    ours = rasterize(mesh.vertices, mesh.faces, K, E, H, W)
    scene = pyrender.Scene()
    scene.add(pyrender.Mesh.from_trimesh(mesh, smooth=False))
    # OpenGL camera-to-world (y up, z backwards); its pixel centres sit at +0.5
    pose = np.linalg.inv(E.astype(np.float64)) @ np.diag([1.0, -1.0, -1.0, 1.0])
    scene.add(
        pyrender.IntrinsicsCamera(K[0, 0], K[1, 1], K[0, 2] + 0.5, K[1, 2] + 0.5, znear=0.1, zfar=10.0), pose=pose
    )
    try:
        gl = pyrender.OffscreenRenderer(W, H)
    except Exception as exc:  # no EGL/OSMesa on this machine
        pytest.skip(f"no offscreen OpenGL: {exc}")
    try:
        depth = gl.render(scene, flags=pyrender.RenderFlags.DEPTH_ONLY | pyrender.RenderFlags.SKIP_CULL_FACES)
    finally:
        gl.delete()
    a, b = ours.face.numpy() >= 0, depth > 0
    assert (a & b).sum() / (a | b).sum() > 0.95
    inner = ndimage.binary_erosion(a & b, iterations=2)
    diff = np.abs(ours.depth.numpy()[inner] - depth[inner])
    assert np.median(diff) < 0.01 and np.percentile(diff, 90) < 0.03


def test_camera_rides_in_the_png_and_places_the_preview():
    from model.postprocess import mesh_bytes
    from pipeline.generate import render_preview
    from pipeline.geometry.mesh import normalize

    m = trimesh.creation.box((1.4, 0.7, 0.5))
    m.apply_transform(trimesh.transformations.rotation_matrix(0.5, (0.2, 1, 0)))
    src = normalize(m.vertices, m.faces)
    view = render_views(src.vertices, src.faces, n_views=1, size=64, seed=11)[0]
    assert read_camera(view.png()) is None and read_camera(b"not an image") is None
    cam = read_camera(view.png(camera=True))
    assert cam.source == "image" and cam.fov_deg == pytest.approx(40.0)
    assert (cam.elevation, cam.azimuth) == pytest.approx((view.elevation, view.azimuth))
    assert cam.radius == pytest.approx(float(np.linalg.norm(view.extrinsics[:3, 3])), rel=1e-6)
    # the library's preview of the source mesh from the input's camera is the input view itself
    preview = render_preview(mesh_bytes(src.vertices, src.faces, "glb"), "glb", 64, cam)
    got = np.asarray(Image.open(io.BytesIO(preview)))
    assert np.abs(got.astype(int) - view.image.astype(int)).max() <= 2
    # without a camera the preview looks from the front (+Z, +Y up): the box, longest along X, lies wide
    front = np.asarray(Image.open(io.BytesIO(render_preview(mesh_bytes(src.vertices, src.faces, "glb"), "glb", 64,
                                                            FRONT_CAMERA))))[..., 3] > 0
    assert FRONT_CAMERA.azimuth == 0.0 and FRONT_CAMERA.elevation == 0.0
    assert front.any(0).sum() > 1.5 * front.any(1).sum()


def _png_with_camera(text: str) -> bytes:
    info = PngInfo()
    info.add_text(CAMERA_KEY, text)
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


@pytest.mark.parametrize("chunk", [
    b'{"elevation": 95, "azimuth": 0}', b'{"elevation": "x", "azimuth": 0}', b'{"azimuth": 0}', b"[1, 2]",
])
def test_a_bad_camera_chunk_is_no_camera(chunk):
    assert read_camera(_png_with_camera(chunk.decode())) is None


def test_a_camera_inside_the_cube_keeps_its_angles_and_fits_its_distance():
    cam = read_camera(_png_with_camera('{"elevation": 30, "azimuth": 400, "fov_deg": 35, "radius": 1.0}'))
    assert (cam.elevation, cam.azimuth, cam.fov_deg, cam.radius) == (30.0, 40.0, 35.0, None)
