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


def test_cuda_graph_sampling_same_meshes():
    """GenerationConfig.cuda_graphs: every sampling stage replayed as a CUDA graph gives the eager meshes,
    with guidance (the doubled batch) and at bf16, as generation runs."""
    from test_cascade import png

    cfg = GenerationConfig(resolution=64, structure_steps=4, sparse_steps=4, device="cuda", dtype="bf16")
    out = {}
    for graphs in (False, True):
        c = small_cascade(dataclasses.replace(cfg, cuda_graphs=graphs))
        out[graphs] = c.generate([Request("a", png(), 3), Request("b", png(), 5)])
        del c
    for eager, graphed in zip(out[False], out[True]):
        assert eager.error is None and graphed.error is None, (eager.error, graphed.error)
        np.testing.assert_array_equal(eager.faces, graphed.faces)
        np.testing.assert_array_equal(eager.vertices, graphed.vertices)


def test_captured_velocity_replays_and_falls_back():
    """model/graphs.py: the replay equals the eager call for new inputs; a new shape captures again; a forward
    with a host sync falls back to eager calls with the same results."""
    from model.graphs import CapturedVelocity

    w = torch.randn(64, 64, device="cuda")
    fn = lambda x, t, _c: torch.tanh(x @ w) * t  # noqa: E731
    cv = CapturedVelocity(fn)
    with torch.no_grad():
        for i in range(4):
            x, t = torch.randn(128, 64, device="cuda"), torch.tensor(0.1 * i + 0.2, device="cuda")
            torch.testing.assert_close(cv(x, t), fn(x, t, None), rtol=0, atol=0)
        assert cv.graph is not None and cv.failed is None
        x = torch.randn(32, 64, device="cuda")
        torch.testing.assert_close(cv(x, t), fn(x, t, None), rtol=0, atol=0)  # another shape
        torch.testing.assert_close(cv(x, t), fn(x, t, None), rtol=0, atol=0)
        assert cv._key[0] == x.shape
        syncing = lambda x, t, _c: x * float(t.item())  # noqa: E731
        cv = CapturedVelocity(syncing)
        for _ in range(3):
            torch.testing.assert_close(cv(x, t), syncing(x, t, None))
        assert cv.failed and cv.graph is None
