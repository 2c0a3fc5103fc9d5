"""The dense structure networks in the released layout: paper keys and shapes, converters, narrow forwards."""
import json
import os

import pytest
import torch

from model import dense_dit, dense_vae

SHAPES = "/work/shared/official/state_dict_shapes.json"
# the constructor arguments the released layout table was read with (its README)
PAPER_PARAMS = {
    "dense_vae": dict(embed_dim=8, in_channels=1, out_channels=1, model_channels_encoder=[32, 128, 512],
                      num_res_blocks_encoder=2, num_res_blocks_middle_encoder=2, model_channels_decoder=[512, 128, 64],
                      num_res_blocks_decoder=4, num_res_blocks_middle_decoder=4),
    "dense_dit": dict(resolution=16, in_channels=8, out_channels=8, model_channels=1024, cond_channels=1024,
                      num_blocks=24, num_heads=16, patch_size=1, qk_rms_norm=True, qk_rms_norm_cross=True),
}
MODULES = {"dense_vae": (dense_vae, dense_vae.DenseVAEConfig, dense_vae.DenseShapeVAE),
           "dense_dit": (dense_dit, dense_dit.DenseDiTConfig, dense_dit.DenseDiT)}
NARROW = {
    "dense_vae": dict(embed_dim=8, model_channels_encoder=[8, 16, 32], model_channels_decoder=[32, 16, 8],
                      num_res_blocks_encoder=1, num_res_blocks_middle_encoder=1, num_res_blocks_decoder=2,
                      num_res_blocks_middle_decoder=1, latents_scale=1.5, latents_shift=0.1),
    "dense_dit": dict(resolution=16, in_channels=8, out_channels=8, model_channels=64, cond_channels=32, num_blocks=2,
                      num_heads=4, patch_size=2, qk_rms_norm=True, qk_rms_norm_cross=True),
}


@pytest.mark.parametrize("name", ["dense_vae", "dense_dit"])
def test_paper_layout_is_the_released_one(name):
    if not os.path.isfile(SHAPES):
        pytest.skip("released layout table not present")
    want = {k: tuple(v) for k, v in json.load(open(SHAPES))[name].items()}
    mod, cfg_cls, net_cls = MODULES[name]
    cfg = cfg_cls.from_official(PAPER_PARAMS[name])
    assert cfg == cfg_cls.named("paper")
    with torch.device("meta"):
        net = net_cls(cfg)
    official = mod.ours_to_official(net.state_dict(), cfg)
    assert {k: tuple(v.shape) for k, v in official.items()} == want
    n = sum(p.numel() for p in net.parameters())
    assert round(n / 1e6, 2) == {"dense_vae": 193.04, "dense_dit": 555.59}[name]


@pytest.mark.parametrize("name", ["dense_vae", "dense_dit"])
def test_narrow_round_trip_and_forward(name):
    mod, cfg_cls, net_cls = MODULES[name]
    cfg = cfg_cls.from_official(NARROW[name])
    torch.manual_seed(0)
    src = net_cls(cfg).eval()
    with torch.no_grad():
        for p in src.parameters():
            p.normal_(0, 0.05)
    released = mod.ours_to_official(src.state_dict(), cfg)
    dst = net_cls(cfg).eval()
    dst.load_state_dict(mod.official_to_ours(released, cfg), strict=True)
    with torch.no_grad():
        if name == "dense_vae":
            occ = (torch.rand(1, 1, 64, 64, 64) > 0.8).float()
            a, b = src.decode(src.encode(occ)[0]), dst.decode(dst.encode(occ)[0])
            assert a.shape == (1, 1, 64, 64, 64)
        else:
            x, t, c = torch.randn(2, 8, 16, 16, 16), torch.tensor([0.3, 0.8]), torch.randn(2, 5, 32)
            a, b = src(x, t, c), dst(x, t, c)
            assert a.shape == x.shape and float(a.abs().max()) > 0
    assert torch.equal(a, b)


@pytest.mark.parametrize("name", ["dense_vae", "dense_dit"])
def test_converters_name_the_bad_key(name):
    mod, cfg_cls, net_cls = MODULES[name]
    cfg = cfg_cls.from_official(NARROW[name])
    sd = net_cls(cfg).state_dict()
    key = next(iter(sd))
    with pytest.raises(ValueError, match=f"missing key {key}"):
        mod.official_to_ours({k: v for k, v in sd.items() if k != key}, cfg)
    with pytest.raises(ValueError, match="unexpected key extra.weight"):
        mod.official_to_ours({**sd, "extra.weight": torch.zeros(1)}, cfg)
    with pytest.raises(ValueError, match=f"key {key} has shape"):
        mod.ours_to_official({**sd, key: torch.zeros(3, 1)}, cfg)
    with pytest.raises(ValueError, match="unknown parameter.*bogus"):
        cfg_cls.from_official({**NARROW[name], "bogus": 1})


def test_from_official_defaults_and_checks():
    # the release's defaults: decoder [512, 128, 32], 2 blocks; DiT patch 2, heads from 64-channel heads
    vae = dense_vae.DenseVAEConfig.from_official({"embed_dim": 8})
    assert vae.dec_channels == (512, 128, 32) and vae.dec_blocks == 2 and vae.latents_scale == 1.0
    dit = dense_dit.DenseDiTConfig.from_official({k: NARROW["dense_dit"][k] for k in (
        "resolution", "in_channels", "out_channels", "model_channels", "cond_channels", "num_blocks")})
    assert dit.patch_size == 2 and dit.heads == 1 and not dit.qk_norm
    with pytest.raises(ValueError, match="missing parameter"):
        dense_dit.DenseDiTConfig.from_official({"resolution": 16})
    with pytest.raises(ValueError, match="pe_mode 'rope'"):
        dense_dit.DenseDiTConfig.from_official({**NARROW["dense_dit"], "pe_mode": "rope"})
    with pytest.raises(ValueError, match="latent_shape"):
        dense_dit.DenseDiTConfig.from_official({**NARROW["dense_dit"], "latent_shape": [8, 32, 32, 32]})


def test_patchify_layout():
    """Token (i, j, k) of a p³-patched latent holds the patch's voxels in (channel, di, dj, dk) order."""
    p, x = 2, torch.randn(1, 3, 8, 8, 8)
    tok = dense_dit.patchify(x, p)
    assert torch.equal(dense_dit.unpatchify(tok, p), x)
    want = x[0, :, 2:4, 6:8, 0:2].reshape(3, 8).reshape(-1)
    assert torch.equal(tok[0, :, 1, 3, 0], want)


@pytest.mark.parametrize("name", ["dense_vae", "dense_dit"])
def test_bfloat16_forward_close_to_float32(name):
    """Cast to bfloat16 (as the cascade runs on a GPU) the norms still compute in float32."""
    mod, cfg_cls, net_cls = MODULES[name]
    net = net_cls(cfg_cls.from_official(NARROW[name])).eval()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.05)
        if name == "dense_vae":
            z = torch.randn(1, 8, 16, 16, 16)
            a, b = net.decode(z), net.to(torch.bfloat16).decode(z.bfloat16())
        else:
            x, t, c = torch.randn(1, 8, 16, 16, 16), torch.tensor([0.4]), torch.randn(1, 5, 32)
            a, b = net(x, t, c), net.to(torch.bfloat16)(x.bfloat16(), t.bfloat16(), c.bfloat16())
    assert b.dtype == torch.bfloat16
    assert float((b.float() - a).abs().max() / a.abs().max()) < 0.05
