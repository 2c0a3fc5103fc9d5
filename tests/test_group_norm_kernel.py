"""kernels.group_norm: GroupNorm (+ SiLU) with float32 statistics, Triton (interpreter) against the
PyTorch reference and against the definition in float64."""
import pytest
import torch

from kernels.group_norm import group_norm_act, group_norm_act_reference
from kernels.group_norm.triton_kernel import group_stats


def _direct(x, groups, w, b, eps, silu):
    n, c = x.shape[:2]
    xd = x.double().reshape(n, groups, -1)
    mean = xd.mean(-1, keepdim=True)
    var = ((xd - mean) ** 2).mean(-1, keepdim=True)
    y = ((xd - mean) / torch.sqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if w is not None:
        y = y * w.double().view(shape)
    if b is not None:
        y = y + b.double().view(shape)
    return y * torch.sigmoid(y) if silu else y


@pytest.mark.parametrize("shape, groups, affine, silu", [
    ((1, 8, 5, 6, 7), 4, True, True),
    ((2, 6, 3, 4, 5), 3, True, False),
    ((1, 4, 37), 2, False, True),
    ((3, 16, 2, 2, 2), 16, True, True),
])
def test_triton_and_reference_match_the_definition(monkeypatch, shape, groups, affine, silu):
    g = torch.Generator().manual_seed(sum(shape) + groups)
    x = torch.randn(*shape, generator=g) * 3 + 5  # an offset: the statistics must not cancel
    w = torch.randn(shape[1], generator=g) if affine else None
    b = torch.randn(shape[1], generator=g) if affine else None
    want = _direct(x, groups, w, b, 1e-5, silu)
    for backend in ("torch", "triton"):
        got = group_norm_act(x, groups, w, b, 1e-5, silu, backend=backend)
        assert got.dtype == x.dtype and got.shape == x.shape
        assert torch.allclose(got.double(), want, atol=2e-5, rtol=1e-5), backend


def test_statistics_split_over_many_programs():
    """A run longer than one program's share: the partial (count, mean, M2) merge by Chan's formula."""
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 3000, generator=g) * 0.5 + 100.0  # large mean, small spread
    mean, rstd = group_stats(x, 2, 1e-5, block=64)
    xd = x.double().reshape(4, -1)
    assert torch.allclose(mean.double(), xd.mean(1), rtol=1e-6)
    assert torch.allclose(rstd.double(), 1 / torch.sqrt(xd.var(1, unbiased=False) + 1e-5), rtol=1e-4)


def test_half_input_keeps_float32_statistics():
    g = torch.Generator().manual_seed(4)
    x = (torch.randn(1, 8, 4, 4, 4, generator=g) * 2 + 3).half()
    w, b = torch.randn(8, generator=g).half(), torch.randn(8, generator=g).half()
    want = group_norm_act_reference(x, 4, w, b, 1e-5, True)
    got = group_norm_act(x, 4, w, b, 1e-5, True, backend="triton")
    assert got.dtype == torch.float16
    assert torch.allclose(got.float(), want.float(), atol=2e-3, rtol=2e-3)


def test_bad_arguments_are_named():
    x = torch.randn(1, 6, 4)
    with pytest.raises(ValueError, match="multiple of groups"):
        group_norm_act(x, 4, None, None)
    with pytest.raises(ValueError, match="weight of shape"):
        group_norm_act(x, 3, torch.ones(5), None)
    with pytest.raises(ValueError, match="backend"):
        group_norm_act(x, 3, None, None, backend="cuda")


@pytest.mark.gpu
def test_cuda_kernel_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 40, 48, 49, 50, device="cuda", generator=g) * 2 + 1
    w, b = torch.randn(40, device="cuda", generator=g), torch.randn(40, device="cuda", generator=g)
    want = _direct(x, 4, w, b, 1e-5, True)
    got = group_norm_act(x, 4, w, b, 1e-5, silu=True)  # auto: the kernel on CUDA
    assert torch.allclose(got.double(), want, atol=1e-4, rtol=1e-4)
    half = group_norm_act(x.half(), 4, w.half(), b.half(), 1e-5, silu=True)
    assert half.dtype == torch.float16 and float((half.double() - want).abs().max()) < 2e-2


# --- by shape segments (the SS-VAE's and the SSA compressors' norms) ---------------------------------------

def _direct_segments(x, offsets, groups, w, b, eps, silu):
    """The definition in float64: each shape's rows normalised over (rows, group channels)."""
    outs = []
    for lo, hi in zip(offsets, offsets[1:]):
        part = x[lo:hi].double()
        if hi > lo:
            g = part.reshape(hi - lo, groups, -1)
            mean = g.mean((0, 2), keepdim=True)
            var = ((g - mean) ** 2).mean((0, 2), keepdim=True)
            part = ((g - mean) / torch.sqrt(var + eps)).reshape(part.shape)
        outs.append(part)
    y = torch.cat(outs)
    y = y * w.double() if w is not None else y
    y = y + b.double() if b is not None else y
    return y * torch.sigmoid(y) if silu else y


@pytest.mark.parametrize("channels, groups, offsets, affine, silu", [
    (8, 4, (0, 5, 5, 37), True, True),        # an empty shape between two
    (12, 4, (0, 70), True, False),            # three channels a group (padded tiles)
    (6, 3, (0, 3, 40), False, True),          # no affine
    (8, 2, (0, 1700, 3000), True, True),      # several programs a shape: partials merged by Chan's formula
])
def test_segments_forward_and_backward_match_the_definition(channels, groups, offsets, affine, silu):
    from kernels.group_norm import segment_group_norm_act

    g = torch.Generator().manual_seed(channels * 7 + offsets[-1])
    x = (torch.randn(offsets[-1], channels, generator=g) * 0.5 + 40.0)  # a large mean: no cancellation allowed
    w = torch.randn(channels, generator=g) if affine else None
    b = torch.randn(channels, generator=g) if affine else None
    want = _direct_segments(x, offsets, groups, w, b, 1e-5, silu)
    dy = torch.randn(offsets[-1], channels, generator=g)
    grads = {}
    for backend in ("torch", "triton"):
        leaves = [t.clone().requires_grad_() for t in (x, w, b) if t is not None]
        xi, wi, bi = (leaves + [None, None])[:3] if affine else (leaves[0], None, None)
        got = segment_group_norm_act(xi, offsets, groups, wi, bi, 1e-5, silu, backend=backend)
        assert got.dtype == x.dtype and got.shape == x.shape
        assert torch.allclose(got.double(), want, atol=3e-5, rtol=1e-5), backend
        grads[backend] = torch.autograd.grad(got, leaves, dy)
    # the gradients against autograd through the float64 definition
    leaves = [t.double().requires_grad_() for t in (x, w, b) if t is not None]
    xd, wd, bd = (leaves + [None, None])[:3] if affine else (leaves[0], None, None)
    ref = torch.autograd.grad(_direct_segments(xd, offsets, groups, wd, bd, 1e-5, silu), leaves, dy.double())
    for backend, got in grads.items():
        for name, a, r in zip("xwb", got, ref):
            assert torch.allclose(a.double(), r, atol=2e-4 * max(1.0, r.abs().max().item()), rtol=1e-4), \
                (backend, name)


def test_segments_half_input_and_bad_offsets():
    from kernels.group_norm import segment_group_norm_act

    g = torch.Generator().manual_seed(5)
    x = (torch.randn(50, 16, generator=g) * 2 + 3).bfloat16()
    w, b = torch.randn(16, generator=g), torch.randn(16, generator=g)
    want = segment_group_norm_act(x, (0, 20, 50), 8, w, b, silu=True, backend="torch")
    got = segment_group_norm_act(x, (0, 20, 50), 8, w, b, silu=True, backend="triton")
    assert got.dtype == torch.bfloat16
    assert torch.allclose(got.float(), want.float(), atol=2e-2, rtol=2e-2)
    with pytest.raises(ValueError, match="segment_group_norm_act: offsets must rise from 0 to 50"):
        segment_group_norm_act(x, (0, 20, 49), 8, w, b)
    with pytest.raises(ValueError, match="segment_group_norm_act: x .* multiple of groups"):
        segment_group_norm_act(x, (0, 50), 5, None, None)


def test_sparse_norm_then_silu_runs_fused_with_the_same_result():
    """run_layers fuses a SparseGroupNorm + SparseSiLU pair; the sequence's output is what calling each gives."""
    from torch import nn

    from model.sparse import SparseConv3d, SparseGroupNorm, SparseSiLU, SparseTensor, run_layers

    g = torch.Generator().manual_seed(6)
    coords = torch.unique(torch.cat([torch.zeros(60, 1, dtype=torch.int32),
                                     torch.randint(0, 8, (60, 3), generator=g, dtype=torch.int32)], 1), dim=0)
    coords = torch.cat([coords, coords + torch.tensor([1, 0, 0, 0], dtype=torch.int32)])
    x = SparseTensor(coords, torch.randn(len(coords), 8, generator=g) + 2, 8, 2)
    seq = nn.Sequential(SparseConv3d(8, 8), SparseGroupNorm(4, 8), SparseSiLU(), SparseConv3d(8, 8))
    with torch.no_grad():
        seq[1].weight.normal_(generator=g)
        seq[1].bias.normal_(generator=g)
    assert torch.allclose(run_layers(seq, x).feats, seq(x).feats, atol=1e-6)


@pytest.mark.gpu
def test_cuda_segments_match_reference():
    """The compressors' size (two shapes of 10,704 rows, 64 channels) and an SS-VAE block's, both dtypes."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from kernels.group_norm import segment_group_norm_act

    g = torch.Generator("cuda").manual_seed(0)
    for n, c, dtype, tol in ((21408, 64, torch.float32, 1e-4), (21408, 64, torch.bfloat16, 3e-2),
                             (60000, 256, torch.float32, 1e-4)):
        x = (torch.randn(n, c, device="cuda", generator=g) * 2 + 1).to(dtype).requires_grad_()
        w = torch.randn(c, device="cuda", generator=g).to(dtype).requires_grad_()
        b = torch.randn(c, device="cuda", generator=g).to(dtype).requires_grad_()
        dy = torch.randn(n, c, device="cuda", generator=g).to(dtype)
        offsets = (0, n // 3, n)
        outs = {}
        for be in ("torch", "triton"):
            y = segment_group_norm_act(x, offsets, 32, w, b, silu=True, backend=be)
            outs[be] = (y, *torch.autograd.grad(y, [x, w, b], dy))
        for name, r, k in zip(("y", "dx", "dw", "db"), outs["torch"], outs["triton"]):
            r, k = r.float(), k.float()
            err = ((r - k).norm() / r.norm().clamp_min(1e-12)).item()
            assert err < tol, (n, c, dtype, name, err)
