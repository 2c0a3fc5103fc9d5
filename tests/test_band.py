"""Band search (pipeline/geometry/band.py) on a whole small grid against brute force: every voxel kept
iff its exact distance is below the band, with that distance; edges along grid axes and lines, slivers,
big triangles; the same keys with and without the closest triangle and at any chunk size."""

import numpy as np
import pytest
import torch

from kernels.distance import point_triangle_sqdist_reference
from pipeline.geometry.band import band_pairs

RES, BAND = 24, 2.0
H = 2.0 / RES


def _c(i):
    """Voxel centre coordinate of index i."""
    return -1 + (i + 0.5) * H


def _soups():
    rng = np.random.default_rng(3)
    # Faces in grid planes with edges along the grid axes (an edge parallel to v: the scan
    # conversion's b = 0 case) and corners on voxel centres.
    plate = np.array([[[_c(3), _c(4), _c(10)], [_c(15), _c(4), _c(10)], [_c(3), _c(19), _c(10)]],
                      [[_c(5), _c(6), _c(2)], [_c(5), _c(18), _c(2)], [_c(5), _c(6), _c(20)]],
                      [[_c(8), _c(12), _c(7)], [_c(8), _c(12), _c(17)], [_c(20), _c(12), _c(7)]]])
    # Edges along grid diagonals, through voxel centres.
    m = RES // 2
    diag = np.array([[[_c(m - 6), _c(m), _c(m)], [_c(m), _c(m - 6), _c(m)], [_c(m), _c(m), _c(m + 6)]],
                     [[_c(m + 6), _c(m), _c(m)], [_c(m), _c(m + 6), _c(m)], [_c(m), _c(m), _c(m - 6)]]])
    # Random triangles: big ones across the grid, small ones, slivers.
    big = rng.uniform(-0.95, 0.95, (6, 3, 3))
    small = rng.uniform(-0.8, 0.8, (20, 1, 3)) + rng.normal(scale=0.08, size=(20, 3, 3))
    sliver = rng.uniform(-0.8, 0.8, (6, 1, 3)) + np.array([[0, 0, 0], [0.6, 0.2, -0.1], [0.3, 0.1 + 1e-3, -0.05]])
    return {"grid_aligned": plate, "grid_diagonals": diag, "random": np.concatenate([big, small, sliver])}


def _brute(tri: np.ndarray) -> torch.Tensor:
    """Exact (float64) distance in voxel widths from every voxel centre of the grid, by key."""
    idx = torch.arange(RES ** 3)
    ijk = torch.stack([idx // RES ** 2, idx // RES % RES, idx % RES], 1)
    p = -1 + (ijk.double() + 0.5) * H
    t = torch.as_tensor(tri, dtype=torch.float64)
    best = torch.full((p.shape[0],), float("inf"), dtype=torch.float64)
    for k in range(t.shape[0]):
        tk = t[k].expand(p.shape[0], 3, 3)
        best = torch.minimum(best, point_triangle_sqdist_reference(p, tk[:, 0], tk[:, 1], tk[:, 2])[0])
    return best.sqrt() / H


@pytest.mark.parametrize("name", ["grid_aligned", "grid_diagonals", "random"])
def test_band_is_every_voxel_below_the_band(name):
    tri = _soups()[name]
    exact = _brute(tri)
    bp = band_pairs(torch.as_tensor(tri, dtype=torch.float32), RES, BAND, chunk=256)
    keys = bp.keys.long()
    assert bp.keys.dtype == torch.int32 and bool((keys[1:] > keys[:-1]).all())
    want = exact < BAND
    got = torch.zeros_like(want)
    got[keys] = True
    # Only voxels within float32 rounding of the band's edge may go either way.
    edge = (exact - BAND).abs() < 1e-4
    assert int(want.sum()) > 100 and bool(((got != want) & ~edge).sum() == 0)
    assert float((bp.d2.double().sqrt() / H - exact[keys]).abs().max()) < 1e-4
    # The closest triangle is one at that distance; its feature is a valid code.
    t = torch.as_tensor(tri, dtype=torch.float64)[bp.tri]
    p = -1 + (torch.stack([keys // RES ** 2, keys // RES % RES, keys % RES], 1).double() + 0.5) * H
    own = point_triangle_sqdist_reference(p, t[:, 0], t[:, 1], t[:, 2])[0].sqrt() / H
    assert float((own - exact[keys]).abs().max()) < 1e-4
    assert int(bp.feature.max()) <= 6


@pytest.mark.parametrize("chunk", [1, 64, 1 << 20])
def test_same_band_without_closest_and_at_any_chunk(chunk):
    tri = torch.as_tensor(_soups()["random"], dtype=torch.float32)
    ref = band_pairs(tri, RES, BAND, chunk=1 << 12)
    for closest in (True, False):
        bp = band_pairs(tri, RES, BAND, chunk=chunk, closest=closest)
        assert torch.equal(bp.keys, ref.keys) and torch.equal(bp.d2, ref.d2)
        assert (bp.tri is None) == (not closest)


@pytest.mark.gpu
def test_cuda_band_matches_cpu():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    soup = _soups()["random"]
    exact = _brute(soup)
    tri = torch.as_tensor(soup, dtype=torch.float32)
    cpu = band_pairs(tri, RES, BAND)
    for closest in (True, False):
        gpu = band_pairs(tri.cuda(), RES, BAND, chunk=1 << 23, closest=closest)
        a, b = cpu.keys.long().numpy(), gpu.keys.long().cpu().numpy()
        # Both are exact to float32 rounding: they may differ only at the band's edge.
        assert bool(((exact[np.setxor1d(a, b)] - BAND).abs() < 1e-4).all())
        both, ia, ib = np.intersect1d(a, b, return_indices=True)
        da, db = cpu.d2[ia].double().sqrt(), gpu.d2.cpu()[ib].double().sqrt()
        assert len(both) > 100 and float((da - db).abs().max()) < 1e-4 * H
