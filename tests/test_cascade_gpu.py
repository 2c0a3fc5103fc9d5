"""The generation cascade's offload on a GPU: the same meshes with and without it, and a lower peak."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from model.cascade import Cascade, GenerationConfig, Request

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def small_cascade(cfg: GenerationConfig) -> Cascade:
    """Debug structure networks (the dense stage has no 'small' size) and a small SS-DiT on pooled latents, seeded
    (an untrained SS-VAE decodes 0 everywhere: its output layer starts at zero, as released)."""
    from model.cascade import random_network
    from model.condition import build_image_encoder

    enc = build_image_encoder(cfg.image_encoder)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        nets = {"structure_vae": random_network("structure_vae", "debug"),
                "structure_dit": random_network("structure_dit", "debug", cond_dim=enc.dim),
                "dit": random_network("dit", "small", cond_dim=enc.dim)}
    return Cascade(cfg, enc, **nets)


def test_offload_same_meshes_lower_peak():
    from test_cascade import png

    cfg = GenerationConfig(resolution=64, structure_steps=4, sparse_steps=4, guidance=1.0, device="cuda", dtype="fp32")
    out, peak = {}, {}
    for offload in (False, True):
        torch.cuda.empty_cache()
        c = small_cascade(dataclasses.replace(cfg, offload=offload))
        torch.cuda.reset_peak_memory_stats()
        out[offload] = c.generate([Request("a", png(), 3)])[0]
        peak[offload] = torch.cuda.max_memory_allocated()
        del c
    assert out[False].error is None and out[True].error is None, (out[False].error, out[True].error)
    np.testing.assert_array_equal(out[False].faces, out[True].faces)
    np.testing.assert_allclose(out[False].vertices, out[True].vertices, rtol=0, atol=0)
    assert peak[True] < peak[False], peak
    print({k: round(v / 2**20, 1) for k, v in peak.items()})
