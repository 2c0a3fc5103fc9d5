"""The SSA layer: config, block order round trip, Triton vs reference backend, full-attention switch."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")  # read when the kernel module is imported

from model.dit import DiTConfig  # noqa: E402
from model.ssa import SSAConfig, SpatialSparseAttention, ssa_structure  # noqa: E402
from ssa_cases import random_shapes  # noqa: E402

SMALL = dict(dim=32, num_heads=4, num_kv_heads=2, head_dim=16, top_k=3)


def _inputs(seed=0):
    coords, cu = random_shapes([70, 2, 33], grid=10, seed=seed)
    x = torch.randn(coords.shape[0], 32, generator=torch.Generator().manual_seed(seed))
    return x, coords, cu


def test_config_rejects_unknown_keys():
    with pytest.raises(ValueError, match="unknown SSAConfig keys: topk"):
        SSAConfig.from_dict({"topk": 8})
    with pytest.raises(ValueError, match="attention"):
        SSAConfig(attention="dense")
    assert SSAConfig.from_dict({"top_k": 4}).top_k == 4


@pytest.mark.parametrize("layer", [0, 1])
def test_triton_layer_matches_reference_layer(layer):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("this CPU layer test runs the kernels in Triton's interpreter")
    torch.manual_seed(0)
    q_tile = 1 if layer == 0 else SSAConfig().q_tile  # the paper's per-query selection, and the default tiles
    m = SpatialSparseAttention(SSAConfig(**SMALL, cmp_block=4, q_tile=q_tile, backend="triton"), layer)
    r = SpatialSparseAttention(SSAConfig(**SMALL, cmp_block=4, q_tile=q_tile, backend="torch"), layer)
    r.load_state_dict(m.state_dict())
    r.double()
    x, coords, cu = _inputs(layer)
    xt = x.clone().requires_grad_(True)
    xr = x.double().requires_grad_(True)
    out = m(xt, coords, cu)
    ref = r(xr, coords, cu)
    assert ((out.double() - ref).norm() / ref.norm()) < 1e-4
    out.square().sum().backward()
    ref.square().sum().backward()
    assert ((xt.grad.double() - xr.grad).norm() / xr.grad.norm()) < 1e-4
    for (name, p), (_, pr) in zip(m.named_parameters(), r.named_parameters()):
        assert p.grad is not None, name
        assert ((p.grad.double() - pr.grad).norm() / pr.grad.norm().clamp_min(1e-12)) < 1e-4, name


def test_output_follows_token_order_and_structure_is_cached():
    torch.manual_seed(1)
    m = SpatialSparseAttention(SSAConfig(**SMALL, backend="torch"), 0)
    x, coords, cu = _inputs(2)
    out = m(x, coords, cu)
    # shuffling tokens inside a shape shuffles the output the same way
    perm = torch.cat([torch.arange(70).flip(0), torch.arange(70, 72), 72 + torch.randperm(33)])
    out2 = m(x[perm], coords[perm], cu)
    assert torch.allclose(out2, out[perm], atol=1e-5)
    a = ssa_structure(coords, cu, m.cfg)
    assert ssa_structure(coords, cu, m.cfg)[2] is a[2]


def test_full_attention_switch_and_dit_hook():
    cfg = DiTConfig(depth=2, width=32, heads=4, kv_heads=2, head_dim=16, cond_dim=32, attention="ssa")
    m = SpatialSparseAttention.from_dit_config(cfg, 1)
    assert m.shifted and m.cfg.num_heads == 4
    full = SpatialSparseAttention(SSAConfig(**SMALL, attention="full"), 0)
    x, coords, cu = _inputs(3)
    y = full(x, coords, cu)
    # full attention within a shape: a change in shape 0 leaves shape 2 untouched
    x2 = x.clone()
    x2[:70] += 1.0
    assert torch.allclose(full(x2, coords, cu)[72:], y[72:], atol=1e-6)
    assert not torch.allclose(full(x2, coords, cu)[:70], y[:70])
