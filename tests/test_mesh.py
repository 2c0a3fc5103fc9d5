import numpy as np
import pytest
import trimesh

from pipeline.geometry.mesh import MeshError, load_mesh, normalize


@pytest.mark.parametrize("ext", ["obj", "ply", "stl", "off", "glb"])
def test_every_format_loads_and_normalizes(ext):
    box = trimesh.creation.box(extents=(2.0, 1.0, 0.5))
    box.apply_translation((5.0, -3.0, 1.0))
    data = box.export(file_type=ext)
    v, f = load_mesh(data if isinstance(data, bytes) else data.encode(), ext)
    m = normalize(v, f)
    lo, hi = m.vertices.min(0), m.vertices.max(0)
    np.testing.assert_allclose((lo + hi) / 2, 0, atol=1e-9)
    assert np.abs(m.vertices).max() == pytest.approx(0.95)
    np.testing.assert_allclose(m.center, (5.0, -3.0, 1.0), atol=1e-6)
    np.testing.assert_allclose((v[f[0]] - m.center) * m.scale, m.vertices[m.faces[0]], atol=1e-9)
    assert m.watertight and m.face_count == 12


def test_scene_is_flattened_with_node_transforms():
    scene = trimesh.Scene()
    a = trimesh.creation.box(extents=(1, 1, 1))
    scene.add_geometry(a, node_name="left", transform=trimesh.transformations.translation_matrix((-3, 0, 0)))
    scene.add_geometry(a, node_name="right", transform=trimesh.transformations.translation_matrix((3, 0, 0)))
    v, f = load_mesh(scene.export(file_type="glb"), "glb")
    assert len(f) == 24
    assert v[:, 0].min() == pytest.approx(-3.5) and v[:, 0].max() == pytest.approx(3.5)


@pytest.mark.parametrize("data,ext,msg", [
    (b"", "obj", "empty file"),
    (b"\x00\x01garbage\xff" * 10, "glb", "cannot parse"),
    (b"v 0 0 0\nv 1 0 0\nv 0 1 0\n", "obj", "no triangles"),
    (b"solid x\nendsolid x\n", "xyz", "unsupported file type"),
])
def test_bad_files_give_one_line_reasons(data, ext, msg):
    with pytest.raises(MeshError, match=msg):
        load_mesh(data, ext)


def test_bad_arrays_are_rejected():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0]], float)
    f = np.array([[0, 1, 2]])
    with pytest.raises(MeshError, match="NaN"):
        normalize(np.where(np.eye(3, dtype=bool), np.nan, v), f)
    with pytest.raises(MeshError, match="out of range"):
        normalize(v, np.array([[0, 1, 7]]))
    with pytest.raises(MeshError, match="coincide"):
        normalize(np.zeros((3, 3)), f)
    with pytest.raises(MeshError, match="over the limit"):
        load_mesh(trimesh.creation.icosphere(3).export(file_type="ply"), "ply", max_faces=100)


def test_nan_and_collinear_files_are_rejected_not_cleaned():
    nan_obj = b"v 0 0 0\nv 1 nan 0\nv 0 1 0\nv 0 0 1\nf 1 2 3\nf 1 3 4\nf 1 2 4\n"
    v, f = load_mesh(nan_obj, "obj")
    with pytest.raises(MeshError, match="NaN"):
        normalize(v, f)
    t = np.linspace(0, 1, 12)
    line = np.round(np.stack([t, t / 2, t / 4], 1), 6)
    text = "".join(f"v {a} {b} {c}\n" for a, b, c in line) + "".join(f"f {i} {i+1} {i+2}\n" for i in range(1, 11))
    v, f = load_mesh(text.encode(), "obj")
    with pytest.raises(MeshError, match="one line"):
        normalize(v, f)


def _prism_off(n: int) -> bytes:
    """A closed n-gon prism as OFF: two n-sided caps and n quads."""
    ang = np.linspace(0, 2 * np.pi, n, endpoint=False)
    ring = np.c_[np.cos(ang), np.sin(ang), np.zeros(n)]
    v = np.r_[ring, ring + [0, 0, 1]]
    faces = [list(range(n - 1, -1, -1)), list(range(n, 2 * n))]
    faces += [[i, (i + 1) % n, (i + 1) % n + n, i + n] for i in range(n)]
    text = f"OFF\n{len(v)} {len(faces)} 0\n" + "".join(f"{a} {b} {c}\n" for a, b, c in v)
    return (text + "".join(f"{len(fc)} " + " ".join(map(str, fc)) + "\n" for fc in faces)).encode()


@pytest.mark.parametrize("n", [4, 5, 7, 10])
def test_polygon_off_is_triangulated(n):
    v, f = load_mesh(_prism_off(n), "off")
    assert len(f) == 2 * (n - 2) + 2 * n
    m = normalize(v, f)
    assert m.watertight
    assert trimesh.Trimesh(m.vertices, m.faces).volume > 0  # orientation of the polygons kept


def test_concave_polygon_is_covered_exactly():
    from pipeline.geometry.polygons import triangulate

    # An L-shaped hexagon: a fan from vertex 0 would cover area outside it.
    v = np.array([[0, 0, 0], [2, 0, 0], [2, 1, 0], [1, 1, 0], [1, 2, 0], [0, 2, 0]], float)
    for start in range(6):
        poly = [(start + k) % 6 for k in range(6)]
        tris = np.array(triangulate(v, poly))
        area = 0.5 * np.cross(v[tris[:, 1]] - v[tris[:, 0]], v[tris[:, 2]] - v[tris[:, 0]])[:, 2]
        assert len(tris) == 4 and (area > 0).all() and area.sum() == pytest.approx(3.0)


def test_off_reasons_name_the_cause():
    with pytest.raises(MeshError, match="references vertex 9"):
        load_mesh(b"OFF\n3 1 0\n0 0 0\n1 0 0\n0 1 0\n4 0 1 2 9\n", "off")
    with pytest.raises(MeshError, match="truncated"):
        load_mesh(b"OFF\n4 2 0\n0 0 0\n1 0 0\n", "off")


def test_obj_with_materials_and_gltf_with_buffers(tmp_path):
    import trimesh.resolvers

    box = trimesh.creation.box(extents=(1, 2, 3))
    box.visual = trimesh.visual.TextureVisuals(uv=np.random.default_rng(0).random((len(box.vertices), 2)))
    files = box.export(file_type="obj", include_texture=True, return_texture=True)
    text, assets = files if isinstance(files, tuple) else (files, {})
    for name, data in assets.items():
        (tmp_path / name).write_bytes(data)
    v, f = load_mesh(text.encode(), "obj", resolver=trimesh.resolvers.FilePathResolver(str(tmp_path)))
    assert len(f) == 12
    gltf = trimesh.Scene(box).export(file_type="gltf")  # {"model.gltf": ..., "gltf_buffer_*.bin": ...}
    for name, data in gltf.items():
        (tmp_path / name).write_bytes(data)
    v, f = load_mesh(gltf["model.gltf"], "gltf", resolver=trimesh.resolvers.FilePathResolver(str(tmp_path)))
    assert len(f) == 12
    with pytest.raises(MeshError, match="missing|cannot parse"):
        load_mesh(gltf["model.gltf"], "gltf")


@pytest.mark.parametrize("ext, needs", [("fbx", "convert it to .glb"), ("dae", "pycollada"), ("usdz", "usd-core")])
def test_formats_without_a_reader_say_how_to_convert(ext, needs):
    import importlib.util

    if ext == "dae" and importlib.util.find_spec("collada"):
        pytest.skip("pycollada is installed")
    if ext == "usdz" and importlib.util.find_spec("pxr"):
        pytest.skip("usd-core is installed")
    with pytest.raises(MeshError, match=needs):
        load_mesh(b"not empty", ext)
