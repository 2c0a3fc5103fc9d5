"""kernels/conv3d: the narrow dense 3³ convolution, Triton (interpreter on the CPU) against F.conv3d, its
argument checks, and the refiner's convolutions through it on a GPU."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from kernels.conv3d import conv3d_3x3, conv3d_3x3_reference


def _need_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 before triton is imported")


@pytest.mark.parametrize("b, cin, cout, size, bias", [
    (1, 8, 8, (5, 6, 7), True),     # the refiners' 8 -> 8 layers, a ragged block at the end
    (1, 3, 5, (3, 4, 5), True),     # 3 channels: padded to 4 in each (tap, channel) chunk
    (2, 1, 8, (4, 4, 9), True),     # conv_in, two samples
    (1, 40, 8, (3, 5, 2), True),    # the skip-concatenated up block: three 16-channel chunks, the last masked
    (1, 8, 27, (4, 3, 6), False),   # a smoothing-weight net's last layer (no bias), 27 -> 32 padded outputs
    (1, 16, 1, (1, 1, 1), True),    # one voxel: every neighbour is padding
    (1, 33, 32, (3, 3, 3), True),   # 33 channels: two 32-wide chunks
])
def test_matches_conv3d(b, cin, cout, size, bias):
    _need_interpreter()
    g = torch.Generator().manual_seed(cin * 100 + cout)
    x = torch.randn(b, cin, *size, generator=g)
    w = torch.randn(cout, cin, 3, 3, 3, generator=g)
    bb = torch.randn(cout, generator=g) if bias else None
    got = conv3d_3x3(x, w, bb, backend="triton")
    want = F.conv3d(x.double(), w.double(), None if bb is None else bb.double(), padding=1)
    assert got.dtype == x.dtype and got.shape == want.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
    if cin <= 8:  # the other form too: per tap (the default packs (tap, channel) chunks up to 8 channels)
        from kernels.conv3d.triton_kernel import conv3d_3x3_triton
        for packed, kc in ((False, 32), (True, 16)):
            torch.testing.assert_close(conv3d_3x3_triton(x, w, bb, packed=packed, kc=kc).double(), want,
                                       rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(conv3d_3x3(x, w, bb, backend="torch").double(), want, rtol=1e-5, atol=1e-4)


def test_non_contiguous_input_and_empty_grid():
    _need_interpreter()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 6, 8, 5, 4, generator=g)[:, :, ::2]  # strided along D
    w = torch.randn(4, 6, 3, 3, 3, generator=g)
    torch.testing.assert_close(conv3d_3x3(x, w, backend="triton"), F.conv3d(x, w, padding=1), rtol=1e-5, atol=1e-4)
    empty = conv3d_3x3(torch.zeros(1, 6, 0, 5, 4), w, backend="triton")
    assert empty.shape == (1, 4, 0, 5, 4)


def test_bad_arguments_are_named():
    x = torch.zeros(1, 4, 3, 3, 3)
    with pytest.raises(ValueError, match="x must be"):
        conv3d_3x3(torch.zeros(4, 3, 3, 3), torch.zeros(2, 4, 3, 3, 3))
    with pytest.raises(ValueError, match="weight must be"):
        conv3d_3x3(x, torch.zeros(2, 4, 1, 1, 1))
    with pytest.raises(ValueError, match="weight must be"):
        conv3d_3x3_reference(x, torch.zeros(2, 5, 3, 3, 3))
    with pytest.raises(ValueError, match="bias must be"):
        conv3d_3x3(x, torch.zeros(2, 4, 3, 3, 3), torch.zeros(3))
    with pytest.raises(ValueError, match="backend"):
        conv3d_3x3(x, torch.zeros(2, 4, 3, 3, 3), backend="cuda")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_compiled_kernel_against_cudnn(dtype):
    """The compiled kernel at a refiner patch's 192³ for its narrow shapes against cuDNN in the same dtype."""
    g = torch.Generator(device="cuda").manual_seed(0)
    for cin, cout in [(8, 8), (40, 8), (8, 27), (1, 8), (8, 1)]:
        x = torch.randn(1, cin, 96, 100, 64, device="cuda", generator=g).to(dtype)
        w = (torch.randn(cout, cin, 3, 3, 3, device="cuda", generator=g) / (27 * cin) ** 0.5).to(dtype)
        b = torch.randn(cout, device="cuda", generator=g).to(dtype)
        want = F.conv3d(x.float(), w.float(), b.float(), padding=1)
        got = conv3d_3x3(x, w, b).float()
        assert ((got - want).norm() / want.norm()).item() < 1e-2, (cin, cout)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("name", ["debug", "debug_1024"])
def test_refiner_patch_with_the_kernel(monkeypatch, name):
    """model.refiner.SMALL_CONVS: a float16 patch through kernels/conv3d matches the cuDNN patch."""
    from model import refiner as rf

    cfg = rf.RefinerConfig.named(name)
    torch.manual_seed(0)
    net = rf.VoxelRefiner(cfg).eval().cuda().cast_weights(torch.float16)
    g = torch.Generator(device="cuda").manual_seed(3)
    x = (torch.rand(1, 1, 32, 32, 32, device="cuda", generator=g) * 2 - 1).half()
    f = torch.randn(1, cfg.width, 32, 32, 32, device="cuda", generator=g).half() if cfg.kind == "sdf" else None
    with torch.no_grad():
        monkeypatch.setattr(rf, "SMALL_CONVS", False)
        want = net(x, f).float()
        monkeypatch.setattr(rf, "SMALL_CONVS", True)
        got = net(x, f).float()
    assert ((got - want).norm() / want.norm().clamp_min(1e-6)).item() < 1e-2
