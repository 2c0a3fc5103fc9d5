"""SS-VAE: shapes of the latent and output, targets, loss, chunked decoding, checkpoints, bad input."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from model.sdf_shapes import AnalyticShape, narrow_band, voxel_centres
from model.sparse import SparseTensor
from model.vae import SparseSDFVAE, VAEConfig
from model.vae_loss import decoded_structure, sharp_voxels, vae_loss, vae_targets

SHAPES = [AnalyticShape("box", (0.5, 0.35, 0.4), (0.3, 0.2, 0.1)), AnalyticShape("torus", (0.5, 0.2), (0.5, 0.0, 0.3))]


def batch(res: int, shapes=SHAPES) -> SparseTensor:
    cs, vs = [], []
    for b, s in enumerate(shapes):
        c, v = narrow_band(s, res)
        cs.append(torch.cat([torch.full((len(c), 1), b, dtype=torch.int32), c], 1))
        vs.append(v)
    return SparseTensor(torch.cat(cs), torch.cat(vs)[:, None], res, len(shapes))


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return SparseSDFVAE(VAEConfig.named("tiny"))


@pytest.mark.parametrize("res", [32, 64])
def test_latent_and_output_structure(model, res):
    x = batch(res)
    z, mean, logvar = model.encode(x)
    assert z.resolution == res // 8 and z.num_channels == 16 and mean.shape == logvar.shape == (len(z), 16)
    latent, _ = x.coarse(8)
    assert torch.equal(z.coords, latent)
    out = model.decode(z)
    assert out.resolution == res and out.num_channels == 1 and len(out) == 512 * len(z)
    assert torch.equal(out.coords, decoded_structure(x, 8))
    assert out.feats.abs().max() <= 1  # tanh


def _randomised(cfg: VAEConfig, seed: int = 0) -> SparseSDFVAE:
    """A VAE with every tensor random (the zero-initialised output layers too), so outputs depend on all of it."""
    torch.manual_seed(seed)
    m = SparseSDFVAE(cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.5 / max(1, p.shape[-2] if p.ndim > 1 else 1) ** 0.5)
    return m


def test_chunked_decode_equals_whole():
    m = _randomised(VAEConfig.named("tiny"))
    x = batch(64, SHAPES[1:])  # an 8³ latent grid, 4³ chunks: a halo of 3 leaves voxels out of every chunk
    with torch.no_grad():
        z, _, _ = m.encode(x, sample=False)
        whole, whole_feat = m.decode(z, return_feat=True)
        chunked, chunked_feat = m.decode(z, chunk=4, return_feat=True)
        short = m.decode(z, chunk=4, halo=2)
    assert whole.feats.std() > 0.05 and whole_feat.num_channels == 8
    assert torch.equal(whole.coords, chunked.coords) and torch.equal(whole.coords, chunked_feat.coords)
    torch.testing.assert_close(whole.feats, chunked.feats, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(whole_feat.feats, chunked_feat.feats, rtol=1e-5, atol=1e-6)
    # the convs reach 2.625 latent voxels: a halo of 2 is not enough
    assert (whole.feats - short.feats).abs().max() > 1e-4
    # the config's chunk_size decodes in cubes of resolution / chunk_size in eval mode, the same result
    m.config = dataclasses.replace(m.config, resolution=8, chunk_size=2)
    with torch.no_grad():
        torch.testing.assert_close(m.decode(z).feats, whole.feats, rtol=1e-5, atol=1e-6)


def test_latent_scaling_round_trip():
    m = SparseSDFVAE(dataclasses.replace(VAEConfig.named("tiny"), latents_scale=2.5, latents_shift=-0.3))
    z = torch.randn(10, 16)
    torch.testing.assert_close(m.scale(z), (z + 0.3) * 2.5)
    torch.testing.assert_close(m.unscale(m.scale(z)), z)


def test_decode_mesh_maps_vertices_as_the_release():
    m = _randomised(VAEConfig.named("tiny"))
    x = batch(32)
    with torch.no_grad():
        z, _, _ = m.encode(x, sample=False)
        sdf = m.decode(z)
        meshes = m.decode_mesh(z, mc_threshold=0.0)
    assert len(meshes) == 2
    for rows, (v, f) in zip(sdf.layout, meshes):
        lo = sdf.coords[rows, 1:].min(0).values.float() * 2 / 32 - 1
        hi = sdf.coords[rows, 1:].max(0).values.float() * 2 / 32 - 1
        if len(f):
            assert (v >= lo - 1e-5).all() and (v <= hi + 1e-5).all() and f.max() < len(v)


def test_targets_signs_and_sharp_edges():
    x = batch(64)
    t = vae_targets(x, 8)
    assert int(t.is_input.sum()) == len(x)
    extra = ~t.is_input
    assert set(t.values[extra].unique().tolist()) <= {-1.0, 1.0}
    # the sign of the extra voxels against the analytic SDF
    for b, shape in enumerate(SHAPES):
        sel = extra & (t.coords[:, 0] == b)
        true = shape.sdf(voxel_centres(t.coords[sel, 1:], 64)).sign()
        assert (true == t.values[sel].double()).double().mean() > 0.999
    sharp = sharp_voxels(x)
    assert int(sharp[x.layout[0]].sum()) > 50  # the box's edges
    assert int(sharp[x.layout[1]].sum()) < 0.01 * (x.layout[1].stop - x.layout[1].start)  # a smooth torus


def test_loss_terms_and_a_few_steps_reduce_it():
    torch.manual_seed(0)
    m = SparseSDFVAE(VAEConfig.named("tiny"))
    x = batch(32)
    t = vae_targets(x, 8)
    opt = torch.optim.Adam(m.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        out, mean, logvar = m(x)
        terms = vae_loss(out, t, mean, logvar)
        assert all(torch.isfinite(v) for v in terms.values())
        terms["total"].backward()
        opt.step()
        losses.append(float(terms["total"].detach()))
    # the release's initialisation (zero output layers, no norms or skips in the decoder) starts slowly
    assert losses[-1] < losses[0]
    assert all(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in m.parameters())
    with pytest.raises(ValueError, match="decoded structure"):
        vae_loss(SparseTensor(out.coords[:-8], out.feats[:-8], out.resolution, check=False), t, mean, logvar)


def test_bad_input_named(model):
    x = batch(32)
    with pytest.raises(ValueError, match="NaN"):
        model.encode(x.replace(torch.full_like(x.feats, float("nan"))))
    with pytest.raises(ValueError, match="1 channel"):
        model.encode(x.replace(x.feats.repeat(1, 2)))
    with pytest.raises(ValueError, match="multiple of 8"):
        model.encode(SparseTensor(x.coords, x.feats, 36))
    with pytest.raises(ValueError, match="unknown size"):
        VAEConfig.named("huge")
    with pytest.raises(ValueError, match="unknown VAEConfig keys"):
        VAEConfig.from_dict({"channels": [8, 16], "width": 3})


def test_paper_config_numbers():
    cfg = VAEConfig.named("paper")
    assert cfg.channels == (32, 64, 128, 512) and cfg.dec_widths == (512, 128, 64, 32)
    assert cfg.latent_channels == 16 and cfg.enc_blocks == cfg.dec_blocks == 4 and cfg.num_groups == 32
    assert cfg.enc_heads == cfg.dec_heads == 8 and cfg.window == 8 and cfg.downsample == 8
    assert VAEConfig.named("debug") == VAEConfig.named("tiny")


def test_two_level_vae_halves_the_downsampling_and_decodes_in_chunks_exactly():
    # debug_r4: the release's layout with two x2 levels, latent = R / 4 (the 64³ demo's SS-VAE)
    cfg = VAEConfig.named("debug_r4")
    assert cfg.levels == 2 and cfg.downsample == 4
    assert cfg.channels == (16, 32, 128) and cfg.dec_widths == (128, 32, 16)
    torch.manual_seed(0)
    vae = SparseSDFVAE(cfg).eval()
    for layer in (vae.encoder.out_layer, vae.decoder.out_layer):  # zero as released: give them values to compare
        torch.nn.init.normal_(layer.weight, std=0.5)
    assert len(vae.encoder.downsample) == len(vae.decoder.upsample) == 2
    res = 32
    g = torch.stack(torch.meshgrid(*[torch.arange(res)] * 3, indexing="ij"), -1).reshape(-1, 3)
    d = (g.float() - res / 2 + 0.5).norm(dim=1) - 9
    band = d.abs() < 2.5
    x = SparseTensor.from_unsorted(torch.cat([torch.zeros(int(band.sum()), 1, dtype=torch.int32), g[band].int()], 1),
                                   (d[band] / 2.5)[:, None], res, 1)
    with torch.no_grad():
        z, mean, _ = vae.encode(x, sample=False)
        assert z.resolution == res // 4
        whole = vae.decode(z)
        chunked = vae.decode(z, chunk=3)
    assert whole.resolution == res and len(whole) == 64 * len(z)
    assert torch.equal(whole.coords, chunked.coords)
    assert whole.feats.std() > 0.01 and torch.allclose(whole.feats, chunked.feats, atol=1e-6)
    with pytest.raises(ValueError, match="levels"):
        VAEConfig(levels=4)
    with pytest.raises(ValueError, match="not a multiple of 4"):
        vae.encode(SparseTensor.from_unsorted(x.coords, x.feats, 30, 1))
