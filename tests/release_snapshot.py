"""A synthetic Direct3D-S2 snapshot in the released layout, narrow enough for a CPU, and a DINOv2 to go with it.

Every network keeps the released key layout (same block kinds, fewer and narrower ones where the release's
constructor allows) with random weights; the files are shaped like the release's: ``config.yaml``,
``model_dense.ckpt``, ``model_sparse_512.ckpt``, ``model_sparse_1024.ckpt``, ``model_refiner.ckpt``,
``model_refiner_1024.ckpt``, and a DINOv2-with-registers torch-hub ``.pth``. The "512" stage runs at 128³
and the "1024" stage at 256³ so that a CPU finishes a mesh in about a minute.

    python tests/release_snapshot.py OUT_DIR [--small]
        # writes OUT_DIR/snapshot and OUT_DIR/dinov2_vitl14_reg4_pretrained.pth

``--small``: the stages at 64³ and 128³ with 64-wide decoders (no refiners: they need the 512-wide
decoder's features and a 128³ grid), a mesh in seconds; the default runs everything, refiners included,
at 128³ and 256³ (minutes on a CPU).
"""
from __future__ import annotations

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script from anywhere

PKG = "direct3d_s2.models"
WIDTH = 64  # the image tokens' width: the tiny DINOv2 below, and the DiTs' condition width

SECTIONS = {
    "dense_vae": (f"{PKG}.autoencoders.dense_vae.DenseShapeVAE",
                  dict(embed_dim=8, model_channels_encoder=[8, 16, 32], model_channels_decoder=[32, 16, 8],
                       num_res_blocks_encoder=1, num_res_blocks_middle_encoder=1, num_res_blocks_decoder=1,
                       num_res_blocks_middle_decoder=1)),
    "dense_dit": (f"{PKG}.transformers.dense_dit.DenseDiT",
                  dict(resolution=16, in_channels=8, out_channels=8, model_channels=64, cond_channels=WIDTH,
                       num_blocks=2, num_heads=4, patch_size=1, qk_rms_norm=True, qk_rms_norm_cross=True)),
    # the encoder's GroupNorm(32) layers need 512 channels; the decoder's last features feed the refiner (32)
    "sparse_vae_512": (f"{PKG}.autoencoders.ss_vae.SparseSDFVAE",
                       dict(embed_dim=16, resolution=16, model_channels_encoder=512, num_blocks_encoder=1,
                            num_heads_encoder=8, model_channels_decoder=512, num_blocks_decoder=1,
                            num_heads_decoder=8)),
    "sparse_dit_512": (f"{PKG}.transformers.sparse_dit.SparseDiT",
                       dict(resolution=16, in_channels=16, model_channels=64, cond_channels=WIDTH, out_channels=16,
                            num_blocks=2, num_heads=4, num_kv_heads=2, compression_block_size=4,
                            selection_block_size=8, topk=2, window_size=8, qk_rms_norm=True,
                            qk_rms_norm_cross=True, sparse_conditions=True)),
    "sparse_vae_1024": (f"{PKG}.autoencoders.ss_vae.SparseSDFVAE",
                        dict(embed_dim=16, resolution=32, model_channels_encoder=512, num_blocks_encoder=1,
                             num_heads_encoder=8, model_channels_decoder=512, num_blocks_decoder=1,
                             num_heads_decoder=8, chunk_size=2)),
    "sparse_dit_1024": (f"{PKG}.transformers.sparse_dit.SparseDiT",
                        dict(resolution=32, in_channels=16, model_channels=64, cond_channels=WIDTH, out_channels=16,
                             num_blocks=2, num_heads=4, num_kv_heads=2, compression_block_size=4,
                             selection_block_size=8, topk=2, window_size=8, qk_rms_norm=True,
                             qk_rms_norm_cross=True, sparse_conditions=True)),
    # three patches of 64 overlapping by the release's 32 cover 128
    "refiner": (f"{PKG}.refiner.unet_refiner.Voxel_RefinerXL",
                dict(layers_per_block=1, layers_mid_block=1, patch_size=64, res=128)),
    "refiner_1024": (f"{PKG}.refiner.unet_refiner.Voxel_RefinerXL_sign",
                     dict(layers_per_block=1, layers_mid_block=1, patch_size=64, res=128, infer_patch_size=64)),
}

SCHEDULERS = {name: {"target": "diffusers.FlowMatchEulerDiscreteScheduler",
                     "params": {"num_train_timesteps": 1000, "shift": shift}}
              for name, shift in (("dense_scheduler", 1.0), ("sparse_scheduler_512", 3.0),
                                  ("sparse_scheduler_1024", 5.0))}
ENCODERS = {name: {"target": "direct3d_s2.models.conditioner.DinoEncoder",
                   "params": {"model": "facebookresearch/dinov2", "version": "dinov2_vitl14_reg", "size": 518}}
            for name in ("dense_image_encoder", "sparse_image_encoder")}


def write_dinov2(path: str, seed: int = 0) -> str:
    """A one-block DINOv2-reg of width 64 in the torch-hub checkpoint's layout (its own 4² position grid)."""
    from model.dinov2 import DinoV2, DinoV2Config

    torch.manual_seed(seed)
    net = DinoV2(DinoV2Config(width=WIDTH, depth=1, heads=1, image_size=56))
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.copy_(torch.randn_like(p) * (0.02 if p.ndim > 1 else 0.1) + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    torch.save(net.state_dict(), path)
    return path


def paper_sections() -> dict:
    """Every section at the released sizes (model.official.PAPER_PARAMS)."""
    from model.official import PAPER_PARAMS

    return {k: (SECTIONS[k][0], dict(PAPER_PARAMS[k])) for k in SECTIONS}


def small_sections() -> dict:
    """The stages at 64³ and 128³, 64-wide decoders, no refiners."""
    out = {k: (t, dict(p)) for k, (t, p) in SECTIONS.items() if not k.startswith("refiner")}
    for vae, dit, res in (("sparse_vae_512", "sparse_dit_512", 8), ("sparse_vae_1024", "sparse_dit_1024", 16)):
        out[vae][1].update(resolution=res, model_channels_decoder=64, num_heads_decoder=4)
        out[dit][1].update(resolution=res)
    return out


def write(out: str, seed: int = 0, small: bool = False) -> tuple[str, str]:
    """(snapshot folder, DINOv2 .pth) under ``out``."""
    from model.official import write_synthetic_snapshot

    snap = os.path.join(out, "snapshot")
    write_synthetic_snapshot(snap, small_sections() if small else SECTIONS, seed=seed,
                             extra={**ENCODERS, **SCHEDULERS})
    return snap, write_dinov2(os.path.join(out, "dinov2_vitl14_reg4_pretrained.pth"), seed)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    if len(args) != 1 or set(sys.argv[1:]) - {*args, "--small"}:
        sys.exit("usage: python tests/release_snapshot.py OUT_DIR [--small]")
    snap, dino = write(args[0], small="--small" in sys.argv)
    print(f"snapshot: {snap}\nimage encoder: {dino}")
