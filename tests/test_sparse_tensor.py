"""SparseTensor structure checks, map caching, and the sparse layers against dense equivalents."""

from __future__ import annotations

import pytest
import torch

from model.sparse import (
    SparseConv3d,
    SparseConvDown,
    SparseDownsample,
    SparseGroupNorm,
    SparseLinear,
    SparseSubdivide,
    SparseTensor,
    SparseTransformerBlock,
    SparseWindowAttention,
    window_partition,
)


def make(res=16, count=400, batch=2, channels=4, seed=0) -> SparseTensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.cat([torch.randint(0, batch, (count, 1), generator=g), torch.randint(0, res, (count, 3), generator=g)], 1)
    c = torch.unique(c, dim=0).to(torch.int32)
    return SparseTensor(c, torch.randn(c.shape[0], channels, generator=g, dtype=torch.float64), res)


def test_bad_structures_are_named():
    c = torch.tensor([[0, 1, 2, 3], [0, 1, 2, 4]], dtype=torch.int32)
    f = torch.zeros(2, 1)
    with pytest.raises(ValueError, match="empty structure"):
        SparseTensor(c[:0], f[:0], 8)
    with pytest.raises(ValueError, match="out of range"):
        SparseTensor(c, f, 4)
    with pytest.raises(ValueError, match="duplicated"):
        SparseTensor(c[[0, 0]], f, 8)
    with pytest.raises(ValueError, match="not sorted"):
        SparseTensor(c[[1, 0]], f, 8)
    with pytest.raises(ValueError, match="int32"):
        SparseTensor(c.long(), f, 8)
    with pytest.raises(ValueError, match="feats"):
        SparseTensor(c, torch.zeros(3, 1), 8)
    x = SparseTensor.from_unsorted(c[[1, 0]], f, 8)
    assert torch.equal(x.coords, c)
    with pytest.raises(ValueError, match="channels"):
        SparseLinear(3, 2)(SparseTensor(c, f, 8))


def test_replace_shares_cached_maps():
    x = make()
    km = x.submanifold_map()
    y = x.replace(x.feats * 2)
    assert y.submanifold_map() is km
    assert [s.stop - s.start for s in x.layout] == torch.bincount(x.coords[:, 0].long()).tolist()


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_cpu_table_map_equals_the_searched_map(kernel_size):
    from kernels.sparse_conv import build_kernel_map

    x = make(res=12, count=900, batch=3)
    km = x.submanifold_map(kernel_size)  # a 3 x 12³ grid: the dense-table path
    assert torch.equal(km.neighbors, build_kernel_map(x.coords, x.coords, 12, kernel_size, in_sorted=True).neighbors)
    assert km.symmetric and km.num_inputs == len(x)


def test_downsample_and_subdivide_match_dense():
    x = make(channels=3)
    pooled = SparseDownsample(2)(x)
    dense = torch.zeros(2, 3, 16, 16, 16, dtype=torch.float64)
    cnt = torch.zeros(2, 1, 16, 16, 16, dtype=torch.float64)
    c = x.coords.long()
    dense[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = x.feats
    cnt[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = 1
    s = torch.nn.functional.avg_pool3d(dense, 2) / torch.nn.functional.avg_pool3d(cnt, 2).clamp(min=1e-9)
    p = pooled.coords.long()
    torch.testing.assert_close(pooled.feats, s[p[:, 0], :, p[:, 1], p[:, 2], p[:, 3]])
    assert pooled.resolution == 8 and len(pooled) == int((torch.nn.functional.avg_pool3d(cnt, 2) > 0).sum())
    up = SparseSubdivide()(pooled)
    assert len(up) == 8 * len(pooled) and up.resolution == 16
    SparseTensor(up.coords, up.feats, 16)  # sorted, unique, in range
    parent = up.coords.clone()
    parent[:, 1:] //= 2
    q = parent.long()
    torch.testing.assert_close(up.feats, s[q[:, 0], :, q[:, 1], q[:, 2], q[:, 3]])
    # the released SS-VAE's pool counts one zero into each mean: sum / (children + 1)
    sums = torch.nn.functional.avg_pool3d(dense, 2) * 8
    counts = torch.nn.functional.avg_pool3d(cnt, 2) * 8
    torch.testing.assert_close(SparseDownsample(2, zero_in_mean=True)(x).feats,
                               (sums / (counts + 1))[p[:, 0], :, p[:, 1], p[:, 2], p[:, 3]])


def test_conv_layers_shapes_and_grad():
    x = make(channels=4)
    x = x.replace(x.feats.float())
    y = SparseConv3d(4, 6)(x)
    z = SparseConvDown(6, 8)(y)
    assert y.coords is x.coords and z.num_channels == 8 and z.resolution == 8
    z.feats.sum().backward()


def test_group_norm_uses_each_shape_alone():
    x = make(channels=8)
    y = SparseGroupNorm(2, 8, affine=False)(x)
    for s in x.layout:
        ref = torch.nn.functional.group_norm(x.feats[s].T[None], 2)[0].T
        torch.testing.assert_close(y.feats[s], ref)



def test_group_norm_gradients_are_each_shapes_own_with_an_empty_shape():
    """Backward through the per-shape parts (an element with no voxel included) equals a dense GroupNorm's."""
    x = make(channels=8, seed=3)
    c = x.coords.clone()
    c[:, 0] = torch.where(c[:, 0] == 0, 0, 2)  # three elements, the middle one empty
    feats = x.feats.float().clone().requires_grad_(True)
    y = SparseGroupNorm(4, 8)(SparseTensor(c, feats, x.resolution, 3))
    w = torch.randn_like(y.feats)
    (y.feats * w).sum().backward()
    for b in (0, 2):
        rows = c[:, 0] == b
        f = x.feats.float()[rows].clone().requires_grad_(True)
        ref = torch.nn.functional.group_norm(f.T[None], 4)[0].T
        (ref * w[rows]).sum().backward()
        torch.testing.assert_close(y.feats[rows], ref)
        torch.testing.assert_close(feats.grad[rows], f.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_group_norm_acts_as_group_norm_32(dtype):
    """32 groups, float32 statistics and affine, per-sample over the sample's voxels, cast back."""
    x = make(channels=64, seed=2)
    x = x.replace((x.feats * 3 + 1).to(dtype))
    norm = SparseGroupNorm(32, 64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    y = norm(x)
    assert y.dtype == dtype
    for s in x.layout:
        ref = torch.nn.functional.group_norm(x.feats[s].float().T[None], 32, norm.weight, norm.bias)[0].T.to(dtype)
        torch.testing.assert_close(y.feats[s], ref, rtol=1e-5 if dtype == torch.float32 else 1e-2, atol=1e-5)


def test_window_attention_equals_per_window_attention():
    torch.manual_seed(0)
    x = make(res=16, count=600, channels=16)
    x = x.replace(x.feats.float())
    attn = SparseWindowAttention(16, 2, window=8, shift=4)
    y = attn(x)
    rows, valid = window_partition(x, 8, 4)
    assert int(valid.sum()) == len(x)
    for w in range(rows.shape[0]):
        idx = rows[w][valid[w]]
        wc = (x.coords[idx, 1:] + 4) // 8
        assert (wc == wc[0]).all() and (x.coords[idx, 0] == x.coords[idx[0], 0]).all()
        q, k, v = attn.to_qkv(x.feats[idx]).reshape(len(idx), 3, 2, 8).permute(1, 2, 0, 3)
        ref = attn.to_out(torch.softmax(q @ k.transpose(1, 2) / 8 ** 0.5, -1).matmul(v).transpose(0, 1).reshape(len(idx), 16))
        torch.testing.assert_close(y.feats[idx], ref, rtol=1e-4, atol=1e-5)
    blk = SparseTransformerBlock(16, 2, 8, 0)
    assert blk(x).feats.shape == x.feats.shape


def test_group_norm_statistics_stay_exact_at_many_voxels():
    from model.sparse.layers import SparseGroupNorm

    g = torch.Generator().manual_seed(0)
    c = torch.unique(torch.randint(0, 128, (200_000, 3), generator=g), dim=0)
    c4 = torch.cat([torch.arange(2).repeat_interleave(len(c) // 2 + 1)[: len(c), None], c], 1).int()
    x = SparseTensor.from_unsorted(c4, torch.randn(len(c), 64, generator=g) * 3 + 1, 128, 2)
    out = SparseGroupNorm(32, 64)(x).feats.double()
    for rows in x.layout:  # each batch element normalised by its own statistics, as a dense GroupNorm would
        ref = torch.nn.functional.group_norm(x.feats[rows].double().T[None], 32, eps=1e-5)[0].T
        assert ((out[rows] - ref).abs().max() / ref.abs().max()) < 1e-6


def test_packed_tokens_keep_their_order_and_carry_their_structure():
    """The SS-DiT's input: each shape's tokens in the caller's order, cu_seqlens and caches on the tensor."""
    import pytest

    from model.sparse import SparseConv3d, SparseTensor

    g = torch.Generator().manual_seed(0)
    coords = [torch.randperm(64, generator=g)[:n] for n in (9, 4)]
    coords = [torch.stack([c // 16, c // 4 % 4, c % 4], 1) for c in coords]
    feats = [torch.randn(len(c), 3, generator=g) for c in coords]
    x = SparseTensor.from_samples(coords, feats, ordered=False)
    assert not x.ordered and x.batch_size == 2 and x.resolution == 4
    assert torch.equal(x.coords[:, 1:], torch.cat(coords)) and torch.equal(x.feats, torch.cat(feats))
    assert x.cu_seqlens.tolist() == [0, 9, 13] and x.replace(x.feats * 2).cu_seqlens is x.cu_seqlens
    same = SparseTensor.packed(torch.cat(coords), torch.cat(feats), torch.tensor([0, 9, 13]))
    assert torch.equal(same.coords, x.coords) and not same.ordered
    ordered = SparseTensor.from_samples(coords, feats)
    assert ordered.ordered and sorted(map(tuple, ordered.coords.tolist())) == sorted(map(tuple, x.coords.tolist()))
    with pytest.raises(ValueError, match="packed"):
        SparseConv3d(3, 3)(x)
    with pytest.raises(ValueError, match="batch order"):
        SparseTensor(x.coords.flip(0), x.feats, 4, ordered=False)
