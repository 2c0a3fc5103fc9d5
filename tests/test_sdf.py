"""Narrow-band sparse SDF: accuracy on analytic shapes, band completeness, signs, bad input, mesh-to-sdf."""

import numpy as np
import pytest
import torch
import trimesh

from kernels.distance import point_triangle_sqdist_reference
from pipeline.geometry.sdf import SDFConfig, SparseSDF, sparse_sdf
from pipeline.geometry.winding import solid_angle as _solid_angle, winding_exact


# ---------- meshes and brute-force references ----------

def sphere(subdivisions=4, radius=0.95):
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return np.asarray(m.vertices), np.asarray(m.faces)


def box(half=(0.95, 0.6, 0.4)):
    m = trimesh.creation.box(extents=2 * np.asarray(half))
    return np.asarray(m.vertices), np.asarray(m.faces)


def torus(major=0.92, minor=0.03, sections=(256, 16)):
    m = trimesh.creation.torus(major, minor, major_sections=sections[0], minor_sections=sections[1])
    return np.asarray(m.vertices), np.asarray(m.faces)


def brute_distance(points, v, f, chunk=64):
    """Exact unsigned distance from each point to the whole triangle set (float64)."""
    tri = torch.as_tensor(v[f], dtype=torch.float64)
    out = []
    for s in range(0, len(points), chunk):
        p = torch.as_tensor(points[s : s + chunk], dtype=torch.float64)
        m = p.shape[0]
        pp = p[:, None].expand(-1, len(tri), -1).reshape(-1, 3)
        t = tri[None].expand(m, -1, -1, -1).reshape(-1, 3, 3)
        d2, _ = point_triangle_sqdist_reference(pp, t[:, 0], t[:, 1], t[:, 2])
        out.append(d2.reshape(m, -1).min(1).values.sqrt())
    return torch.cat(out)


def brute_winding(points, v, f):
    tri = torch.as_tensor(v[f], dtype=torch.float64)[None]
    q = torch.as_tensor(points, dtype=torch.float64)[:, None]
    return _solid_angle(q, tri[:, :, 0], tri[:, :, 1], tri[:, :, 2]).sum(1) / (4 * np.pi)


def subsample(sdf: SparseSDF, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(sdf.coords.shape[0], generator=g)[:n]


def check_layout(sdf: SparseSDF):
    r = sdf.resolution
    assert sdf.coords.dtype == torch.int32 and sdf.values.dtype == torch.float32
    assert sdf.coords.min() >= 0 and sdf.coords.max() < r
    key = (sdf.coords.long()[:, 0] * r + sdf.coords[:, 1]) * r + sdf.coords[:, 2]
    assert (key[1:] > key[:-1]).all(), "keys must be strictly increasing (sorted, unique)"
    assert sdf.values.abs().max() <= 1.0


# ---------- accuracy ----------

@pytest.mark.parametrize("res", [32, 128, 256])
def test_box_is_exact(res):
    # A box mesh is its own analytic shape: outside, the distance to the box; inside, to the nearest face.
    half = torch.tensor([0.95, 0.6, 0.4], dtype=torch.float64)
    sdf = sparse_sdf(*box(), res)
    check_layout(sdf)
    q = sdf.centers().double().abs() - half
    analytic = q.clamp_min(0).norm(dim=1) + q.max(dim=1).values.clamp_max(0)
    err = (sdf.distance().double() - analytic).abs().max() / sdf.voxel_size
    assert err < 0.01, f"max error {err:.4f} voxel"


@pytest.mark.parametrize("res", [64, 256])
def test_sphere_against_mesh_and_analytic(res):
    v, f = sphere(4)
    sdf = sparse_sdf(v, f, res)
    check_layout(sdf)
    h = sdf.voxel_size
    idx = subsample(sdf, 300)
    exact = brute_distance(sdf.centers()[idx].double().numpy(), v, f)
    err = (sdf.distance()[idx].abs().double() - exact).abs().max() / h
    assert err < 0.01, f"max error vs brute force {err:.4f} voxel"
    # Against the sphere: the inscribed mesh lies between the inradius and the radius.
    tri = v[f]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    inradius = np.min(np.abs((n * tri[:, 0]).sum(1)) / np.linalg.norm(n, axis=1))
    gap = 0.95 - inradius
    analytic = sdf.centers().double().norm(dim=1) - 0.95
    assert (sdf.distance().double() - analytic).abs().max() < gap + 0.01 * h
    clear = analytic.abs() > gap
    assert (torch.sign(sdf.values[clear]).double() == torch.sign(analytic[clear])).all()


def test_torus_at_1024():
    v, f = torus()
    sdf = sparse_sdf(v, f, 1024)
    check_layout(sdf)
    h = sdf.voxel_size
    idx = subsample(sdf, 200)
    exact = brute_distance(sdf.centers()[idx].double().numpy(), v, f)
    err = (sdf.distance()[idx].abs().double() - exact).abs().max() / h
    assert err < 0.01, f"max error vs brute force {err:.4f} voxel"
    c = sdf.centers().double()
    analytic = (torch.stack([c[:, :2].norm(dim=1) - 0.92, c[:, 2]], 1)).norm(dim=1) - 0.03
    # Tessellation: sagitta of the major and minor polygons bounds the gap to the smooth torus.
    gap = 0.95 * (1 - np.cos(np.pi / 256)) + 0.03 * (1 - np.cos(np.pi / 16))
    assert (sdf.distance().double() - analytic).abs().max() < gap + 0.01 * h
    clear = analytic.abs() > gap
    assert (torch.sign(sdf.values[clear]).double() == torch.sign(analytic[clear])).all()


def test_band_is_complete_and_exact_on_a_block():
    # Every voxel of a block that straddles the surface, checked by brute force: kept iff |d| < band*h.
    v, f = sphere(2)
    res, band, side = 128, 2.0, 16
    sdf = sparse_sdf(v, f, res, band, sign="none")
    h = 2.0 / res
    lo = np.array([108, 56, 56])  # block around x = 0.7..0.95, crossing the sphere of radius 0.95
    ijk = np.stack(np.meshgrid(*[np.arange(a, a + side) for a in lo], indexing="ij"), -1).reshape(-1, 3)
    d = brute_distance(-1 + (ijk + 0.5) * h, v, f, chunk=512)
    want = set(map(tuple, ijk[(d < band * h).numpy()]))
    got_all = sdf.coords.numpy()
    inside = np.all((got_all >= lo) & (got_all < lo + side), axis=1)
    got = set(map(tuple, got_all[inside]))
    assert want and got == want
    got_d = sdf.distance()[torch.as_tensor(inside)].double()
    assert (got_d >= 0).all()


def test_band_width_and_scaling():
    v, f = sphere(3)
    wide = sparse_sdf(v, f, 64, band=3.0)
    narrow = sparse_sdf(v, f, 64, band=1.0)
    assert narrow.coords.shape[0] < wide.coords.shape[0]
    assert (wide.distance().abs() < 3.0 * wide.voxel_size).all()
    assert wide.values.abs().max() > 0.9 and narrow.values.abs().max() > 0.9


# ---------- sign ----------

def _sign_matches_winding(sdf, v, f, n=400, margin=0.1):
    idx = subsample(sdf, n)
    w = brute_winding(sdf.centers()[idx].numpy(), v, f)
    clear = (w - 0.5).abs() > margin  # away from the threshold, where the clustered sum cannot flip it
    inside = sdf.values[idx] < 0
    assert clear.sum() > n // 4
    assert (inside[clear] == (w[clear] >= 0.5)).all()


def test_sphere_with_hole():
    v, f = sphere(4)
    keep = v[f].mean(1)[:, 2] < 0.85
    sdf = sparse_sdf(v, f[keep], 128)
    analytic = sdf.centers().double().norm(dim=1) - 0.95
    away = (sdf.centers()[:, 2] < 0.75) & (analytic.abs() > 0.01)
    assert (torch.sign(sdf.values[away]).double() == torch.sign(analytic[away])).all()
    _sign_matches_winding(sdf, v, f[keep])
    # Pseudo-normals alone agree away from the hole too: the winding path must not be worse there.
    pn = sparse_sdf(v, f[keep], 128, sign="pseudonormal")
    assert torch.equal(pn.coords, sdf.coords)


def test_box_missing_one_face():
    v, f = box()
    tri = v[f]
    keep = ~np.all(np.isclose(tri[:, :, 2], 0.4), axis=1)  # drop the two triangles of the +z face
    assert keep.sum() == 10
    sdf = sparse_sdf(v, f[keep], 64)
    half = torch.tensor([0.95, 0.6, 0.4], dtype=torch.float64)
    c = sdf.centers().double()
    q = c.abs() - half
    analytic = q.clamp_min(0).norm(dim=1) + q.max(dim=1).values.clamp_max(0)
    away = c[:, 2] < 0.4 - 4 * sdf.voxel_size
    assert (torch.sign(sdf.values[away]).double() == torch.sign(analytic[away])).all()
    _sign_matches_winding(sdf, v, f[keep])


def test_double_walled_shell():
    vo, fo = sphere(3, 0.95)
    vi, fi = sphere(3, 0.6)
    v = np.concatenate([vo, vi])
    f = np.concatenate([fo, fi[:, ::-1] + len(vo)])  # inner wall faces the cavity
    # Pseudo-normals follow the faces: a hollow shell. The winding rule turns every closed component of
    # negative volume outward first, so the inner wall bounds a second solid: the cavity is inside too.
    for method, cavity_inside in (("winding", True), ("pseudonormal", False)):
        sdf = sparse_sdf(v, f, 96, sign=method)
        r = sdf.centers().double().norm(dim=1)
        between = (r > 0.6 + 0.01) & (r < 0.95 - 0.01)
        cavity = r < 0.6 - 0.01
        assert (sdf.values[between] < 0).all(), method
        assert (sdf.values[r > 0.95 + 0.01] > 0).all(), method
        assert ((sdf.values[cavity] < 0) if cavity_inside else (sdf.values[cavity] > 0)).all(), method


def test_overlapping_shells_are_a_union():
    va, fa = sphere(3, 0.6)
    v = np.concatenate([va - [0.35, 0, 0], va + [0.35, 0, 0]])
    f = np.concatenate([fa, fa + len(va)])
    sdf = sparse_sdf(v, f, 96)
    c = sdf.centers().double()
    ra = (c + torch.tensor([0.35, 0, 0], dtype=torch.float64)).norm(dim=1)
    rb = (c - torch.tensor([0.35, 0, 0], dtype=torch.float64)).norm(dim=1)
    # The part of one sphere's band that lies deep inside the other is inside the union.
    deep = ((ra - 0.6).abs() < 0.02) & (rb < 0.5)
    assert deep.sum() > 100 and (sdf.values[deep] < 0).all()


def test_flat_plate_has_no_inside():
    v = np.array([[-0.9, -0.9, 0], [0.9, -0.9, 0], [0.9, 0.9, 0], [-0.9, 0.9, 0]], float)
    f = np.array([[0, 1, 2], [0, 2, 3]])
    sdf = sparse_sdf(v, f, 64)
    assert sdf.coords.shape[0] > 0 and (sdf.values >= 0).all()
    pn = sparse_sdf(v, f, 64, sign="pseudonormal")
    assert (pn.values < 0).any(), "pseudo-normals alone give the plate's back side a sign"


# ---------- reference backend ----------

def test_matches_mesh_to_sdf_on_shared_voxels():
    pytest.importorskip("mesh_to_sdf")
    v, f = sphere(4)
    kw = dict(surface_point_method="sample", sign_method="normal", sample_point_count=200_000)
    ref = sparse_sdf(v, f, 64, backend="mesh_to_sdf", mesh_to_sdf_kwargs=kw)
    ours = sparse_sdf(v, f, 64)
    r = 64
    ka = ((ref.coords.long()[:, 0] * r + ref.coords[:, 1]) * r + ref.coords[:, 2]).numpy()
    kb = ((ours.coords.long()[:, 0] * r + ours.coords[:, 1]) * r + ours.coords[:, 2]).numpy()
    _, ia, ib = np.intersect1d(ka, kb, return_indices=True)
    assert len(ia) > 0.95 * len(kb)
    # mesh-to-sdf takes the nearest of 200k surface samples: it overestimates by up to their spacing.
    diff = (ref.distance()[ia] - ours.distance()[ib]).abs()
    assert diff.max() < 0.02 and diff.mean() < 0.002
    clear = ours.distance()[ib].abs() > 0.01
    assert (torch.sign(ref.values[ia][clear]) == torch.sign(ours.values[ib][clear])).all()


# ---------- bad input ----------

@pytest.mark.parametrize(
    "vertices, faces, match",
    [
        (np.zeros((0, 3)), np.zeros((0, 3), int), "empty mesh"),
        (np.array([[0, 0, 0], [np.nan, 0, 0], [0, 1, 0.0]]), np.array([[0, 1, 2]]), "NaN or infinite"),
        (np.array([[0, 0, 0], [np.inf, 0, 0], [0, 1, 0.0]]), np.array([[0, 1, 2]]), "NaN or infinite"),
        (np.eye(3) * 0.5, np.array([[0, 1, 3]]), "out of range"),
        (np.eye(3) * 0.5, np.array([[0, 1, -1]]), "out of range"),
        (np.array([[0, 0, 0], [0.5, 0, 0], [1.0, 0, 0]]), np.array([[0, 1, 2]]), "degenerate"),
        (np.eye(3) * 0.5, np.array([[0, 0, 1]]), "degenerate"),
        (np.eye(3) * 2.0, np.array([[0, 1, 2]]), "normalize"),
        (np.eye(3)[:, :2], np.array([[0, 1, 2]]), r"shape \(V, 3\)"),
        (np.eye(3) * 0.5, np.array([[0.0, 1, 2]]), "integers"),
    ],
)
def test_bad_input(vertices, faces, match):
    with pytest.raises(ValueError, match=match):
        sparse_sdf(vertices, faces, 32)


def test_bad_options_and_config():
    v, f = sphere(1)
    with pytest.raises(ValueError, match="resolution"):
        sparse_sdf(v, f, 2048)
    with pytest.raises(ValueError, match="sign"):
        sparse_sdf(v, f, 32, sign="scan")
    with pytest.raises(ValueError, match="band"):
        sparse_sdf(v, f, 32, band=0)
    with pytest.raises(ValueError, match="unknown SDF config key"):
        SDFConfig.from_dict({"resolution": 256, "bandwidth": 2})
    assert SDFConfig.from_dict({"resolution": 256}).band == 2.0


def test_degenerate_faces_are_dropped_not_fatal():
    v, f = sphere(2)
    v2 = np.concatenate([v, [[0.1, 0.1, 0.1]]])
    f2 = np.concatenate([f, [[len(v), len(v), 0]]])
    a, b = sparse_sdf(v, f, 32), sparse_sdf(v2, f2, 32, sign="pseudonormal")
    assert torch.equal(a.coords, b.coords) and torch.allclose(a.values, b.values)


def test_torch_inputs_and_winding_number_accuracy():
    v, f = sphere(3)
    a = sparse_sdf(torch.as_tensor(v), torch.as_tensor(f), 48)
    b = sparse_sdf(v, f, 48)
    assert torch.equal(a.coords, b.coords) and torch.equal(a.values, b.values)
    q = torch.rand(300, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 2 - 1
    assert (winding_exact(q, torch.as_tensor(v[f])) - brute_winding(q.numpy(), v, f)).abs().max() < 1e-12


@pytest.mark.gpu
def test_cuda_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    v, f = sphere(4)
    keep = v[f].mean(1)[:, 2] < 0.85
    for faces in (f, f[keep]):
        a = sparse_sdf(v, faces, 256)
        b = sparse_sdf(v, faces, 256, device="cuda")
        assert torch.equal(a.coords, b.coords.cpu())
        assert (a.values - b.values.cpu()).abs().max() < 1e-4
