"""The released SparseSDFVAE layout: config from its params, state dicts both ways, a narrow model that runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.vae import SparseSDFVAE, VAEConfig, official_to_ours, ours_to_official

SHAPES_JSON = Path("/work/shared/official/state_dict_shapes.json")


def test_paper_layout_is_the_released_one():
    if not SHAPES_JSON.exists():
        pytest.skip("state_dict_shapes.json not available")
    released = json.loads(SHAPES_JSON.read_text())["ss_vae"]
    cfg = VAEConfig.from_official({"embed_dim": 16, "resolution": 64})
    assert cfg == VAEConfig.named("paper")
    with torch.device("meta"):
        model = SparseSDFVAE(cfg)
    official = ours_to_official(model.state_dict(), cfg)
    assert sorted(official) == sorted(released)
    assert {k: list(v.shape) for k, v in official.items()} == released


def test_from_official_params():
    cfg = VAEConfig.from_official({"embed_dim": 8, "resolution": 128, "model_channels_decoder": 256,
                                   "num_heads_decoder": None, "num_head_channels_decoder": 32, "chunk_size": 4,
                                   "latents_scale": 0.5, "latents_shift": 0.1, "use_fp16": True})
    assert cfg.latent_channels == 8 and cfg.resolution == 128 and cfg.dec_channels == 256 and cfg.dec_heads == 8
    assert cfg.enc_heads == 8 and cfg.chunk_size == 4 and cfg.latents_scale == 0.5 and cfg.latents_shift == 0.1
    with pytest.raises(ValueError, match="model_channel"):
        VAEConfig.from_official({"embed_dim": 16, "model_channel": 512})
    with pytest.raises(ValueError, match="embed_dim"):
        VAEConfig.from_official({})


def _random_state(model: SparseSDFVAE, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in model.state_dict().items()}


def test_narrow_round_trip_and_forward():
    cfg = VAEConfig.named("debug")
    model = SparseSDFVAE(cfg).eval()
    ours = _random_state(model, 0)
    official = ours_to_official(ours, cfg)
    assert "encoder.downsample.0.out_layers.0.conv.kernel" in official
    assert official["encoder.downsample.0.skip_connection.conv.kernel"].shape == (cfg.channels[0], cfg.channels[1])
    back = official_to_ours(official, cfg)
    assert sorted(back) == sorted(ours) and all(torch.equal(back[k], ours[k]) for k in ours)
    model.load_state_dict(back, strict=True)
    # the 3³ kernels are reordered, not copied
    k = "decoder.upsample.0.act_layers.0.weight"
    assert not torch.equal(official[k.replace(".weight", ".conv.kernel")], ours[k])

    from model.sparse import SparseTensor

    c = torch.unique(torch.randint(0, 32, (600, 3), generator=torch.Generator().manual_seed(1)), dim=0)
    x = SparseTensor(torch.cat([torch.zeros_like(c[:, :1]), c], 1).int(), torch.rand(len(c), 1) * 2 - 1, 32, 1)
    with torch.no_grad():
        z, mean, _ = model.encode(x, sample=False)
        out = model.decode(z)
    assert z.num_channels == cfg.latent_channels and len(out) == 512 * len(z)
    assert bool(torch.isfinite(out.feats).all()) and out.feats.abs().max() <= 1


def test_bad_state_dicts_named():
    cfg = VAEConfig.named("debug")
    official = ours_to_official(_random_state(SparseSDFVAE(cfg), 0), cfg)
    missing = dict(official)
    del missing["decoder.out_layer.bias"]
    with pytest.raises(ValueError, match="missing tensor 'decoder.out_layer.bias'"):
        official_to_ours(missing, cfg)
    with pytest.raises(ValueError, match="unexpected tensor 'encoder.extra'"):
        official_to_ours({**official, "encoder.extra": torch.zeros(1)}, cfg)
    wrong = {**official, "encoder.input_layer1.weight": torch.zeros(3, 1)}
    with pytest.raises(ValueError, match="'encoder.input_layer1.weight' has shape"):
        official_to_ours(wrong, cfg)
    with pytest.raises(ValueError, match="missing tensor"):
        ours_to_official({}, cfg)
