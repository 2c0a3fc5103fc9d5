"""The SSA layer: config, learned block compressors, block order round trip, Triton vs reference backend,
full-attention switch."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is imported

from model.dit import DiTConfig  # noqa: E402
from model.sparse import SparseTensor  # noqa: E402
from model.ssa import SSAConfig, SpatialSparseAttention, ssa_structure  # noqa: E402
from ssa_cases import random_shapes  # noqa: E402

SMALL = dict(dim=32, num_heads=4, num_kv_heads=2, head_dim=16, top_k=3)


def _inputs(seed=0, sizes=(70, 2, 33)):
    """Packed tokens of random shapes (each shape's voxels in random order) with 32 features."""
    coords, cu = random_shapes(list(sizes), grid=10, seed=seed)
    x = torch.randn(coords.shape[0], 32, generator=torch.Generator().manual_seed(seed))
    return SparseTensor.packed(coords, x, cu)


def _randomize(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return m


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(ValueError, match="unknown SSAConfig keys: topk"):
        SSAConfig.from_dict({"topk": 8})
    with pytest.raises(ValueError, match="attention"):
        SSAConfig(attention="dense")
    with pytest.raises(ValueError, match="compression"):
        SSAConfig(compression="v3")
    with pytest.raises(ValueError, match="norm_groups"):
        SSAConfig(dim=32, num_heads=4, num_kv_heads=1, head_dim=8)
    assert SSAConfig.from_dict({"top_k": 4}).top_k == 4
    assert SSAConfig().q_tile == 1 and SSAConfig().cmp_block == 4


def test_released_parameter_layout():
    m = SpatialSparseAttention(SSAConfig(**SMALL))
    shapes = {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes["proj_q.weight"] == (64, 32) and shapes["proj_k.weight"] == (32, 32)
    assert shapes["gate.0.weight"] == (3, 32) and shapes["intra_block_pe"] == (4, 4, 4, 32)
    assert shapes["compression_key.out_layers.0.weight"] == (27, 32, 32)
    assert not any(k.endswith("bias") and k.startswith("proj") for k in shapes)
    full = SpatialSparseAttention(SSAConfig(**SMALL, attention="full"))
    assert sorted(full.state_dict()) == ["proj_k.weight", "proj_o.weight", "proj_q.weight", "proj_v.weight"]


def test_compressor_is_pool_plus_learned_part():
    """With the last conv zeroed but its bias, v2 gives the pooled input + bias; the release's pool divides each
    block's sum by its token count plus one (scatter_reduce "mean" onto zeros counts the zero)."""
    m = _randomize(SpatialSparseAttention(SSAConfig(**SMALL)), 1)
    x = _inputs(1)
    perm, _, st = ssa_structure(x, m.cfg)
    k, v = m.proj_k(x.feats[perm]), m.proj_v(x.feats[perm])
    with torch.no_grad():
        m.compression_value.out_layers[3].weight.zero_()
    _, v_cmp = m.compress(k, v, st)
    counts = (st.cmp_offsets[1:] - st.cmp_offsets[:-1])[:, None].float()
    mean = torch.zeros(st.n_cmp, 32).index_add(0, st.cmp_of_token, v) / (counts + 1)
    expect = mean + m.compression_value.out_layers[3].bias
    assert torch.allclose(v_cmp.reshape(st.n_cmp, 32), expect, atol=1e-5)


@pytest.mark.parametrize("layer", [0, 1])
def test_triton_layer_matches_reference_layer(layer):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("this CPU layer test runs the kernels in Triton's interpreter")
    q_tile = 1 if layer == 0 else 64  # the release's per-query selection, and the tiled option
    m = _randomize(SpatialSparseAttention(SSAConfig(**SMALL, q_tile=q_tile, backend="triton"), layer == 1), layer)
    r = SpatialSparseAttention(SSAConfig(**SMALL, q_tile=q_tile, backend="torch"), layer == 1)
    r.load_state_dict(m.state_dict())
    r.double()
    x = _inputs(layer, (40, 2, 17))
    xt = x.feats.clone().requires_grad_(True)
    xr = x.feats.double().requires_grad_(True)
    out = m(x.replace(xt)).feats
    ref = r(x.replace(xr)).feats
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-4
    out.square().sum().backward()
    ref.square().sum().backward()
    assert ((xt.grad.double() - xr.grad).norm() / xr.grad.norm()) < 1e-4
    scale = max(float(pr.grad.norm()) for pr in r.parameters())
    for (name, p), (_, pr) in zip(m.named_parameters(), r.named_parameters()):
        assert p.grad is not None, name
        # a conv bias right before a one-channel-per-group GroupNorm has a zero gradient: float32 noise there
        assert (p.grad.double() - pr.grad).norm() <= 1e-4 * max(float(pr.grad.norm()), 1e-3 * scale), name


def test_output_follows_token_order_and_structure_is_cached():
    m = _randomize(SpatialSparseAttention(SSAConfig(**SMALL, backend="torch")), 2)
    x = _inputs(2)
    out = m(x)
    # shuffling tokens inside a shape shuffles the output the same way
    perm = torch.cat([torch.arange(70).flip(0), torch.arange(70, 72), 72 + torch.randperm(33)])
    shuffled = SparseTensor.packed(x.coords[perm, 1:], x.feats[perm], x.cu_seqlens)
    assert torch.allclose(m(shuffled).feats, out.feats[perm], atol=1e-5)
    # the structure is built once and kept on the tensor: the output and every replace share it
    a = ssa_structure(x, m.cfg)
    assert ssa_structure(x.replace(x.feats * 2), m.cfg)[2] is a[2] and ssa_structure(out, m.cfg)[2] is a[2]
    assert ssa_structure(shuffled, m.cfg)[2] is not a[2]
    # the compressors' fine grid keeps one cache for all its tensors: its layout is read to the host once
    grid = a[2].cached("block_grid", lambda: None)
    assert grid is not None and "layout" in grid.fine_cache
    assert grid.fine(x.feats).cache is grid.fine(x.feats * 2).cache is grid.fine_cache


def test_full_attention_switch_and_dit_hook():
    m = SpatialSparseAttention.from_dit_config(DiTConfig.named("debug"), 1)
    assert m.shifted and m.cfg.num_heads == 4 and m.cfg.window_shift == 4
    assert SpatialSparseAttention.from_dit_config(DiTConfig.named("debug", alternate_shift=False), 0).shifted
    full = SpatialSparseAttention(SSAConfig(**SMALL, attention="full"), False)
    x = _inputs(3)
    y = full(x).feats
    # full attention within a shape: a change in shape 0 leaves shape 2 untouched
    x2 = x.feats.clone()
    x2[:70] += 1.0
    assert torch.allclose(full(x.replace(x2)).feats[72:], y[72:], atol=1e-6)
    assert not torch.allclose(full(x.replace(x2)).feats[:70], y[:70])


@pytest.mark.parametrize("keep_outputs", [False, True])
def test_checkpoint_recomputation_reuses_the_forward_selection(monkeypatch, keep_outputs):
    """Under gradient checkpointing an SSA layer selects its blocks once (the recomputation takes the
    forward's selection; selecting again would make it two calls), with ``attention_reuse`` runs its three
    attention forwards once (six otherwise), and its gradients are the reference's."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("this CPU layer test runs the kernels in Triton's interpreter")
    import kernels.ssa.ops as ops
    from kernels.ssa import attention_reuse, selection_reuse
    from torch.utils.checkpoint import checkpoint

    calls, launches = [], []
    select, launch = ops._select, ops._launch_fwd
    monkeypatch.setattr(ops, "_select", lambda *a, **k: calls.append(1) or select(*a, **k))
    monkeypatch.setattr(ops, "_launch_fwd", lambda *a, **k: launches.append(1) or launch(*a, **k))
    m = _randomize(SpatialSparseAttention(SSAConfig(**SMALL, q_tile=1, backend="triton")), 0)
    r = SpatialSparseAttention(SSAConfig(**SMALL, q_tile=1, backend="torch"))
    r.load_state_dict(m.state_dict())
    r.double()
    x = _inputs(0, (24, 11))
    xt = x.feats.clone().requires_grad_(True)
    reuse = attention_reuse if keep_outputs else selection_reuse
    out = checkpoint(lambda f: m(x.replace(f)).feats, xt, use_reentrant=False, context_fn=reuse)
    out.square().sum().backward()
    assert (len(calls), len(launches)) == (1, 3 if keep_outputs else 6)
    xr = x.feats.double().requires_grad_(True)
    r(x.replace(xr)).feats.square().sum().backward()
    got = torch.cat([xt.grad.flatten()] + [p.grad.flatten() for p in m.parameters()]).double()
    want = torch.cat([xr.grad.flatten()] + [p.grad.flatten() for p in r.parameters()])
    assert ((got - want).norm() / want.norm()) < 1e-4


def test_dit_checkpoints_with_selection_reuse(monkeypatch):
    import model.dit as dit
    from kernels.ssa import selection_reuse
    from model.dit import SparseDiT

    from kernels.ssa import attention_reuse

    seen = []
    real = dit.checkpoint
    monkeypatch.setattr(dit, "checkpoint", lambda *a, **k: seen.append(k.get("context_fn")) or real(*a, **k))
    cfg = DiTConfig.named("debug", grad_checkpointing=True, ssa_backend="torch")
    x = _inputs(1, (20, 9))
    x = x.replace(torch.randn(x.feats.shape[0], cfg.in_channels))
    net = SparseDiT(cfg).train()
    net(x, torch.tensor([0.2, 0.6]), torch.randn(2, 3, cfg.cond_dim)).feats.sum().backward()
    monkeypatch.setattr(dit, "CHECKPOINT_KEEPS_ATTENTION", True)
    net(x, torch.tensor([0.2, 0.6]), torch.randn(2, 3, cfg.cond_dim)).feats.sum().backward()
    assert seen == [selection_reuse] * cfg.depth + [attention_reuse] * cfg.depth


def test_selection_reuse_names_a_mismatch():
    from kernels.ssa.ops import SelectionReuse

    box = SelectionReuse(keep_outputs=True)
    forward, recompute = box._active(False), box._active(True)
    with forward:
        box.keep("plan", 10, ("outputs",))
    with pytest.raises(RuntimeError, match="has 12 queries, the forward's had 10"):
        box.take(12)
    assert box.take(10) == ("plan", ("outputs",))
    with pytest.raises(RuntimeError, match="more SSA layers than the forward"):
        box.take(10)
    for _ in range(2):  # a retained graph's next recomputation: the plan again, the outputs computed anew
        with recompute:
            assert box.take(10) == ("plan", None)
