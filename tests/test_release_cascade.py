"""A converted release snapshot (synthetic, narrow, released key layout) generates a mesh through the cascade."""
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from model.cascade import Cascade, GenerationConfig, Request
from model.official import convert_snapshot
import release_snapshot

FIRST_STAGE = ["dense_vae", "dense_dit", "sparse_vae_512", "sparse_dit_512"]


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    root = tmp_path_factory.mktemp("release")
    snap, dino = release_snapshot.write(str(root), seed=1, small=True)
    out = root / "converted"
    convert_snapshot(snap, str(out), sections=FIRST_STAGE)
    return out, dino


def _png() -> bytes:
    img = np.zeros((120, 160, 4), np.uint8)
    img[30:90, 40:120] = (180, 70, 40, 255)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


def test_converted_release_generates_a_mesh(converted):
    torch.set_num_threads(1)
    out, dino = converted
    cfg = GenerationConfig(pretrained=str(out), image_encoder=dino, structure_steps=2, sparse_steps=2, device="cpu")
    cascade = Cascade.from_checkpoints(cfg)
    info = cascade.info()
    # everything comes from the converted folder: networks, the release's schedules, its marching level
    assert cascade.cfg.resolution == 64 and cascade.level == 0.2
    assert set(cascade.schedules) == {"structure", "sparse", "refine"}
    assert cascade.schedules["sparse"].shift == 3.0
    assert info["networks"]["dit"]["config"]["sparse_conditions"] is True
    (result,) = cascade.generate([Request("box.png", _png(), seed=3)])
    assert result.ok, result.error
    assert len(result.faces) > 0 and np.abs(result.vertices).max() <= 1.0


def test_release_cascade_errors_are_named(converted, tmp_path):
    out, dino = converted
    with pytest.raises(ValueError, match="no readable cascade.json"):
        Cascade.from_checkpoints(GenerationConfig(pretrained=str(tmp_path), image_encoder=dino, device="cpu"))
    # the converted DiT records the latent space it was trained on: without its SS-VAE it is refused
    doc = json.loads((out / "sparse_dit_512" / "config.json").read_text())
    assert doc["meta"]["latent_space"] == "ss_vae:sparse_vae_512"
    cfg = GenerationConfig(structure_vae=str(out / "dense_vae"), structure_dit=str(out / "dense_dit"),
                           dit=str(out / "sparse_dit_512"), image_encoder=dino, resolution=64, device="cpu")
    with pytest.raises(ValueError, match="trained on SS-VAE latents"):
        Cascade.from_checkpoints(cfg)
    # a network in the wrong role is named
    bad = GenerationConfig(structure_vae=str(out / "dense_dit"), structure_dit=str(out / "dense_dit"),
                           dit=str(out / "sparse_dit_512"), vae=str(out / "sparse_vae_512"), image_encoder=dino,
                           resolution=64, device="cpu")
    with pytest.raises(ValueError, match="holds network 'dense_dit', expected 'dense_vae'"):
        Cascade.from_checkpoints(bad)
