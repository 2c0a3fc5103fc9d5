"""Checks of the parity stand-ins on tiny hand-computed cases (CPU, seconds):
    .venv/bin/python -m pytest benchmarks/parity/test_standins.py -q
"""
import math

import torch

from benchmarks.parity.standins import flash_attn as fa
from benchmarks.parity.standins import ssa_ops
from benchmarks.parity.standins import torchsparse as ts


def test_conv_offset_order_and_submanifold():
    # batch 0: voxels at (0,0,0), (1,0,0), (0,1,0), (0,0,1); batch 1: (1,0,0) (must not be a neighbour)
    coords = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1], [1, 1, 0, 0]], dtype=torch.int32)
    feats = torch.tensor([[1.0], [10.0], [100.0], [1000.0], [5.0]])
    conv = ts.Conv3d(1, 1, 3, bias=True)
    with torch.no_grad():
        conv.kernel.copy_(torch.arange(1, 28, dtype=torch.float32).view(27, 1, 1))
        conv.bias.fill_(0.5)
    out = conv(ts.SparseTensor(feats, coords)).F.squeeze(1)
    # offset t = ix + 3·iy + 9·iz reads p + (ix-1, iy-1, iz-1); weight of offset t is t + 1
    w = lambda dx, dy, dz: (dx + 1) + 3 * (dy + 1) + 9 * (dz + 1) + 1
    expect = [
        w(0, 0, 0) * 1 + w(1, 0, 0) * 10 + w(0, 1, 0) * 100 + w(0, 0, 1) * 1000 + 0.5,
        w(0, 0, 0) * 10 + w(-1, 0, 0) * 1 + w(-1, 1, 0) * 100 + w(-1, 0, 1) * 1000 + 0.5,
        w(0, 0, 0) * 100 + w(0, -1, 0) * 1 + w(1, -1, 0) * 10 + w(0, -1, 1) * 1000 + 0.5,
        w(0, 0, 0) * 1000 + w(0, 0, -1) * 1 + w(1, 0, -1) * 10 + w(0, 1, -1) * 100 + 0.5,
        w(0, 0, 0) * 5 + 0.5,                            # batch 1 alone
    ]
    assert expect[:2] == [14 + 150 + 1700 + 23000 + 0.5, 140 + 13 + 1600 + 22000 + 0.5]
    assert out.tolist() == expect


def test_conv_kernel_one_is_a_matmul_and_shapes():
    conv = ts.Conv3d(3, 2, 1, bias=True)
    assert tuple(conv.kernel.shape) == (3, 2)
    assert tuple(ts.Conv3d(3, 2, 3).kernel.shape) == (27, 3, 2)
    x = ts.SparseTensor(torch.randn(4, 3), torch.zeros(4, 4, dtype=torch.int32))
    assert torch.allclose(conv(x).F, x.F @ conv.kernel + conv.bias)


def _naive(q, k, v, scale):
    s = torch.einsum("lhd,shd->hls", q.double(), k.double()) * scale
    lse = torch.logsumexp(s, -1)
    return torch.einsum("hls,shd->lhd", torch.softmax(s, -1), v.double()), lse


def test_flash_varlen_gqa_and_lse_layout():
    torch.manual_seed(0)
    q = torch.randn(7, 4, 8)
    k = torch.randn(9, 2, 8)
    v = torch.randn(9, 2, 8)
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32)
    cu_k = torch.tensor([0, 5, 9], dtype=torch.int32)
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu_q, cu_k, 4, 5, return_attn_probs=True)
    assert out.shape == (7, 4, 8) and lse.shape == (4, 7) and lse.dtype == torch.float32
    for (a, b), (c, d) in zip([(0, 3), (3, 7)], [(0, 5), (5, 9)]):
        # query head h reads key head h // 2
        kk = k[c:d].repeat_interleave(2, dim=1)
        vv = v[c:d].repeat_interleave(2, dim=1)
        ref, ref_lse = _naive(q[a:b], kk, vv, 1 / math.sqrt(8))
        assert torch.allclose(out[a:b].double(), ref, atol=1e-5)
        assert torch.allclose(lse[:, a:b].double(), ref_lse, atol=1e-5)


def test_flash_dense_matches_varlen():
    torch.manual_seed(1)
    q, k, v = torch.randn(2, 5, 4, 8), torch.randn(2, 6, 4, 8), torch.randn(2, 6, 4, 8)
    dense = fa.flash_attn_func(q, k, v)
    cu_q = torch.tensor([0, 5, 10], dtype=torch.int32)
    cu_k = torch.tensor([0, 6, 12], dtype=torch.int32)
    var = fa.flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu_q, cu_k, 5, 6)
    assert torch.allclose(dense.flatten(0, 1), var, atol=1e-6)


def test_selection_all_blocks_is_full_attention():
    torch.manual_seed(2)
    q, k, v = torch.randn(10, 4, 8), torch.randn(10, 2, 8), torch.randn(10, 2, 8)
    cu = torch.tensor([0, 10], dtype=torch.int32)
    # three blocks of 4, 3, 3 tokens, every query selects all of them (topk 4, one padding entry)
    cu_blocks = torch.tensor([0, 3], dtype=torch.int32)
    cu_tokens = torch.tensor([0, 4, 7, 10], dtype=torch.int32)
    topk = torch.tensor([0, 1, 2, -1], dtype=torch.int32).expand(2, 10, 4).contiguous()
    out = ssa_ops.selection_attention(q, k, v, topk, cu_blocks, cu_tokens, 8, cu)
    ref, _ = _naive(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), 1 / math.sqrt(8))
    assert torch.allclose(out.double(), ref, atol=1e-5)
    # selecting only block 1 attends to tokens 4..6
    one = torch.tensor([1, -1, -1, -1], dtype=torch.int32).expand(2, 10, 4).contiguous()
    out1 = ssa_ops.selection_attention(q, k, v, one, cu_blocks, cu_tokens, 8, cu)
    ref1, _ = _naive(q, k[4:7].repeat_interleave(2, 1), v[4:7].repeat_interleave(2, 1), 1 / math.sqrt(8))
    assert torch.allclose(out1.double(), ref1, atol=1e-5)


def test_score_sums_group_probabilities():
    torch.manual_seed(3)
    q, kc = torch.randn(6, 4, 8), torch.randn(3, 2, 8)
    cu_q = torch.tensor([0, 6], dtype=torch.int32)
    cu_k = torch.tensor([0, 3], dtype=torch.int32)
    _, lse, _ = fa.flash_attn_varlen_func(q, kc, kc, cu_q, cu_k, 6, 3, return_attn_probs=True)
    score = ssa_ops.attention_score(q, kc, lse.exp().log2(), cu_q, cu_k, 6, 3, None)
    # probabilities of each query head over the compressed keys sum to 1; a group of 2 heads sums to 2
    assert torch.allclose(score.sum(-1), torch.full((2, 6), 2.0), atol=1e-5)


def test_flash_varlen_many_windows_matches_one_by_one():
    torch.manual_seed(4)
    lens = [5, 8, 3, 8, 1] * 5                      # 25 windows: the grouped path
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    n = int(cu[-1])
    q, k, v = torch.randn(n, 4, 8), torch.randn(n, 2, 8), torch.randn(n, 2, 8)
    out, lse, _ = fa.flash_attn_varlen_func(q, k, v, cu, cu, 8, 8, return_attn_probs=True)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        o, l = fa._attend(q[a:b], k[a:b], v[a:b], 1 / math.sqrt(8), False)
        assert torch.allclose(out[a:b], o, atol=1e-6) and torch.allclose(lse[:, a:b], l, atol=1e-6)
