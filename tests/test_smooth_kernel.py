"""kernels.smooth: the refiner's per-voxel adaptive 3³ filter, Triton (interpreter) against the PyTorch
reference and against a direct per-voxel sum."""
import pytest
import torch

from kernels.smooth import adaptive_smooth, adaptive_smooth_reference


def _direct(x, w, times):
    """Per voxel, per tap, in float64: the definition, with zero padding and L1-normalised taps."""
    x, w = x.double(), w.double()
    wn = w / w.abs().sum(1, keepdim=True).clamp_min(1e-12)
    b, c, d, h, wd = x.shape
    for _ in range(times):
        out = torch.zeros_like(x)
        for o in range(27):
            dz, dy, dx = o // 9 - 1, o // 3 % 3 - 1, o % 3 - 1
            shifted = torch.zeros_like(x)
            zs, ys, xs = slice(max(0, -dz), d - max(0, dz)), slice(max(0, -dy), h - max(0, dy)), slice(max(0, -dx), wd - max(0, dx))
            zt, yt, xt = slice(max(0, dz), d + min(0, dz)), slice(max(0, dy), h + min(0, dy)), slice(max(0, dx), wd + min(0, dx))
            shifted[:, :, zs, ys, xs] = x[:, :, zt, yt, xt]
            out += shifted * wn[:, o:o + 1]
        x = out
    return x


@pytest.mark.parametrize("shape, times", [((1, 8, 5, 6, 7), 3), ((2, 1, 4, 4, 9), 1), ((1, 3, 3, 17, 2), 2)])
def test_triton_and_reference_match_the_definition(shape, times):
    g = torch.Generator().manual_seed(sum(shape))
    x = torch.randn(*shape, generator=g)
    w = torch.randn(shape[0], 27, *shape[2:], generator=g)
    w[:, :, 0, 0, 0] = 0.0  # a voxel whose taps are all zero: the L1 norm's floor, output 0 there
    want = _direct(x, w, times)
    for backend in ("torch", "triton"):
        got = adaptive_smooth(x, w, times, backend=backend)
        assert got.dtype == x.dtype
        assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5), backend


def test_half_input_sums_in_float32():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 8, 6, 6, 6, generator=g)
    w = torch.randn(1, 27, 6, 6, 6, generator=g)
    want = adaptive_smooth_reference(x, w)
    got = adaptive_smooth(x.bfloat16(), w.bfloat16(), backend="triton")
    assert got.dtype == torch.bfloat16
    assert float((got.float() - want).abs().max()) < 0.05


def test_shapes_are_checked():
    with pytest.raises(ValueError, match="27"):
        adaptive_smooth(torch.zeros(1, 2, 3, 3, 3), torch.zeros(1, 26, 3, 3, 3))
    with pytest.raises(ValueError, match="backend"):
        adaptive_smooth(torch.zeros(1, 2, 3, 3, 3), torch.zeros(1, 27, 3, 3, 3), backend="cuda")


@pytest.mark.gpu
def test_cuda_kernel_matches_reference():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator("cuda").manual_seed(0)
    x = torch.randn(1, 8, 40, 41, 42, device="cuda", generator=g)
    w = torch.randn(1, 27, 40, 41, 42, device="cuda", generator=g)
    want = adaptive_smooth_reference(x.double(), w.double())
    got = adaptive_smooth(x, w)  # auto: the kernel on CUDA
    assert torch.allclose(got.double(), want, atol=1e-5, rtol=1e-5)
    half = adaptive_smooth(x.half(), w.half())
    assert half.dtype == torch.float16 and float((half.double() - want).abs().max()) < 1e-2
