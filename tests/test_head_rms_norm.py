"""kernels/head_rms_norm: the per-head q/k norm in one pass against its reference and MultiHeadRMSNorm."""
from __future__ import annotations

import os

import pytest
import torch

from kernels.head_rms_norm import head_rms_norm, head_rms_norm_reference


@pytest.mark.parametrize("shape, dtype", [((37, 4, 32), torch.float32), ((2, 9, 3, 24), torch.float32),
                                          ((50, 32, 32), torch.float16), ((0, 2, 8), torch.float32)])
def test_kernel_matches_reference_and_module(shape, dtype):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 before triton is imported")
    from model.dense_dit import MultiHeadRMSNorm

    g = torch.Generator().manual_seed(len(shape))
    x = (torch.randn(shape, generator=g) * 3).to(dtype)
    if x.numel():
        x.view(-1, shape[-1])[0] = 0  # a zero row: F.normalize's 1e-12 floor, no nan
    gamma = torch.randn(shape[-2:], generator=g)
    got = head_rms_norm(x, gamma, backend="triton")
    want = head_rms_norm_reference(x, gamma)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    norm = MultiHeadRMSNorm(shape[-2], shape[-1])
    with torch.no_grad():
        norm.gamma.copy_(gamma)
        torch.testing.assert_close(norm(x.float()), head_rms_norm_reference(x.float(), gamma), rtol=0, atol=0)


@pytest.mark.parametrize("shape, dtype", [((37, 4, 32), torch.float32), ((2, 300, 3, 24), torch.float32),
                                          ((130, 32, 32), torch.bfloat16), ((0, 2, 8), torch.float32)])
def test_backward_matches_reference(shape, dtype):
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 before triton is imported")
    g = torch.Generator().manual_seed(7 + len(shape))
    x0 = (torch.randn(shape, generator=g) * 3).to(dtype)
    if x0.numel():
        x0.view(-1, shape[-1])[1] = 0  # a zero row: below the norm's floor only the scaled term is left
    gamma0 = torch.randn(shape[-2:], generator=g)
    dy = torch.randn(shape, generator=g).to(dtype)
    grads = []
    for backend in ("triton", "torch"):
        x, gamma = x0.clone().requires_grad_(), gamma0.clone().requires_grad_()
        y = head_rms_norm(x, gamma, backend=backend)
        assert y.dtype == dtype
        y.backward(dy)
        grads.append((y.detach(), x.grad, gamma.grad))
    (y1, dx1, dg1), (y2, dx2, dg2) = grads
    assert dx1.dtype == dtype and dg1.dtype == torch.float32
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(y1.float(), y2.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(dx1.float(), dx2.float(), rtol=tol, atol=tol)
    torch.testing.assert_close(dg1, dg2, rtol=1e-4, atol=1e-3 if dtype == torch.float32 else 5e-2)


def test_errors():
    x = torch.randn(5, 2, 8)
    with pytest.raises(ValueError, match="gamma must be"):
        head_rms_norm(x, torch.ones(3, 8))
    with pytest.raises(ValueError, match="x must be"):
        head_rms_norm(torch.ones(8), torch.ones(1, 8))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_on_cuda():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(9001, 32, 32, generator=g).cuda().bfloat16()
    gamma = torch.randn(32, 32, generator=g).cuda()
    with torch.no_grad():
        got = head_rms_norm(x, gamma)
    want = head_rms_norm_reference(x, gamma)
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    dy = torch.randn_like(x)
    grads = []
    for backend in ("auto", "torch"):
        xg, gg = x.clone().requires_grad_(), gamma.clone().requires_grad_()
        head_rms_norm(xg, gg, backend=backend).backward(dy)
        grads.append((xg.grad.float(), gg.grad))
    for a, b in zip(*grads):
        assert ((a - b).norm() / b.norm()).item() < 1e-2


@pytest.mark.parametrize("shape", [(37, 4, 32), (2, 300, 3, 16), (0, 2, 8)])
def test_cpu_training_path_matches_autograd_of_the_reference(shape):
    """On a CPU, float32 with gradients: the hand-written backward gives autograd's gradients of the reference
    (a zero row included: there only the floor's plain scaling is left)."""
    g = torch.Generator().manual_seed(11 + len(shape))
    x0 = torch.randn(shape, generator=g) * 3
    if x0.numel():
        x0.view(-1, shape[-1])[2] = 0
    gamma0, dy = torch.randn(shape[-2:], generator=g), torch.randn(shape, generator=g)
    grads = []
    for fn in (head_rms_norm, head_rms_norm_reference):
        x, gamma = x0.clone().requires_grad_(), gamma0.clone().requires_grad_()
        y = fn(x, gamma)
        y.backward(dy)
        grads.append((y.detach(), x.grad, gamma.grad))
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    if x0.numel():  # the path under test, not the reference again
        x = x0.clone().requires_grad_()
        assert "HeadRMSNormTorch" in type(head_rms_norm(x, gamma0).grad_fn).__name__
