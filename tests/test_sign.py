"""Sign against the exact winding number on every kind of mesh that breaks naive tests (CPU and GPU).

Target: no voxel farther than 0.1 voxel from the surface disagrees with the exact
winding number (summed over every triangle in float64) where that number is below
0.4 or above 0.6, at 256^3 (whole band, sampled) and 1024^3 (a block of the band).
"""

import numpy as np
import pytest
import torch

from pipeline.geometry.sdf import prepare_mesh, sdf_on_grid
from pipeline.geometry.winding import winding_exact
from sign_cases import CASES

SAMPLE = 3000


def _winding_reference(v, f, points):
    """Exact w of the mesh with its closed components turned outward (the documented rule)."""
    prep = prepare_mesh(v, f, device="cpu")  # the re-oriented triangles; distances do not depend on it
    return winding_exact(points.double().cpu(), prep.tri.double())


def _pick(sdf, prep, n, seed=0):
    """Random band voxels."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(sdf.coords.shape[0], generator=g)[:n]
    return idx


def _check(v, f, sdf, idx):
    pts = sdf.centers()[idx].cpu()
    w = _winding_reference(v, f, pts)
    d = sdf.distance()[idx].cpu().double()
    clear = ((w < 0.4) | (w > 0.6)) & (d.abs() > 0.1 * sdf.voxel_size)
    wrong = clear & ((d < 0) != (w >= 0.5))
    assert clear.sum() > len(idx) // 2
    assert int(wrong.sum()) == 0, f"{int(wrong.sum())} of {int(clear.sum())} clear voxels have the wrong sign"
    # Beyond the target: the rule is evaluated exactly, so even w near 0.5 (under a sheet's crests,
    # at a hole's rim) decides right, up to float64 rounding.
    decided = ((w - 0.5).abs() > 1e-6) & (d != 0)
    assert int((decided & ((d < 0) != (w >= 0.5))).sum()) == 0
    return w


def _crossings(prep):
    """Where the mesh's triangles pass through each other (the hard places for any sign test)."""
    from pipeline.geometry.crossings import triangle_crossings

    verts, inv = torch.unique(prep.tri.reshape(-1, 3), dim=0, return_inverse=True)
    return triangle_crossings(prep.tri, inv.reshape(-1, 3), 1e-4)


def _crossed_voxels(sdf, prep, n):
    """Band voxels whose closest face another triangle passes through."""
    from pipeline.geometry.band import band_pairs

    bp = band_pairs(prep.tri, sdf.resolution, sdf.band)
    crossed = _crossings(prep).crossed[bp.tri].cpu().nonzero().squeeze(1)
    return crossed[torch.randperm(crossed.numel(), generator=torch.Generator().manual_seed(1))[:n]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_sign_matches_exact_winding_at_256(case):
    v, f = CASES[case]()
    prep = prepare_mesh(v, f)
    sdf = sdf_on_grid(prep, 256)
    idx = torch.cat([_pick(sdf, prep, SAMPLE), _crossed_voxels(sdf, prep, SAMPLE)])
    w = _check(v, f, sdf, idx)
    if case == "nested_shells":
        assert set(torch.round(w).long().tolist()) >= {0, 1, 2, 3}
    if case == "inverted_closed":
        assert prep.sign.flipped == 1 and prep.sign.method == "lines"
        assert (sdf.values < 0).sum() > 0.3 * sdf.values.numel()
    if case == "overlapping_convex_pieces":
        assert _crossings(prep).crossed.sum() > 100 and prep.sign.flipped == 2


def _block(prep, size=96):
    """A size^3 block of the 1024^3 grid around where two surfaces cross (else around a face)."""
    cr = _crossings(prep)
    at = cr.seg[0, 0] if cr.seg.shape[0] else prep.tri[0].mean(0).double()
    lo = ((at.cpu() + 1) * 512).long() - size // 2
    return tuple(lo.tolist()), tuple((lo + size).tolist())


@pytest.mark.parametrize("case", sorted(CASES))
def test_sign_matches_exact_winding_in_a_1024_block(case):
    v, f = CASES[case]()
    prep = prepare_mesh(v, f)
    sdf = sdf_on_grid(prep, 1024, region=_block(prep))
    assert sdf.coords.shape[0] > 1000
    _check(v, f, sdf, _pick(sdf, prep, SAMPLE))


def test_region_equals_the_whole_band_cut_to_the_box():
    v, f = CASES["overlapping_convex_pieces"]()
    prep = prepare_mesh(v, f)
    whole = sdf_on_grid(prep, 128)
    lo, hi = (40, 30, 50), (90, 100, 80)
    part = sdf_on_grid(prep, 128, region=(lo, hi))
    keep = ((whole.coords >= torch.tensor(lo)) & (whole.coords < torch.tensor(hi))).all(1)
    assert torch.equal(part.coords, whole.coords[keep]) and torch.equal(part.values, whole.values[keep])


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_cuda_sign_matches_exact_winding(case):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    v, f = CASES[case]()
    prep = prepare_mesh(v, f, device="cuda")
    for res, region in ((256, None), (1024, _block(prep))):
        sdf = sdf_on_grid(prep, res, region=region)
        _check(v, f, sdf, _pick(sdf, prep, SAMPLE))
        cpu = sdf_on_grid(prepare_mesh(v, f), res, region=region)
        # Same voxels up to those at distance band*h within float32 rounding (two distance formulas).
        assert abs(sdf.coords.shape[0] - cpu.coords.shape[0]) <= 1e-4 * cpu.coords.shape[0] + 1


def test_unwelded_faces_are_welded_for_the_sign():
    # STL and many GLB meshes repeat each vertex per face: after welding it is one closed surface again.
    v, f = CASES["inverted_closed"]()
    soup_v = v[f].reshape(-1, 3)
    soup_f = np.arange(len(soup_v)).reshape(-1, 3)
    a, b = prepare_mesh(v, f), prepare_mesh(soup_v, soup_f)
    assert b.sign.method == "lines" and b.sign.flipped == 1
    sa, sb = sdf_on_grid(a, 96), sdf_on_grid(b, 96)
    assert torch.equal(sa.coords, sb.coords) and torch.equal(sa.values, sb.values)


def _box(lo, hi):
    v = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])], float)
    f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                  [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]])
    return v, f


def _on_grid_lines(res):
    """Corners and edges exactly on the grid lines of voxel centres (CAD meshes, symmetric scans): two
    overlapping boxes, one inward, and an octahedron whose edges run along diagonals of the grid."""
    c = lambda i: -1 + (i + 0.5) * 2 / res  # noqa: E731  (a voxel centre coordinate)
    b1 = _box((c(4), c(6), c(5)), (c(res - 8), c(res - 10), c(res - 6)))
    b2 = _box((c(10), c(3), c(8)), (c(res - 4), c(res - 14), c(res - 3)))
    m = res // 2
    ov = np.array([[c(m - 12), c(m), c(m)], [c(m + 12), c(m), c(m)], [c(m), c(m - 12), c(m)],
                   [c(m), c(m + 12), c(m)], [c(m), c(m), c(m - 12)], [c(m), c(m), c(m + 12)]])
    of = np.array([[0, 2, 4], [2, 1, 4], [1, 3, 4], [3, 0, 4], [2, 0, 5], [1, 2, 5], [3, 1, 5], [0, 3, 5]])
    v = np.concatenate([b1[0], b2[0], ov])
    return v, np.concatenate([b1[1], b2[1][:, ::-1] + 8, of + 16])


@pytest.mark.parametrize("res", [32, 64])
def test_grid_lines_through_vertices_and_edges(res):
    v, f = _on_grid_lines(res)
    prep = prepare_mesh(v, f)
    assert prep.sign.method == "lines"
    sdf = sdf_on_grid(prep, res)
    w = winding_exact(sdf.centers().double(), prep.tri.double())
    d = sdf.distance().double()
    # Voxel centres on a face (d = 0 up to float32 rounding) may take either side.
    decided = ((w - 0.5).abs() > 1e-6) & (d.abs() > 1e-5 * sdf.voxel_size)
    assert decided.sum() > 0.5 * d.numel()
    assert int((decided & ((d < 0) != (w >= 0.5))).sum()) == 0


@pytest.mark.gpu
@pytest.mark.parametrize("case", ["grid_lines", "scan_like"])
def test_cuda_line_counts_equal_cpu(case):
    # The line crossings are exact predicates in float64: CUDA and CPU must give the same integers.
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from pipeline.geometry.winding import LineCrossings

    if case == "grid_lines":
        v, f, res = *_on_grid_lines(64), 64
    else:
        from benchmarks.preprocess import scan_like_mesh

        (v, f), res = scan_like_mesh(), 512
    prep = prepare_mesh(v, f)
    sdf = sdf_on_grid(prep, res)
    cpu = LineCrossings(prep.tri.double(), res)(sdf.coords)
    gpu = LineCrossings(prep.tri.double().cuda(), res)(sdf.coords.cuda())
    assert torch.equal(cpu, gpu.cpu())
    on_gpu = sdf_on_grid(prepare_mesh(v, f, device="cuda"), res)
    # The bands may differ only where float32 rounding decides: voxels at the band's edge (a grid-aligned
    # mesh puts hundreds exactly 2 voxels from a face), each kept by one side and not the other.
    for a, b in ((sdf, on_gpu), (on_gpu, sdf)):
        keys_a, keys_b = ((c.cpu().long() * torch.tensor([res * res, res, 1])).sum(1) for c in (a.coords, b.coords))
        only_a = ~torch.isin(keys_a, keys_b)
        edge = (a.distance().cpu().abs()[only_a] / a.voxel_size - 2.0).abs()
        assert only_a.sum() <= 0.01 * keys_a.numel() and bool((edge < 1e-4).all()), (int(only_a.sum()), edge.max())
