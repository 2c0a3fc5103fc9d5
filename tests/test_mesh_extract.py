"""Sparse marching tetrahedra against skimage's marching cubes on small dense grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import trimesh
from skimage.measure import marching_cubes

from model.mesh_extract import extract_mesh
from model.metrics import mesh_metrics
from model.sdf_shapes import AnalyticShape, narrow_band, voxel_centres

SHAPES = [
    AnalyticShape("sphere", (0.6,)),
    AnalyticShape("torus", (0.5, 0.2), (0.3, 0.2, 0.1)),
    AnalyticShape("box", (0.5, 0.3, 0.4), (0.4, 0.1, 0.7)),
]


def _dense(shape: AnalyticShape, res: int):
    r = torch.arange(res)
    grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    return grid.to(torch.int32), shape.sdf(voxel_centres(grid, res)).float()


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.kind)
def test_matches_skimage_on_dense_grid(shape):
    res = 32
    coords, values = _dense(shape, res)
    v, f = extract_mesh(coords, values, res)
    mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    sv, sf, _, _ = marching_cubes(values.reshape(res, res, res).numpy(), 0.0)
    ref = trimesh.Trimesh(-1 + (sv + 0.5) * 2 / res, sf, process=False)
    assert mesh.is_watertight and mesh.is_winding_consistent
    assert mesh.volume > 0  # faces wound outwards (negative SDF inside)
    assert abs(mesh.volume - abs(ref.volume)) / abs(ref.volume) < 0.01
    assert abs(mesh.area - ref.area) / ref.area < 0.01
    # same surface up to a small fraction of a voxel (h = 1/16)
    m = mesh_metrics((v, f), (torch.from_numpy(ref.vertices), torch.from_numpy(ref.faces)), samples=5000)
    assert m.chamfer < 0.1 * 2 / res
    # shared vertices, no duplicate or degenerate faces
    assert len(np.unique(v.numpy(), axis=0)) == len(v)
    assert len(np.unique(np.sort(f.numpy(), 1), axis=0)) == len(f)
    assert (f[:, 0] != f[:, 1]).all() and (f[:, 1] != f[:, 2]).all() and (f[:, 0] != f[:, 2]).all()


def test_sparse_band_gives_the_dense_result_and_genus():
    shape = SHAPES[1]
    res = 48
    coords, values = narrow_band(shape, res)
    assert len(coords) < 0.3 * res ** 3
    v, f = extract_mesh(coords, values, res)
    dense_v, dense_f = extract_mesh(*_dense(shape, res), res)
    mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=False)
    assert mesh.is_watertight and mesh.euler_number == 0  # a torus
    assert len(f) == len(dense_f)
    assert abs(mesh.area - 4 * math.pi ** 2 * 0.5 * 0.2) < 0.02 * mesh.area


def test_bad_input_named():
    c = torch.tensor([[1, 2, 3], [1, 2, 3]], dtype=torch.int32)
    with pytest.raises(ValueError, match="duplicated"):
        extract_mesh(c, torch.tensor([0.1, -0.1]), 8)
    with pytest.raises(ValueError, match="NaN"):
        extract_mesh(c[:1], torch.tensor([float("nan")]), 8)
    with pytest.raises(ValueError, match="empty"):
        extract_mesh(c[:0], torch.zeros(0), 8)
    v, f = extract_mesh(c[:1], torch.tensor([0.5]), 8)
    assert len(f) == 0


def test_fill_closes_surfaces_where_the_sparse_set_ends():
    # a solid block of negative voxels with nothing around it: without fill there are no cells with a
    # sign change; filled with 1 outside (the release's dense grid of ones) it is a closed box
    r = torch.arange(4, 8)
    coords = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    values = torch.full((len(coords),), -0.5)
    v, f = extract_mesh(coords, values, 16)
    assert len(f) == 0
    v, f = extract_mesh(coords, values, 16, level=0.2, fill=1.0)
    import trimesh

    mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=True)
    assert mesh.is_watertight and mesh.volume > 0
    # the surface sits between the last voxel centre and the filled one, at (0.2 + 0.5) / 1.5 of the way
    h = 2 / 16
    centre_last = -1 + (7 + 0.5) * h
    assert abs(float(v[:, 0].max()) - (centre_last + h * 0.7 / 1.5)) < 1e-5


def test_fill_closes_a_shape_that_reaches_the_grid_border():
    # a slab of negative voxels touching two opposite faces of the grid: with fill, one layer of fill just
    # outside the grid closes it there (a dense grid that ends at the border would leave two open ends)
    r, z = torch.arange(0, 8), torch.arange(3, 6)
    coords = torch.stack(torch.meshgrid(r, z, z, indexing="ij"), -1).reshape(-1, 3)
    values = torch.full((len(coords),), -0.5)
    v, f = extract_mesh(coords, values, 8, level=0.0, fill=1.0)
    import trimesh

    mesh = trimesh.Trimesh(v.numpy(), f.numpy(), process=True)
    assert mesh.is_watertight and mesh.volume > 0
    # the caps sit a third of the way from the border voxels' centres to the outer layer's: beyond ±(1 − h/2)
    h = 2 / 8
    assert abs(float(v[:, 0].max()) - (1 - h / 2 + h / 3)) < 1e-5
    assert abs(float(v[:, 0].min()) + (1 - h / 2 + h / 3)) < 1e-5


def test_border_caps_stay_inside_the_unit_cube():
    # values below -1 would put the cap beyond the border (t = v / (v - 1) > 1/2): clamped onto it
    r, z = torch.arange(0, 8), torch.arange(3, 6)
    coords = torch.stack(torch.meshgrid(r, z, z, indexing="ij"), -1).reshape(-1, 3)
    v, f = extract_mesh(coords, torch.full((len(coords),), -3.0), 8, level=0.0, fill=1.0)
    import trimesh

    assert float(v.abs().max()) <= 1.0 and trimesh.Trimesh(v.numpy(), f.numpy(), process=True).is_watertight


def _band_decode(sdf_of, res: int = 32, latent_res: int = 8, band: float = 1.5):
    """What a band-trained decoder gives: every voxel of the latent voxels that hold the band, valued by the
    SDF in voxels clipped to ±1, the saturated +1 voxels dropped (as the cascade drops them)."""
    from model.sdf_shapes import voxel_centres

    r = torch.arange(res)
    grid = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    d = sdf_of(voxel_centres(grid, res)) * res / 2  # in voxels
    f = res // latent_res
    latent = torch.unique(grid[d.abs() <= band] // f, dim=0)
    mask = torch.zeros((latent_res,) * 3, dtype=torch.bool)
    mask[latent[:, 0], latent[:, 1], latent[:, 2]] = True
    inside = mask[grid[:, 0] // f, grid[:, 1] // f, grid[:, 2] // f]
    values = (d / band).clamp(-1, 1)
    keep = inside & (values < 0.999)
    return grid[keep], values[keep].float(), latent


def _parts(v, f):
    return len(trimesh.Trimesh(v.numpy(), f.numpy(), process=True).split(only_watertight=False))


def test_enclosed_fill_gives_a_solid_its_core_and_a_cavity_stays_empty():
    """A solid box decoded on its band: the +1 fill makes its core outside, so a second wall runs along the
    band's inner edge (two parts); the enclosed region's own sign closes the core (one part, the box's volume).
    A hollow sphere's cavity is faced by positive voxels: it stays outside, inner wall and all."""
    from model.mesh_extract import enclosed_fill

    res, lres = 32, 8
    box = AnalyticShape("box", (0.6, 0.55, 0.5))
    coords, values, latent = _band_decode(lambda p: box.sdf(p), res, lres)
    v1, f1 = extract_mesh(coords, values, res, fill=1.0)
    fill = enclosed_fill(coords, values, res, latent, lres)
    v2, f2 = extract_mesh(coords, values, res, fill=fill)
    assert _parts(v1, f1) == 2 and _parts(v2, f2) == 1
    solid = trimesh.Trimesh(v2.numpy(), f2.numpy(), process=True)
    assert solid.is_watertight and abs(solid.volume - 8 * 0.6 * 0.55 * 0.5) / (8 * 0.6 * 0.55 * 0.5) < 0.05
    # outside the grid and in the empty region around the box: +1; in the core: −1
    probe = torch.tensor([[-1, 5, 5], [0, 0, 0], [16, 16, 16]])
    assert fill(probe).tolist() == [1.0, 1.0, -1.0]

    shell = lambda p: torch.maximum(p.norm(dim=-1) - 0.8, 0.45 - p.norm(dim=-1))  # noqa: E731
    coords, values, latent = _band_decode(shell, res, lres)
    v1, f1 = extract_mesh(coords, values, res, fill=1.0)
    v2, f2 = extract_mesh(coords, values, res, fill=enclosed_fill(coords, values, res, latent, lres))
    assert torch.equal(f1, f2) and torch.equal(v1, v2) and _parts(v2, f2) == 2
    with pytest.raises(ValueError, match="not a multiple of the latent grid 7"):
        enclosed_fill(coords, values, res, latent, 7)
