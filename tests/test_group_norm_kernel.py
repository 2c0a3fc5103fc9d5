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
