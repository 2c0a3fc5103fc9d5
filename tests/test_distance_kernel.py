"""Point-to-triangle distance: PyTorch reference vs dense sampling, Triton kernel vs reference."""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from kernels.distance import point_triangle_sqdist, point_triangle_sqdist_reference


def _sampled_sqdist(points, tri, n=301):
    """Squared distance to a dense barycentric sampling of each triangle (an upper bound)."""
    u = torch.linspace(0, 1, n, dtype=torch.float64)
    uu, vv = torch.meshgrid(u, u, indexing="ij")
    keep = uu + vv <= 1
    uu, vv = uu[keep], vv[keep]
    a, b, c = tri[:, 0:1], tri[:, 1:2], tri[:, 2:3]
    q = a + uu[None, :, None] * (b - a) + vv[None, :, None] * (c - a)
    return ((q - points[:, None]) ** 2).sum(-1).min(1).values


def test_reference_matches_dense_sampling():
    g = torch.Generator().manual_seed(1)
    p = torch.randn(400, 3, generator=g, dtype=torch.float64)
    tri = torch.randn(400, 3, 3, generator=g, dtype=torch.float64)
    d2, feat = point_triangle_sqdist_reference(p, tri[:, 0], tri[:, 1], tri[:, 2])
    sampled = _sampled_sqdist(p, tri)
    # Sampling can only overestimate; its grid spacing bounds how much.
    assert (sampled - d2).min() > -1e-12
    assert ((sampled.sqrt() - d2.sqrt()) < 0.02).all()
    assert set(feat.unique().tolist()) == set(range(7)), "every region should occur on random data"


def test_features_on_known_points():
    tri = torch.tensor([[[0.0, 0, 0], [1, 0, 0], [0, 1, 0]]]).expand(7, -1, -1)
    p = torch.tensor(
        [[0.2, 0.2, 0.5], [0.5, -1, 0], [1, 1, 0], [-1, 0.5, 0], [-1, -1, 0], [2, -0.5, 0], [-0.5, 2, 1]]
    )
    d2, feat = point_triangle_sqdist(p, tri, torch.arange(7), backend="torch")
    assert feat.tolist() == [0, 1, 2, 3, 4, 5, 6]
    expect = torch.tensor([0.25, 1.0, 0.5, 1.0, 2.0, 1.25, 0.25 + 1 + 1])
    torch.testing.assert_close(d2, expect)


_INTERPRETED = textwrap.dedent(
    """
    import torch
    from kernels.distance import point_triangle_sqdist
    torch.manual_seed(0)
    for n, f, idx_dtype in [(0, 3, torch.int64), (1, 1, torch.int32), (1023, 17, torch.int64), (3000, 200, torch.int32)]:
        p = torch.randn(n, 3)
        tri = torch.randn(f, 3, 3)
        idx = torch.randint(0, f, (n,), dtype=idx_dtype)
        d_ref, f_ref = point_triangle_sqdist(p, tri, idx, backend="torch")
        d_tri, f_tri = point_triangle_sqdist(p, tri, idx, backend="triton")
        assert d_tri.shape == (n,) and f_tri.dtype == torch.uint8
        torch.testing.assert_close(d_tri, d_ref, rtol=1e-5, atol=1e-6)
        # A feature may differ only on a near-tie between regions, where the distance agrees anyway.
        assert (f_tri != f_ref).sum().item() <= n // 1000, n
    print("ok")
    """
)


def test_triton_kernel_in_interpreter_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")  # read when triton.jit decorates, so set before import
    out = subprocess.run(
        [sys.executable, "-c", _INTERPRETED], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


_COLUMNS = textwrap.dedent(
    """
    import torch
    from kernels.distance import column_candidates, max_column_voxels
    g = torch.Generator().manual_seed(0)
    for res, n_tri, n_col, band in [(32, 1, 1, 2.0), (32, 40, 3000, 2.0), (48, 300, 5000, 2.0), (64, 50, 2000, 3.0)]:
        tri = torch.rand(n_tri, 3, 3, generator=g) * 1.8 - 0.9
        order = torch.stack([torch.randperm(3, generator=g) for _ in range(n_tri)])
        stride = torch.tensor([res * res, res, 1])[order].T.contiguous()  # (3, F): u, v, w strides
        col_t = torch.randint(0, n_tri, (n_col,), generator=g)
        count = torch.randint(0, max_column_voxels(band) + 1, (n_col,), generator=g)
        count[::7] = 0  # empty columns among full ones
        iu, iv = torch.randint(0, res, (2, n_col), generator=g)
        w_lo = (torch.rand(n_col, generator=g) * (res - count + 1)).long()
        for closest in (True, False):
            ref = column_candidates(tri, stride, col_t, iu, iv, w_lo, count, res, band, closest, backend="torch")
            got = column_candidates(tri, stride, col_t, iu, iv, w_lo, count, res, band, closest, backend="triton")
            assert (got[0] is None) == (not closest) and got[1].shape == (int(count.sum()),)
            # Same packing: keys (with the band flag) and triangles exact, d2 to float32 rounding.
            if closest:
                assert torch.equal(got[0], ref[0])
                owner = [w & 0xFFFFFFFF for w in (got[1], ref[1])]
                assert torch.equal(owner[0] >> 3, owner[1] >> 3)
                # A feature may differ only on a near-tie between regions, where the distance agrees anyway.
                assert int(((owner[0] & 7) != (owner[1] & 7)).sum()) <= owner[0].numel() // 1000
                d2 = [(w >> 32).to(torch.int32).view(torch.float32) for w in (got[1], ref[1])]
            else:
                assert torch.equal(got[1] >> 32, ref[1] >> 32)
                d2 = [(w & 0xFFFFFFFF).to(torch.int32).view(torch.float32) for w in (got[1], ref[1])]
            torch.testing.assert_close(d2[0], d2[1], rtol=1e-6, atol=1e-7)
    print("ok")
    """
)


def test_column_kernel_in_interpreter_matches_reference():
    env = dict(os.environ, TRITON_INTERPRET="1")
    out = subprocess.run([sys.executable, "-c", _COLUMNS], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]


def test_column_reference_matches_point_distances():
    from kernels.distance import column_candidates

    g = torch.Generator().manual_seed(4)
    res, band = 16, 2.0
    tri = torch.rand(3, 3, 3, generator=g) * 1.6 - 0.8
    stride = torch.tensor([[1, res * res, res], [res, 1, res * res], [res * res, res, 1]])  # (3 uvw, F)
    col_t, iu, iv = torch.tensor([0, 1, 2, 2]), torch.tensor([1, 5, 0, 15]), torch.tensor([2, 9, 15, 3])
    w_lo, count = torch.tensor([0, 3, 10, 8]), torch.tensor([5, 0, 6, 8])
    key, word = column_candidates(tri, stride, col_t, iu, iv, w_lo, count, res, band)
    want = torch.cat([iu[c] * stride[0, col_t[c]] + iv[c] * stride[1, col_t[c]]
                      + (w_lo[c] + torch.arange(int(count[c]))) * stride[2, col_t[c]] for c in range(4)])
    assert torch.equal(key & ((1 << 30) - 1), want)
    ijk = torch.stack([want // res ** 2, want // res % res, want % res], 1)
    t = tri[torch.repeat_interleave(col_t, count)]
    d2, feat = point_triangle_sqdist_reference(-1 + (ijk.float() + 0.5) * (2 / res), t[:, 0], t[:, 1], t[:, 2])
    assert torch.equal((word >> 32).to(torch.int32).view(torch.float32), d2)
    assert torch.equal(word & 7, feat.long()) and torch.equal(word >> 3 & 0xFFFFFFF, torch.repeat_interleave(col_t, count))
    assert torch.equal(key >= 1 << 30, d2 >= (band * 2 / res) ** 2)


def test_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        point_triangle_sqdist(torch.zeros(1, 3), torch.zeros(1, 3, 3), torch.zeros(1, dtype=torch.long), backend="x")
    with pytest.raises(ValueError, match="tri_index"):
        point_triangle_sqdist(torch.zeros(2, 3), torch.zeros(1, 3, 3), torch.zeros(1, dtype=torch.long))


@pytest.mark.gpu
def test_triton_kernel_on_cuda_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator(device="cuda").manual_seed(0)
    for n in (1, 4097, 1_000_003):
        p = torch.randn(n, 3, device="cuda", generator=g)
        tri = torch.randn(5000, 3, 3, device="cuda", generator=g)
        idx = torch.randint(0, 5000, (n,), device="cuda", generator=g)
        d_tri, f_tri = point_triangle_sqdist(p, tri, idx)
        t = tri[idx].double()
        d_ref, f_ref = point_triangle_sqdist_reference(p.double(), t[:, 0], t[:, 1], t[:, 2])
        torch.testing.assert_close(d_tri.double(), d_ref, rtol=1e-4, atol=1e-5)
        assert (f_tri != f_ref).float().mean().item() <= 1e-3


@pytest.mark.gpu
def test_column_kernel_on_cuda_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from kernels.distance import column_candidates, max_column_voxels

    g = torch.Generator().manual_seed(5)
    res, band, n_tri, n_col = 1024, 2.0, 5000, 300_000
    tri = torch.rand(n_tri, 3, 3, generator=g) * 1.8 - 0.9
    stride = torch.tensor([res * res, res, 1])[torch.stack([torch.randperm(3, generator=g) for _ in range(n_tri)])].T
    col_t = torch.randint(0, n_tri, (n_col,), generator=g)
    count = torch.randint(0, max_column_voxels(band) + 1, (n_col,), generator=g)
    iu, iv = torch.randint(0, res, (2, n_col), generator=g)
    w_lo = (torch.rand(n_col, generator=g) * (res - count + 1)).long()
    args = [x.contiguous() for x in (tri, stride, col_t, iu, iv, w_lo, count)]
    for closest in (True, False):
        ref = column_candidates(*args, res, band, closest, backend="torch")
        got = column_candidates(*[x.cuda() for x in args], res, band, closest)
        # Voxel centres are exact at a power-of-two resolution: the same keys; d2 to float32 rounding.
        k_ref, k_got = (ref[0], got[0].cpu()) if closest else (ref[1] >> 32, got[1].cpu() >> 32)
        edge = (k_ref ^ k_got) == 1 << 30  # the band flag may flip where d2 rounds across the band's edge
        assert torch.equal(k_ref[~edge], k_got[~edge]) and int(edge.sum()) <= 10
        bits = (lambda w: (w >> 32).to(torch.int32)) if closest else (lambda w: (w & 0xFFFFFFFF).to(torch.int32))
        d_ref, d_got = bits(ref[1]).view(torch.float32), bits(got[1].cpu()).view(torch.float32)
        torch.testing.assert_close(d_got, d_ref, rtol=1e-4, atol=1e-8)


def test_triangle_frame_path_matches_reference():
    from kernels.distance.frame import sqdist_in_frame, triangle_frames

    g = torch.Generator().manual_seed(2)
    p = torch.randn(5000, 3, generator=g)
    tri = torch.randn(5000, 3, 3, generator=g)
    rot, shape = triangle_frames(tri)
    loc = torch.einsum("nij,nj->ni", rot, p.double() - tri[:, 0].double()).float()
    d2, feat = sqdist_in_frame(loc[:, 0], loc[:, 1], loc[:, 2], shape.float())
    t = tri.double()
    d_ref, f_ref = point_triangle_sqdist_reference(p.double(), t[:, 0], t[:, 1], t[:, 2])
    torch.testing.assert_close(d2.double(), d_ref, rtol=1e-5, atol=1e-6)
    assert (feat != f_ref).sum().item() <= 5
