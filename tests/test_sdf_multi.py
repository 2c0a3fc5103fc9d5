"""Several resolutions of one mesh share its preparation and equal separate `sparse_sdf` calls."""

import numpy as np
import pytest
import torch
import trimesh
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

import pipeline.geometry.sdf as sdf_module
from pipeline.geometry.sdf import sparse_sdf, sparse_sdf_multi
from pipeline.geometry.sign import count_components, mesh_topology


def _sphere(subdivisions=3):
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=0.9)
    return np.asarray(m.vertices), np.asarray(m.faces)


def _open_two_shells():
    """An icosphere with a cap cut away beside a separate box: open and two components."""
    m = trimesh.creation.icosphere(subdivisions=3, radius=0.45)
    v, f = np.asarray(m.vertices) - [0.4, 0.0, 0.0], np.asarray(m.faces)
    f = f[v[f].mean(1)[:, 2] < 0.35]
    b = trimesh.creation.box(extents=(0.5, 0.6, 0.7))
    bv = np.asarray(b.vertices) + [0.55, 0.1, -0.2]
    return np.concatenate([v, bv]), np.concatenate([f, np.asarray(b.faces) + len(v)])


@pytest.mark.parametrize("mesh, sign", [(_sphere, "winding"), (_open_two_shells, "winding"),
                                        (_open_two_shells, "pseudonormal"), (_sphere, "none")])
def test_multi_equals_separate_calls(mesh, sign):
    v, f = mesh()
    many = sparse_sdf_multi(v, f, [48, 96, 32], sign=sign)
    assert list(many) == [48, 96, 32]
    for res, got in many.items():
        want = sparse_sdf(v, f, res, sign=sign)
        assert got.resolution == res and got.band == 2.0
        assert torch.equal(got.coords, want.coords)
        assert torch.equal(got.values, want.values)
    if sign == "winding" and mesh is _open_two_shells:
        assert (many[96].values < 0).any() and (many[96].values > 0).any()


def test_multi_prepares_the_mesh_once(monkeypatch):
    calls = []
    real = sdf_module.prepare_sign

    def counting(*args):
        calls.append(args[0])
        return real(*args)

    monkeypatch.setattr(sdf_module, "prepare_sign", counting)
    v, f = _open_two_shells()
    out = sparse_sdf_multi(v, f, (32, 64, 128), band=1.5)
    assert calls == ["winding"] and sorted(out) == [32, 64, 128]
    assert all(s.band == 1.5 for s in out.values())


def test_multi_errors_name_the_resolution_and_option():
    v, f = _sphere(1)
    with pytest.raises(ValueError, match="resolution 2048"):
        sparse_sdf_multi(v, f, [64, 2048])
    with pytest.raises(ValueError, match="empty"):
        sparse_sdf_multi(v, f, [])
    with pytest.raises(ValueError, match="unknown sparse_sdf option"):
        sparse_sdf_multi(v, f, [64], signs="none")
    with pytest.raises(ValueError, match="NaN"):
        sparse_sdf_multi(np.full_like(v, np.nan), f, [64])


def test_component_count_matches_scipy():
    v, f = _sphere(4)
    rng = np.random.default_rng(0)
    for keep in (1.0, 0.7, 0.3, 0.05):
        sub = torch.as_tensor(f[rng.random(len(f)) < keep])
        topo = mesh_topology(sub, len(v))
        n_e, n_f = topo.edge_faces.numel(), sub.shape[0]
        graph = coo_matrix((np.ones(3 * n_f), (topo.face_edges.reshape(-1).numpy(), np.repeat(np.arange(n_f), 3) + n_e)),
                           shape=(n_e + n_f,) * 2)
        want = np.unique(connected_components(graph, directed=False)[1][n_e:]).size
        assert topo.components == want == count_components(topo.face_edges, n_e)


@pytest.mark.gpu
def test_multi_on_cuda_equals_separate_calls_and_cpu():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    v, f = _open_two_shells()
    vt, ft = torch.as_tensor(v, dtype=torch.float32, device="cuda"), torch.as_tensor(f, device="cuda")
    many = sparse_sdf_multi(vt, ft, [64, 128])
    for res, got in many.items():
        want = sparse_sdf(vt, ft, res)
        assert got.coords.is_cuda and torch.equal(got.coords, want.coords) and torch.equal(got.values, want.values)
        cpu = sparse_sdf(v, f, res)
        # Voxels at distance band*h to float32 rounding may differ between the two distance formulations.
        key = lambda c: ((c[:, 0].long() * res + c[:, 1]) * res + c[:, 2]).cpu().numpy()
        common, i_gpu, i_cpu = np.intersect1d(key(got.coords), key(cpu.coords), return_indices=True)
        assert len(common) >= (1 - 1e-4) * max(got.coords.shape[0], cpu.coords.shape[0])
        agree = torch.sign(got.values.cpu()[i_gpu]) == torch.sign(cpu.values[i_cpu])
        assert agree.float().mean() > 1 - 1e-3


def test_probe_values_are_within_their_bound_of_the_exact_winding_number():
    from pipeline.geometry.sdf import prepare_mesh
    from pipeline.geometry.sign import _PROBE_OFFSET
    from pipeline.geometry.winding import winding_exact

    v, f = _open_two_shells()
    prep = prepare_mesh(v, f).sign
    assert prep.method == "winding" and prep.chain is not None
    for side, sgn in ((0, 1.0), (1, -1.0)):  # the inner value comes from the outer one and the face's own angle
        exact = winding_exact(prep.centroid + sgn * _PROBE_OFFSET * prep.normal, prep.tri64)
        # Exact up to what the boundary can change over the probe's offset (the drift bound covers it).
        assert ((prep.side_values[:, side] - exact).abs() <= prep.side_err + prep.drift(0.0)).all()
    assert prep.side_err.max() <= 1e-6
