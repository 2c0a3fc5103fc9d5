"""Image conditioning as the released generator prepares and encodes images."""
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from model.condition import (build_image_encoder, condition_mask, decode_image, drop_condition, prepare_image,
                             read_rgba)

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dinov2_hf(tmp_path_factory):
    """A tiny randomly initialised DINOv2-with-registers saved like a downloaded checkpoint (no network)."""
    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=256, patch_size=14, image_size=518,
                                                 num_register_tokens=4)
    torch.manual_seed(0)
    model = transformers.Dinov2WithRegistersModel(cfg)
    with torch.no_grad():  # non-trivial layer scales and norms, so a wrong order of operations shows
        for name, p in model.named_parameters():
            if "lambda1" in name or "norm" in name:
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
    folder = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(folder)
    return str(folder), model.eval()


def _hub_state(model) -> dict:
    """The transformers model's tensors under the torch-hub checkpoint's names."""
    sd = model.state_dict()
    out = {"cls_token": sd["embeddings.cls_token"], "pos_embed": sd["embeddings.position_embeddings"],
           "register_tokens": sd["embeddings.register_tokens"], "mask_token": sd["embeddings.mask_token"],
           "patch_embed.proj.weight": sd["embeddings.patch_embeddings.projection.weight"],
           "patch_embed.proj.bias": sd["embeddings.patch_embeddings.projection.bias"],
           "norm.weight": sd["layernorm.weight"], "norm.bias": sd["layernorm.bias"]}
    for i in range(model.config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        att = {k.removeprefix(p + "attention."): v for k, v in sd.items() if k.startswith(p + "attention.")}
        qn = [k for k in att if k.endswith("weight")]
        names = {"q": None, "k": None, "v": None, "o": None}
        for k in qn:  # q_proj/k_proj/v_proj/o_proj (transformers 5) or query/key/value/output.dense (4.x)
            tag = k.split(".")[-2]
            names["q" if tag in ("q_proj", "query") else "k" if tag in ("k_proj", "key")
                  else "v" if tag in ("v_proj", "value") else "o"] = k.removesuffix(".weight")
        out[f"blocks.{i}.attn.qkv.weight"] = torch.cat([att[names[c] + ".weight"] for c in "qkv"])
        out[f"blocks.{i}.attn.qkv.bias"] = torch.cat([att[names[c] + ".bias"] for c in "qkv"])
        out[f"blocks.{i}.attn.proj.weight"] = att[names["o"] + ".weight"]
        out[f"blocks.{i}.attn.proj.bias"] = att[names["o"] + ".bias"]
        for ours, theirs in (("norm1", "norm1"), ("norm2", "norm2"), ("mlp.fc1", "mlp.fc1"), ("mlp.fc2", "mlp.fc2")):
            out[f"blocks.{i}.{ours}.weight"] = sd[p + theirs + ".weight"]
            out[f"blocks.{i}.{ours}.bias"] = sd[p + theirs + ".bias"]
        out[f"blocks.{i}.ls1.gamma"] = sd[p + "layer_scale1.lambda1"]
        out[f"blocks.{i}.ls2.gamma"] = sd[p + "layer_scale2.lambda1"]
    return out


def _expected(reference, images):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        z = reference(pixel_values=(images - mean) / std, output_hidden_states=True).hidden_states[-1]
    return F.layer_norm(z, z.shape[-1:])


def test_transformers_folder_gives_prenorm_tokens_layer_normed(dinov2_hf):
    folder, reference = dinov2_hf
    enc = build_image_encoder(folder)
    assert enc.dim == 128 and not any(p.requires_grad for p in enc.parameters())
    images = torch.rand(2, 3, 518, 518)
    with torch.no_grad():
        tokens = enc(images)
    assert tokens.shape == (2, 1 + 4 + 37 * 37, 128)  # class + 4 registers + 37² patches at 518²
    torch.testing.assert_close(tokens, _expected(reference, images))
    # no affine parameters: every token has zero mean and unit variance
    torch.testing.assert_close(tokens.mean(-1), torch.zeros(2, tokens.shape[1]), atol=1e-5, rtol=0)
    assert torch.count_nonzero(drop_condition(tokens, 1.0)) == 0


def test_hub_checkpoint_loads_without_code_and_matches_transformers(dinov2_hf, tmp_path):
    _, reference = dinov2_hf
    path = tmp_path / "dinov2_vits14_reg4_pretrained.pth"
    torch.save(_hub_state(reference), path)
    enc = build_image_encoder(str(path))
    images = torch.rand(1, 3, 518, 518)
    with torch.no_grad():
        got = enc(images)
    torch.testing.assert_close(got, _expected(reference, images), atol=2e-5, rtol=2e-5)
    # a non-square image is resized on its short side and centre-cropped, not stretched
    wide = torch.rand(1, 3, 300, 600)
    with torch.no_grad():
        assert enc(wide).shape == got.shape


def test_bad_encoder_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="image encoder '.*not_there': cannot load it"):
        build_image_encoder(str(tmp_path / "not_there"))
    bad = tmp_path / "weights.pth"
    torch.save({"something": torch.zeros(2)}, bad)
    with pytest.raises(ValueError, match="not a DINOv2 state dict"):
        build_image_encoder(str(bad))


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def test_preparation_crops_to_alpha_keeps_aspect_and_pads():
    rgba = np.zeros((200, 400, 4), np.uint8)
    rgba[50:150, 100:300] = (200, 30, 30, 255)  # a 200x100 red box on a transparent canvas
    img = prepare_image(rgba, 518)
    assert img.shape == (4, 518, 518)
    rgb, alpha = img[:3], img[3]
    # the box fills the width minus the 16-pixel border; rows above and below are white, alpha 0
    cols = torch.nonzero(alpha[259] > 0.5).flatten()
    rows = torch.nonzero(alpha[:, 259] > 0.5).flatten()
    assert abs(int(cols.min()) - 16) <= 2 and abs(int(cols.max()) - 501) <= 2
    assert abs((rows.max() - rows.min() + 1) / (cols.max() - cols.min() + 1) - 0.5) < 0.02
    assert torch.allclose(rgb[:, 5, 5], torch.ones(3)) and alpha[5, 5] == 0
    assert rgb[0, 259, 259] > 0.7 and rgb[1, 259, 259] < 0.2
    mask = condition_mask(img[None, 3:])
    assert mask.shape == (1, 37, 37) and mask[0, 18, 18] and not mask[0, 0, 18]


def test_images_without_alpha_need_a_background_model():
    rgb = np.full((64, 64, 3), 255, np.uint8)
    rgb[20:40, 20:40] = 0
    with pytest.raises(ValueError, match="photo.png: has no alpha channel and no background-removal model"):
        decode_image(_png(rgb), 64, name="photo.png")

    def remover(x):  # a stand-in model: everything darker than white is foreground
        return np.concatenate([x, ((x.min(-1) < 250) * 255).astype(np.uint8)[..., None]], -1)

    img = decode_image(_png(rgb), 64, name="photo.png", background=remover, with_mask=True)
    assert img.shape == (4, 64, 64) and img[3].mean() > 0.8  # cropped to the dark square
    rgba = np.concatenate([rgb, np.full((64, 64, 1), 255, np.uint8)], -1)
    assert read_rgba(_png(rgba))[1] and not read_rgba(_png(rgb))[1]
    with pytest.raises(ValueError, match="broken.png: unreadable image"):
        decode_image(b"not a png", 32, name="broken.png")
