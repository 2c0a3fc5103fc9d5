"""The SS-DiT against the released SparseDiT's layout: config, state-dict keys and shapes, converters, forward."""
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is imported

from model.dit import DiTConfig, PackedCondition, SparseDiT, official_to_ours, ours_to_official  # noqa: E402
from model.sparse import SparseTensor  # noqa: E402

SHAPES = Path("/work/shared/official/state_dict_shapes.json")
# the constructor arguments state_dict_shapes.json was read with (its README)
PAPER = dict(resolution=64, in_channels=16, model_channels=1024, cond_channels=1024, out_channels=16, num_blocks=24,
             num_heads=32, num_kv_heads=2, compression_block_size=4, selection_block_size=8, topk=8, window_size=8,
             qk_rms_norm=True, qk_rms_norm_cross=True)
NARROW = dict(PAPER, model_channels=64, cond_channels=64, num_blocks=2, num_heads=4, in_channels=8, out_channels=8,
              resolution=16)


def _released(cfg: DiTConfig, seed: int = 0) -> dict:
    """A state dict in the released layout with random values (what a synthetic released checkpoint holds)."""
    g = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in ours_to_official(SparseDiT(cfg).state_dict(), cfg).items()}
    return {k: torch.randn(s, generator=g) * 0.2 for k, s in shapes.items()}


def _batch(cfg: DiTConfig, lengths=(60, 23), seed=0):
    g = torch.Generator().manual_seed(seed)
    coords = [torch.unique(torch.randint(0, cfg.resolution, (n, 3), generator=g), dim=0) for n in lengths]
    x = SparseTensor.from_samples(coords, [torch.randn(len(c), cfg.in_channels, generator=g) for c in coords],
                                  cfg.resolution, ordered=False)
    b = len(lengths)
    if cfg.sparse_conditions:
        n = torch.tensor([7, 4][:b])
        cond = PackedCondition(torch.randn(int(n.sum()), cfg.cond_dim, generator=g),
                               torch.randint(0, 5, (int(n.sum()), 3), generator=g),
                               torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)]))
    else:
        cond = torch.randn(b, 5, cfg.cond_dim, generator=g)
    return x, torch.tensor([0.3, 0.8][:b]), cond


@pytest.mark.skipif(not SHAPES.exists(), reason="state_dict_shapes.json not present")
@pytest.mark.parametrize("entry,extra", [("sparse_dit", {}), ("sparse_dit_sparsecond", {"sparse_conditions": True})])
def test_paper_layout_is_the_released_one(entry, extra):
    cfg = DiTConfig.from_official({**PAPER, **extra})
    assert cfg == DiTConfig.named("paper", sparse_conditions=bool(extra))
    with torch.device("meta"):
        sd = SparseDiT(cfg).state_dict()
    got = {k: list(v.shape) for k, v in ours_to_official(sd, cfg).items()}
    assert got == json.loads(SHAPES.read_text())[entry]


def test_from_official_defaults_and_errors():
    cfg = DiTConfig.from_official(dict(NARROW, factor=0.5, use_shift=False, pe_mode="rope", share_mod=True))
    assert (cfg.position_factor, cfg.alternate_shift, cfg.positions, cfg.share_mod) == (0.5, False, False, True)
    assert cfg.head_dim == 16 and cfg.attention == "ssa" and cfg.q_tile == 1 and cfg.cross_qk_norm
    heads = DiTConfig.from_official({k: v for k, v in NARROW.items() if k != "num_heads"} | {"num_head_channels": 32})
    assert heads.heads == 2
    with pytest.raises(ValueError, match="unknown SparseDiT parameter.*'num_layers'"):
        DiTConfig.from_official(dict(NARROW, num_layers=3))
    with pytest.raises(ValueError, match="'resolution'.*missing"):
        DiTConfig.from_official({k: v for k, v in NARROW.items() if k != "resolution"})


@pytest.mark.parametrize("extra", [{}, {"sparse_conditions": True, "share_mod": True, "use_shift": False},
                                   {"compression_version": "v1"}])
def test_narrow_round_trip_and_forward(extra):
    cfg = DiTConfig.from_official({**NARROW, **extra})
    released = _released(cfg)
    ours = official_to_ours(released, cfg)
    model = SparseDiT(cfg).eval()
    model.load_state_dict(ours, strict=True)
    back = ours_to_official(model.state_dict(), cfg)
    assert back.keys() == released.keys() and all(torch.equal(back[k], released[k]) for k in back)
    x, t, cond = _batch(cfg)
    cu = x.cu_seqlens
    with torch.no_grad():
        out = model(x, t, cond).feats
        assert out.shape == (len(x), cfg.out_channels) and torch.isfinite(out).all()
        # tokens in any order inside a shape: the output follows them
        perm = torch.cat([torch.randperm(int(cu[1])), int(cu[1]) + torch.randperm(int(cu[2] - cu[1]))])
        shuffled = SparseTensor.packed(x.coords[perm, 1:], x.feats[perm], cu, x.resolution)
        assert torch.allclose(model(shuffled, t, cond).feats, out[perm], atol=1e-5)


def test_converter_names_bad_keys():
    cfg = DiTConfig.from_official(NARROW)
    released = _released(cfg)
    conv = "blocks.0.self_attn.compression_key.out_layers.0.conv.kernel"
    assert conv in released
    with pytest.raises(ValueError, match="lacks 'blocks.1.self_attn.gate.0.weight'"):
        official_to_ours({k: v for k, v in released.items() if k != "blocks.1.self_attn.gate.0.weight"}, cfg)
    with pytest.raises(ValueError, match="'cond_proj.weight'"):
        official_to_ours({**released, "cond_proj.weight": torch.zeros(64, 64)}, cfg)
    with pytest.raises(ValueError, match="out_layer.weight"):
        official_to_ours({**released, "out_layer.weight": torch.zeros(3, 64)}, cfg)
    ours = official_to_ours(released, cfg)
    with pytest.raises(ValueError, match="lacks 'out_layer.bias'"):
        ours_to_official({k: v for k, v in ours.items() if k != "out_layer.bias"}, cfg)
    # the full-attention baseline takes the released weights without the SSA-only tensors
    full = replace(cfg, attention="full")
    SparseDiT(full).load_state_dict(official_to_ours(released, full), strict=True)


def test_triton_interpreter_matches_reference_backend():
    import kernels.ssa.segment_attention as seg

    if type(seg._rows).__name__ != "InterpretedFunction":
        pytest.skip("the SSA kernels were imported without TRITON_INTERPRET=1")
    cfg = DiTConfig.from_official(dict(NARROW, num_blocks=2))
    model = SparseDiT(cfg).eval()
    model.load_state_dict(official_to_ours(_released(cfg, 3), cfg))
    tri = SparseDiT(replace(cfg, ssa_backend="triton")).eval()
    tri.load_state_dict(model.state_dict())
    x, t, cond = _batch(cfg, (30, 9), seed=4)
    with torch.no_grad():
        ref, out = model(x, t, cond).feats, tri(x, t, cond).feats
    assert ((out - ref).norm() / ref.norm()) < 1e-4


def test_sinusoid_layouts():
    from model.embeddings import TimestepEmbedder, position_embedding_3d, sinusoidal

    e = position_embedding_3d(torch.tensor([[1, 2, 3]]), 1024, factor=0.5)[0]
    f = 1.0 / 10000 ** (torch.arange(170) / 170)
    for axis, c in enumerate((0.5, 1.0, 1.5)):  # per axis [sin | cos], axes side by side, 4 zeros at the end
        assert torch.allclose(e[axis * 340:axis * 340 + 170], torch.sin(c * f), atol=1e-6)
        assert torch.allclose(e[axis * 340 + 170:(axis + 1) * 340], torch.cos(c * f), atol=1e-6)
    assert (e[1020:] == 0).all()
    s = sinusoidal(torch.tensor([250.0]), 256)[0]  # timesteps: [cos | sin]
    g = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(128) / 128)
    assert torch.allclose(s, torch.cat([torch.cos(250 * g), torch.sin(250 * g)]), atol=1e-5)
    emb = TimestepEmbedder(8)
    assert torch.allclose(emb(torch.tensor([0.25])), emb.mlp(sinusoidal(torch.tensor([250.0]), 256)))


def test_sparse_tensor_call_keeps_the_structure_on_the_tensor():
    from kernels.sparse_conv import coord_keys

    cfg = DiTConfig.from_official(NARROW)
    model = SparseDiT(cfg).eval()
    model.load_state_dict(official_to_ours(_released(cfg, 5), cfg))
    packed, t, cond = _batch(cfg, seed=6)
    x = SparseTensor.from_unsorted(packed.coords, packed.feats, cfg.resolution)  # the same tokens in key order

    def structures():
        return [v for k, v in x.cache.items() if isinstance(k, tuple) and k[0] == "ssa"]

    with torch.no_grad():
        out = model(x, t, cond)
        assert len(structures()) == 1
        st = structures()[0]
        again = model(x.replace(x.feats * 2), t, cond)
        assert structures()[0] is st and not torch.allclose(again.feats, out.feats)
        order = torch.argsort(coord_keys(packed.coords, cfg.resolution))
        assert torch.allclose(out.feats, model(packed, t, cond).feats[order], atol=1e-5)


def test_attention_offsets_read_once_per_token_set_and_condition():
    """A sampler's steps (x.replace, one condition object) read the attention offsets from the device once; a
    new condition tensor on the same tokens gets its own offsets, never the cached ones."""
    cfg = DiTConfig.from_official({**NARROW, "sparse_conditions": True})
    model = SparseDiT(cfg).eval()
    model.load_state_dict(official_to_ours(_released(cfg, 7), cfg))
    x, t, cond = _batch(cfg, seed=8)
    reads = []
    real = torch.Tensor.tolist

    def counting(self):
        reads.append(tuple(self.shape))
        return real(self)

    with torch.no_grad():
        torch.Tensor.tolist = counting
        try:
            first = model(x, t, cond).feats
            n_first = len(reads)
            second = model(x.replace(x.feats.clone()), t, cond).feats
        finally:
            torch.Tensor.tolist = real
        assert n_first >= 2 and len(reads) == n_first  # no offset read on the second step
        assert torch.equal(first, second)
        # another packed condition (other lengths) on the same cached tokens: its own offsets
        n = torch.tensor([3, 8])
        other = PackedCondition(torch.randn(11, cfg.cond_dim), torch.randint(0, 5, (11, 3)),
                                torch.cat([torch.zeros(1, dtype=torch.long), n.cumsum(0)]))
        fresh = SparseTensor.packed(x.coords[:, 1:], x.feats, x.cu_seqlens, x.resolution)
        assert torch.allclose(model(x, t, other).feats, model(fresh, t, other).feats, atol=1e-6)
        # a dense condition needs no read at all
        dense_cfg = DiTConfig.from_official(NARROW)
        dense = SparseDiT(dense_cfg).eval()
        xd, td, cd = _batch(dense_cfg, seed=9)
        dense(xd, td, cd)
        reads.clear()
        torch.Tensor.tolist = counting
        try:
            dense(xd.replace(xd.feats.clone()), td, cd)
        finally:
            torch.Tensor.tolist = real
        assert reads == []
