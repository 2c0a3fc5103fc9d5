"""Image conditioning: the built-in encoder and DINOv2 (with registers) through ``transformers`` from a local path."""
import pytest
import torch

from model.condition import build_image_encoder, drop_condition

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def dinov2_folder(tmp_path_factory):
    """A tiny randomly initialised DINOv2-with-registers saved like a downloaded checkpoint (no network)."""
    cfg = transformers.Dinov2WithRegistersConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                                 intermediate_size=64, patch_size=14, image_size=518,
                                                 num_register_tokens=4)
    torch.manual_seed(0)
    model = transformers.Dinov2WithRegistersModel(cfg)
    folder = tmp_path_factory.mktemp("dinov2")
    model.save_pretrained(folder)
    return str(folder), model.eval()


def test_dinov2_from_a_local_path_gives_the_papers_token_layout(dinov2_folder):
    folder, reference = dinov2_folder
    enc = build_image_encoder(folder)
    assert enc.dim == 32 and not any(p.requires_grad for p in enc.parameters())
    images = torch.rand(2, 3, 96, 128)
    with torch.no_grad():
        tokens = enc(images)
    assert tokens.shape == (2, 1 + 4 + 37 * 37, 32)  # class + 4 registers + 37² patches at 518²
    # the encoder resizes to 518² and normalizes with ImageNet statistics before the model
    x = torch.nn.functional.interpolate(images, size=(518, 518), mode="bicubic", align_corners=False)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        expect = reference(pixel_values=(x - mean) / std).last_hidden_state
    torch.testing.assert_close(tokens, expect)
    # the condition tokens feed classifier-free guidance training: dropped rows are exactly zero
    dropped = drop_condition(tokens, 1.0)
    assert torch.count_nonzero(dropped) == 0


def test_missing_or_bad_encoder_path_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="image encoder '.*not_there': cannot load it"):
        build_image_encoder(str(tmp_path / "not_there"))
