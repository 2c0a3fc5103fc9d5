"""The released voxel refiners: layout, converters, and run() against a dense reading of the release."""
import pytest
import torch
import torch.nn.functional as F

from model import refiner as rf
from model.mesh_extract import extract_mesh


def _random(cfg, seed=0):
    net = rf.VoxelRefiner(cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in net.named_parameters():
            fan = p[0].numel() if p.ndim > 1 else 1
            p.copy_(torch.randn(p.shape, generator=g) / fan ** 0.5 + (1.0 if p.ndim == 1 and "norm" in name else 0.0))
    return net


@pytest.mark.parametrize("kind, keys, millions", [("sdf", 253, 134.74), ("sign", 234, 134.71)])
def test_paper_layout(kind, keys, millions):
    """Key count and size of the released refiners (checked key by key against the release's classes)."""
    cfg = rf.RefinerConfig.from_official({}, kind=kind)
    assert cfg == rf.RefinerConfig.named("paper" if kind == "sdf" else "paper_1024")
    with torch.device("meta"):
        sd = rf.VoxelRefiner(cfg).state_dict()
    assert len(rf.ours_to_official(sd, cfg)) == keys
    assert round(sum(v.numel() for v in sd.values()) / 1e6, 2) == millions
    assert ("latent_mlp.net.6.weight" in sd) == (kind == "sdf")
    assert tuple(sd["unet3d1.up_blocks.0.resnets.2.conv1.weight"].shape) == (512, 640, 3, 3, 3)
    assert tuple(sd["unet3d1.up_blocks.0.upsamplers.0.conv.weight"].shape) == (512, 512, 2, 2, 2)


@pytest.mark.parametrize("name", ["debug", "debug_1024"])
def test_narrow_round_trip_and_bad_keys(name):
    cfg = rf.RefinerConfig.named(name)
    src = _random(cfg)
    dst = rf.VoxelRefiner(cfg).eval()
    dst.load_state_dict(rf.official_to_ours(rf.ours_to_official(src.state_dict(), cfg), cfg), strict=True)
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    f = torch.randn(1, 8, 16, 16, 16) if cfg.kind == "sdf" else None
    with torch.no_grad():
        assert torch.equal(src(x, f), dst(x, f))
    sd = src.state_dict()
    with pytest.raises(ValueError, match="missing key conv_in.bias"):
        rf.official_to_ours({k: v for k, v in sd.items() if k != "conv_in.bias"}, cfg)
    with pytest.raises(ValueError, match="key conv_out.weight has shape"):
        rf.official_to_ours({**sd, "conv_out.weight": torch.zeros(2)}, cfg)


def test_from_official_checks():
    assert rf.RefinerConfig.from_official({"infer_patch_size": 128}).kind == "sign"
    assert rf.RefinerConfig.from_official({"layers_per_block": 1}).layers_per_block == 1
    with pytest.raises(ValueError, match="unknown parameter.*infer_patch_size"):
        rf.RefinerConfig.from_official({"infer_patch_size": 128}, kind="sdf")
    with pytest.raises(ValueError, match="cover 560, not res 512"):
        rf.RefinerConfig.from_official({"patch_size": 208})


def _band(res, radius, width=2.5, seed=0):
    """Voxels within ``width`` of a sphere at ``res``: coords, clipped SDF in [-1, 1], random features."""
    r = torch.arange(res).float()
    p = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1)
    d = (p - (res - 1) / 2).norm(dim=-1) - radius
    idx = (d.abs() < width).nonzero()
    sdf = (d[idx[:, 0], idx[:, 1], idx[:, 2]] / width).clamp(-1, 1)
    return idx.int(), sdf, torch.randn(len(idx), 32, generator=torch.Generator().manual_seed(seed))


def _blend_like_the_release(patches, n, s, p, o, res):
    """The release's three passes (lines along z, layers along y, the grid along x) with its slices
    written for any patch p, stride s and overlap o = p - s."""
    w = torch.linspace(0, 1, o)

    def join(parts, axis):
        out = torch.full(parts[0].shape[:axis] + (res,) + parts[0].shape[axis + 1:], 2.0)
        view = lambda t, a, b: t.narrow(axis, a, b - a)
        shape = [1] * out.ndim
        shape[axis] = o
        ww = w.reshape(shape)
        view(out, 0, s).copy_(view(parts[0], 0, s))
        view(out, p, 2 * s).copy_(view(parts[1], o, s))
        view(out, s + p, res).copy_(view(parts[2], o, p))
        view(out, s, p).copy_(view(parts[0], s, p) * (1 - ww) + view(parts[1], 0, o) * ww)
        view(out, 2 * s, s + p).copy_(view(parts[1], s, p) * (1 - ww) + view(parts[2], 0, o) * ww)
        return out

    lines = [join(patches[i * 3:i * 3 + 3], 2) for i in range(9)]
    layers = [join(lines[i * 3:i * 3 + 3], 1) for i in range(3)]
    return join(layers, 0)


def test_sdf_refiner_matches_a_dense_reading_of_the_release():
    cfg = rf.RefinerConfig.named("debug")
    net = _random(cfg, seed=1)
    res, p, s, o = cfg.res, cfg.patch_size, cfg.stride, cfg.overlap
    coords, sdf, feats = _band(res, 12.0)
    with torch.no_grad():
        got = net.refine_sdf(coords, sdf, feats)
        dense = torch.ones(res, res, res)
        dense[coords[:, 0], coords[:, 1], coords[:, 2]] = sdf
        dfeat = torch.zeros(32, res, res, res)
        dfeat[:, coords[:, 0], coords[:, 1], coords[:, 2]] = feats.t()
        patches = []
        for i in range(3):
            for j in range(3):
                for k in range(3):
                    sl = (slice(s * i, s * i + p), slice(s * j, s * j + p), slice(s * k, s * k + p))
                    f = net.latent_mlp(dfeat[(slice(None),) + sl].permute(1, 2, 3, 0)).permute(3, 0, 1, 2)
                    patches.append(net(dense[sl][None, None], f[None])[0, 0])
        want = _blend_like_the_release(patches, 3, s, p, o, res)
    assert (got - want).abs().max() < 1e-5
    level = float(got.median())  # random weights: march where this field has a surface
    vc, vv, r = net.run(coords, sdf, feats, mc_threshold=level)
    assert r == res and vv.dtype == torch.float32
    _same_surface(vc, vv, got, level)


def test_sign_refiner_matches_a_dense_reading_of_the_release():
    cfg = rf.RefinerConfig.named("debug_1024")
    net = _random(cfg, seed=2)
    res, hi = cfg.res, cfg.output_res
    coords, sdf, _ = _band(hi, 21.0)
    with torch.no_grad():
        dense_hi = torch.ones(hi, hi, hi)
        dense_hi[coords[:, 0], coords[:, 1], coords[:, 2]] = sdf
        # the release's SparseDownsample: mean of the children present
        key = (coords.long() // 2)
        parent, inv = torch.unique(key, dim=0, return_inverse=True)
        mean = torch.zeros(len(parent)).index_add_(0, inv, sdf) / torch.zeros(len(parent)).index_add_(0, inv, torch.ones_like(sdf))
        lo_grid = torch.ones(res, res, res)
        lo_grid[parent[:, 0], parent[:, 1], parent[:, 2]] = mean
        out = torch.ones(res, res, res)
        st, p = cfg.stride, cfg.patch_size
        for i in range(3):
            for j in range(3):
                for k in range(3):
                    sl = (slice(st * i, st * i + p), slice(st * j, st * j + p), slice(st * k, st * k + p))
                    y = torch.sigmoid(net(lo_grid[sl][None, None]))[0, 0]
                    out[sl] = torch.where(y >= 0.5, 1.0, -1.0)
        up = out.repeat_interleave(2, 0).repeat_interleave(2, 1).repeat_interleave(2, 2)
        want = dense_hi.abs() * up
        want[coords[:, 0], coords[:, 1], coords[:, 2]] = dense_hi[coords[:, 0], coords[:, 1], coords[:, 2]]
        sign = net.refine_sign(coords, sdf)
    assert torch.equal(sign.float(), out) and bool((out < 0).any())
    vc, vv, r = net.run(coords, sdf, slab=5)
    assert r == hi
    _same_surface(vc, vv, want, 0.2)
    assert len(vc) < want.numel() / 2  # only the cells at a surface are kept (random signs make many)


def _same_surface(coords, values, dense, level):
    """The sparse corners march to exactly the surface of the whole dense grid."""
    res = dense.shape[0]
    r = torch.arange(res)
    allc = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    assert torch.equal(values, dense[coords[:, 0].long(), coords[:, 1].long(), coords[:, 2].long()])
    v1, f1 = extract_mesh(coords, values, res, level=level, fill=None)
    v2, f2 = extract_mesh(allc, dense.reshape(-1), res, level=level, fill=None)
    assert len(f1) == len(f2) > 0
    key = lambda v, f: torch.sort(v[f].mean(1).round(decimals=4), dim=0).values
    assert torch.allclose(key(v1, f1), key(v2, f2), atol=1e-5)


def test_straddling_voxels_slabs_do_not_change_the_set():
    g = torch.Generator().manual_seed(3)
    field = torch.randn(20, 20, 20, generator=g)
    a = rf.straddling_voxels(lambda x0, x1: field[x0:x1], 20, 0.7, slab=3)
    b = rf.straddling_voxels(lambda x0, x1: field[x0:x1], 20, 0.7, slab=20)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # a voxel is kept iff one of its cells has values on both sides of the level
    cell = F.max_pool3d(field[None, None], 2, stride=1) >= 0.7
    cell &= -F.max_pool3d(-field[None, None], 2, stride=1) <= 0.7
    assert int(cell.sum()) > 0 and len(a[0]) <= field.numel()


@pytest.mark.parametrize("name", ["debug", "debug_1024"])
def test_bfloat16_patch_close_to_float32(name):
    net = _random(rf.RefinerConfig.named(name), seed=4)
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    f = torch.randn(1, 32, 16, 16, 16) if net.cfg.kind == "sdf" else None
    with torch.no_grad():
        a = net.forward_patch(x, f)
        b = net.to(torch.bfloat16).forward_patch(x.bfloat16(), None if f is None else f.bfloat16())
    assert b.dtype == torch.bfloat16 and float((b.float() - a).abs().max()) < 0.05


@pytest.mark.parametrize("name", ["debug", "debug_1024"])
def test_half_weights_as_the_release_runs_them(name):
    """cast_weights: convs and linears in float16, norms in float32 (the release's convert_to_fp16); a whole
    run() matches float32 on the marched voxels' values, and the refined field is float32."""
    cfg = rf.RefinerConfig.named(name)
    net = _random(cfg, seed=5)
    half = _random(cfg, seed=5).cast_weights(torch.float16)
    assert half.dtype == torch.float16
    assert all(m.weight.dtype == torch.float32 for m in half.modules() if isinstance(m, torch.nn.GroupNorm))
    x = torch.rand(1, 1, 16, 16, 16) * 2 - 1
    f = torch.randn(1, 32, 16, 16, 16) if cfg.kind == "sdf" else None
    with torch.no_grad():
        a = net.forward_patch(x, f)
        b = half.forward_patch(x.half(), None if f is None else f.half())
    assert b.dtype == torch.float16 and float((b.float() - a).abs().max()) < 1e-2
    if cfg.kind == "sdf":
        g = torch.Generator().manual_seed(1)
        coords = torch.randint(0, cfg.res, (400, 3), generator=g)
        vals, feats = torch.rand(400, generator=g) * 2 - 1, torch.randn(400, 32, generator=g)
        fa, fb = net.refine_sdf(coords, vals, feats), half.refine_sdf(coords, vals, feats)
        assert fb.dtype == torch.float32 and float((fa - fb).abs().max()) < 1e-2


@pytest.mark.parametrize("kind", ["sdf", "sign"])
def test_patch_rows_are_each_patchs_voxels(kind):
    """The 27 patches' voxels, found together (two host reads), are exactly each patch's own voxels in order."""
    cfg = rf.RefinerConfig.named("debug", kind=kind)
    net = rf.VoxelRefiner(cfg)
    g = torch.Generator().manual_seed(3)
    coords = torch.unique(torch.randint(0, cfg.res, (3000, 3), generator=g, dtype=torch.int32), dim=0)
    coords = coords[torch.randperm(len(coords), generator=g)]  # any order
    patches = list(net._patches(cfg.stride))
    rows = net._patch_rows(coords, cfg.stride)
    assert len(rows) == len(patches) == 27
    for (lo, size), got in zip(patches, rows):
        c = coords.long()
        want = ((c >= torch.tensor(lo)) & (c < torch.tensor(lo) + torch.tensor(size))).all(1).nonzero()[:, 0]
        assert torch.equal(got, want)


@pytest.mark.parametrize("name", ["debug", "debug_1024"])
def test_patches_without_band_voxels_share_one_unet_pass(name):
    """Every patch with no band voxel has the same input, so the UNet runs once for all of them and the
    field is the one of running every patch."""
    cfg = rf.RefinerConfig.named(name)
    net = _random(cfg, seed=4)
    res = cfg.res if cfg.kind == "sdf" else cfg.output_res
    coords, sdf, feats = _band(res, res / 10)
    coords = coords - coords.min(0).values  # a small sphere in one corner: most patches hold none of it
    calls = []
    hook = net.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        if cfg.kind == "sdf":
            every = net.refine_sdf(coords, sdf, feats, reuse_empty=False)
            n_every = len(calls)
            shared = net.refine_sdf(coords, sdf, feats)
        else:
            every = net.refine_sign(coords, sdf, reuse_empty=False)
            n_every = len(calls)
            shared = net.refine_sign(coords, sdf)
    hook.remove()
    src = coords if cfg.kind == "sdf" else rf.mean_pool_2(coords, sdf)[0]
    empty = sum(len(r) == 0 for r in net._patch_rows(src, cfg.stride))
    assert n_every == 27 and empty >= 8
    assert len(calls) - n_every == 27 - empty + 1
    assert torch.equal(shared, every)
