"""SS-VAE: shapes of the latent and output, targets, loss, chunked decoding, checkpoints, bad input."""

from __future__ import annotations

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


def test_chunked_decode_equals_whole(model):
    x = batch(32)
    with torch.no_grad():
        z, _, _ = model.encode(x, sample=False)
        whole = model.decode(z)
        chunked = model.decode(z, chunk=2)
    assert torch.equal(whole.coords, chunked.coords)
    torch.testing.assert_close(whole.feats, chunked.feats, rtol=1e-5, atol=1e-6)


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
    assert losses[-1] < 0.7 * losses[0]
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
    assert cfg.channels == (32, 64, 128, 512) and cfg.latent_channels == 16 and cfg.num_blocks == 4
    assert cfg.num_heads == 8 and cfg.window == 8 and cfg.downsample == 8
