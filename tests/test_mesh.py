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
