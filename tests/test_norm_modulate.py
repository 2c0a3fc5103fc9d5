"""kernels/norm_modulate: the fused LayerNorm + per-shape affine map against its reference and against the
DiT blocks' own path (LayerNorm32, then modulate), and its argument checks."""
from __future__ import annotations

import os

import pytest
import torch

from kernels.norm_modulate import norm_modulate_segments, norm_modulate_segments_reference
from model.dit import LayerNorm32, modulate


def _need_interpreter():
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on the CPU needs TRITON_INTERPRET=1 before triton is imported")


def _offsets(counts):
    return [0] + torch.cumsum(torch.as_tensor(counts), 0).tolist()


@pytest.mark.parametrize("n, w, shapes", [(37, 64, 1), (50, 100, 3), (1, 32, 1), (0, 64, 2)])
def test_kernel_matches_reference_and_the_block_path(n, w, shapes):
    _need_interpreter()
    g = torch.Generator().manual_seed(n + w)
    x = torch.randn(n, w, generator=g) * 3 + 1
    shift, scale = torch.randn(shapes, w, generator=g), torch.randn(shapes, w, generator=g)
    rows = torch.sort(torch.randint(0, shapes, (n,), generator=g)).values
    offsets = _offsets(torch.bincount(rows, minlength=shapes))
    got = norm_modulate_segments(x, 1 + scale, shift, offsets, eps=1e-6, backend="triton")
    want = norm_modulate_segments_reference(x, 1 + scale, shift, offsets, eps=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    block = modulate(LayerNorm32(w, elementwise_affine=False, eps=1e-6)(x), shift[rows], scale[rows])
    torch.testing.assert_close(got, block, rtol=1e-5, atol=1e-5)


def test_affine_norm_as_one_row():
    """The cross-attention's affine LayerNorm: a = weight, c = bias, one row for every token of two shapes."""
    _need_interpreter()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(20, 48, generator=g)
    norm = LayerNorm32(48, elementwise_affine=True, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(48, generator=g))
        norm.bias.copy_(torch.randn(48, generator=g))
    got = norm_modulate_segments(x, norm.weight[None], norm.bias[None], [0, 7, 20], eps=1e-6, backend="triton")
    torch.testing.assert_close(got, norm(x).detach(), rtol=1e-5, atol=1e-5)


def test_half_input_rounds_once():
    """float16 in, float16 out: within one float16 rounding of the float32 result."""
    _need_interpreter()
    g = torch.Generator().manual_seed(5)
    x = torch.randn(16, 64, generator=g).half()
    a, c = torch.rand(1, 64, generator=g) + 0.5, torch.randn(1, 64, generator=g)
    got = norm_modulate_segments(x, a, c, [0, 16], backend="triton")
    assert got.dtype == torch.float16
    exact = norm_modulate_segments_reference(x.float(), a, c, [0, 16])
    torch.testing.assert_close(got.float(), exact, rtol=2e-3, atol=2e-3)


def test_bad_arguments_are_named():
    x = torch.zeros(4, 8)
    with pytest.raises(ValueError, match="x must be"):
        norm_modulate_segments(torch.zeros(8), torch.ones(1, 8), torch.zeros(1, 8), [0, 8])
    with pytest.raises(ValueError, match="a must be"):
        norm_modulate_segments(x, torch.ones(1, 7), torch.zeros(1, 8), [0, 4])
    with pytest.raises(ValueError, match="differ"):
        norm_modulate_segments(x, torch.ones(2, 8), torch.zeros(1, 8), [0, 2, 4])


def _fused_path_matches(monkeypatch, model, block_cls, fused, forward):
    """``forward()``'s output and every parameter gradient of a random-weight model, with the blocks' default
    forward and then with ``fused`` patched in as ``block_cls.forward``: equal up to float32 summation order."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)

    def run():
        model.zero_grad()
        out = forward()
        out.square().sum().backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want, want_grads = run()
    monkeypatch.setattr(block_cls, "forward", fused)
    got, got_grads = run()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("lengths", [[12, 30, 7], [25]])
def test_fused_block_path_gives_the_dit_output_and_gradients(monkeypatch, lengths):
    """DiTBlock._forward_fused (what FUSED_NORMS runs on CUDA) gives the default blocks' velocity and parameter
    gradients: several shapes (a modulation row each) and one; here through the reference on the CPU."""
    from model.dit import DiTBlock, DiTConfig, SparseDiT
    from model.sparse import SparseTensor

    cfg = DiTConfig.named("debug")
    torch.manual_seed(0)
    model = SparseDiT(cfg).train()
    g = torch.Generator().manual_seed(1)
    cells = [torch.randperm(16 ** 3, generator=g)[:n] for n in lengths]
    coords = [torch.stack([c // 256, c // 16 % 16, c % 16], 1) for c in cells]
    x = SparseTensor.from_samples(coords, [torch.randn(n, 16, generator=g) for n in lengths], ordered=False)
    t, cond = torch.rand(len(lengths), generator=g), torch.randn(len(lengths), 5, cfg.cond_dim, generator=g)

    def fused(self, h, st, cu, token_shape, mod, c, cu_c):
        if hasattr(self, "adaLN_modulation"):
            mod = self.adaLN_modulation(mod)
        return self._forward_fused(h, st, cu, token_shape, mod, c, cu_c)

    _fused_path_matches(monkeypatch, model, DiTBlock, fused, lambda: model(x.replace(x.feats), t, cond).feats)


def test_fused_dense_block_path_gives_the_structure_dit_output_and_gradients(monkeypatch):
    """DenseDiTBlock._forward_fused (what model.dense_dit.FUSED_NORMS runs on CUDA) gives the default blocks'
    velocity and parameter gradients for a batch of two samples (a modulation row each); the reference here."""
    from model.dense_dit import DenseDiT, DenseDiTBlock, DenseDiTConfig

    cfg = DenseDiTConfig.named("debug")
    torch.manual_seed(0)
    model = DenseDiT(cfg).train()
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, cfg.in_channels, *(cfg.resolution,) * 3, generator=g)
    t, cond = torch.rand(2, generator=g), torch.randn(2, 7, cfg.cond_dim, generator=g)

    def fused(self, h, mod, c):
        return self._forward_fused(h, self.adaLN_modulation(mod), c)

    _fused_path_matches(monkeypatch, model, DenseDiTBlock, fused, lambda: model(x, t, cond))


@pytest.mark.parametrize("rows_of_a, offsets, width", [(1, [0, 37], 48), (3, [0, 70, 70, 131], 64),
                                                       (1, [0, 10, 90], 1024), (2, [0, 0, 5], 40)])
def test_segments_kernel_and_backward_match_reference(rows_of_a, offsets, width):
    """norm_modulate_segments in Triton (interpreter): output and the gradients of x, a and c against the
    differentiable reference; an empty shape, a shape longer than a program's 64 rows, a width not a power
    of two, one row of a for several shapes."""
    _need_interpreter()
    g = torch.Generator().manual_seed(rows_of_a + width)
    n = offsets[-1]
    x = (torch.randn(n, width, generator=g) * 3 + 1).requires_grad_(True)
    a = torch.randn(rows_of_a, width, generator=g).requires_grad_(True)
    c = torch.randn(rows_of_a, width, generator=g).requires_grad_(True)
    dy = torch.randn(n, width, generator=g)
    got = norm_modulate_segments(x, a, c, offsets, backend="triton")
    grads = torch.autograd.grad((got * dy).sum(), (x, a, c))
    want = norm_modulate_segments_reference(x, a, c, offsets)
    want_grads = torch.autograd.grad((want * dy).sum(), (x, a, c))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for name, gg, ww in zip("xac", grads, want_grads):
        torch.testing.assert_close(gg, ww, rtol=1e-4, atol=1e-4, msg=name)


def test_segments_out_dtype_and_errors():
    x = torch.randn(6, 8)
    y = norm_modulate_segments(x, torch.ones(2, 8), torch.zeros(2, 8), [0, 2, 6], out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), torch.nn.functional.layer_norm(x, (8,), eps=1e-6), rtol=1e-2, atol=1e-2)
    with pytest.raises(ValueError, match="rise from 0 to 6"):
        norm_modulate_segments(x, torch.ones(1, 8), torch.zeros(1, 8), [0, 4, 3, 6])
    with pytest.raises(ValueError, match="1 or 2 rows"):
        norm_modulate_segments(x, torch.ones(3, 8), torch.zeros(3, 8), [0, 2, 6])
    with pytest.raises(ValueError, match="host list"):
        norm_modulate_segments(x, torch.ones(1, 8), torch.zeros(1, 8), torch.tensor([0, 6]))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_kernel_and_fused_dit_on_cuda(monkeypatch):
    """On a GPU: the compiled kernel against its reference in bf16, and a small SS-DiT's guided velocity with
    model.dit.FUSED_NORMS against the default path (bf16: one rounding less, so close, not equal)."""
    import model.dit as dit_module
    from model.dit import DiTConfig, SparseDiT
    from model.sparse import SparseTensor

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(5000, 1024, generator=g) * 2).cuda().bfloat16()
    a, c = (torch.randn(2, 1024, generator=g).cuda().bfloat16() for _ in range(2))
    got = norm_modulate_segments(x, a, c, [0, 3000, 5000])
    want = norm_modulate_segments_reference(x, a, c, [0, 3000, 5000])
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2
    cfg = DiTConfig.named("small")
    torch.manual_seed(0)
    net = SparseDiT(cfg)
    with torch.no_grad():  # the released init zeroes the modulation and output: a zero velocity
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net = net.cuda().bfloat16().eval()
    cells = [torch.randperm(32 ** 3, generator=g)[:n] for n in (3000, 2000)]
    coords = [torch.stack([q // 1024, q // 32 % 32, q % 32], 1) for q in cells]
    xs = SparseTensor.from_samples(coords, [torch.randn(len(q), cfg.in_channels, generator=g) for q in cells],
                                   device="cuda", ordered=False)
    xs = xs.replace(xs.feats.bfloat16())
    t = torch.tensor([0.3, 0.7], device="cuda", dtype=torch.bfloat16)
    cond = torch.randn(2, 20, cfg.cond_dim, generator=g).cuda().bfloat16()
    with torch.no_grad():
        monkeypatch.setattr(dit_module, "FUSED_NORMS", False)
        want = net(xs, t, cond).feats.float()
        monkeypatch.setattr(dit_module, "FUSED_NORMS", True)
        got = net(xs.replace(xs.feats), t, cond).feats.float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_fused_structure_dit_on_cuda(monkeypatch):
    """A narrow structure DiT's guided velocity in bf16 with model.dense_dit.FUSED_NORMS against the release's
    path (one rounding less: close, not equal)."""
    import model.dense_dit as dense_module
    from model.dense_dit import DenseDiT, DenseDiTConfig

    g = torch.Generator().manual_seed(0)
    cfg = DenseDiTConfig(width=256, cond_dim=128, depth=3, heads=4)
    net = DenseDiT(cfg)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    net = net.cuda().bfloat16().eval()
    x = torch.randn(2, cfg.in_channels, *(cfg.resolution,) * 3, generator=g).cuda().bfloat16()
    t = torch.tensor([0.3, 0.7], device="cuda", dtype=torch.bfloat16)
    cond = torch.randn(2, 30, cfg.cond_dim, generator=g).cuda().bfloat16()
    with torch.no_grad():
        monkeypatch.setattr(dense_module, "FUSED_NORMS", False)
        want = net(x, t, cond).float()
        monkeypatch.setattr(dense_module, "FUSED_NORMS", True)
        got = net(x, t, cond).float()
    assert ((got - want).norm() / want.norm()).item() < 2e-2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_compiled_segments_forward_and_backward_on_cuda():
    """The compiled segment kernels as training runs them (float32 x, bf16 modulation, bf16 output) against
    the float32 reference: output and the three gradients within bf16 rounding."""
    g = torch.Generator().manual_seed(0)
    offsets = [0, 3000, 3000, 7001]
    x = (torch.randn(7001, 1024, generator=g) * 2).cuda().requires_grad_(True)
    a = (1 + 0.1 * torch.randn(3, 1024, generator=g)).cuda().bfloat16().requires_grad_(True)
    c = (0.1 * torch.randn(3, 1024, generator=g)).cuda().bfloat16().requires_grad_(True)
    dy = torch.randn(7001, 1024, generator=g).cuda().bfloat16()
    got = norm_modulate_segments(x, a, c, offsets, out_dtype=torch.bfloat16)
    grads = torch.autograd.grad(got, (x, a, c), dy)
    want = norm_modulate_segments_reference(x, a.float(), c.float(), offsets)
    want_grads = torch.autograd.grad(want, (x, a, c), dy.float(), allow_unused=True)
    rel = lambda u, v: ((u.float() - v.float()).norm() / v.float().norm()).item()  # noqa: E731
    assert got.dtype == torch.bfloat16 and rel(got, want) < 1e-2
    for gg, ww in zip(grads, want_grads):
        assert rel(gg, ww) < 1e-2


@pytest.mark.parametrize("offsets, rows_of_g, dtypes", [
    ((0, 70, 70, 150), 3, (torch.float32, torch.float32)),   # an empty shape; one gate row a shape
    ((0, 90), 1, (torch.float32, torch.float32)),             # one row for all
    ((0, 40, 100), 2, (torch.float32, torch.bfloat16)),       # autocast's mix: float32 stream, bf16 branch
])
def test_gated_residual_segments_match_addcmul(offsets, rows_of_g, dtypes):
    from kernels.norm_modulate import gated_residual_segments, gated_residual_segments_reference

    g_ = torch.Generator().manual_seed(offsets[-1])
    n, w = offsets[-1], 48
    x0 = torch.randn(n, w, generator=g_).to(dtypes[0])
    h0 = torch.randn(n, w, generator=g_).to(dtypes[1])
    gate0 = torch.randn(rows_of_g, w, generator=g_).to(dtypes[1])
    dy = torch.randn(n, w, generator=g_)
    res = {}
    for name, fn in (("ref", lambda *a: gated_residual_segments_reference(*a, offsets)),
                     ("kernel", lambda *a: gated_residual_segments(*a, offsets, backend="triton"))):
        x, h, gate = (t.clone().requires_grad_() for t in (x0, h0, gate0))
        y = fn(x, h, gate)
        res[name] = (y, *torch.autograd.grad(y, [x, h, gate], dy.to(y.dtype)))
    x, h, gate = (t.double().requires_grad_() for t in (x0, h0, gate0))  # the truth in float64
    y = gated_residual_segments_reference(x, h, gate, offsets)
    truth = (y, *torch.autograd.grad(y, [x, h, gate], dy.double()))
    for a, b, t, what in zip(res["ref"], res["kernel"], truth, ("y", "dx", "dh", "dg")):
        assert a.dtype == b.dtype and a.shape == b.shape, what
        tol = (1e-2 if b.dtype == torch.bfloat16 else 1e-5) * max(1.0, t.abs().max().item())
        assert torch.allclose(b.double(), t, atol=tol, rtol=0), what  # float32 sums: within the dtype's rounding


@pytest.mark.gpu
def test_cuda_gated_residual_segments_match_addcmul():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from kernels.norm_modulate import gated_residual_segments, gated_residual_segments_reference

    g_ = torch.Generator("cuda").manual_seed(0)
    offsets = (0, 10704, 21408)
    x, h = (torch.randn(21408, 1024, device="cuda", generator=g_).to(torch.bfloat16).requires_grad_()
            for _ in range(2))
    gate = torch.randn(2, 1024, device="cuda", generator=g_).to(torch.bfloat16).requires_grad_()
    dy = torch.randn(21408, 1024, device="cuda", generator=g_).to(torch.bfloat16)
    outs = []
    for fn in (gated_residual_segments_reference, gated_residual_segments):
        y = fn(x, h, gate, offsets)
        outs.append((y, *torch.autograd.grad(y, [x, h, gate], dy)))
    for what, r, k in zip(("y", "dx", "dh"), *outs):
        err = ((r.float() - k.float()).norm() / r.float().norm()).item()
        assert err < 1e-2, (what, err)
    # the gate's gradient sums 10,704 products a shape: against the float64 sums (on an H100 the kernel is 0.16%
    # off, the reference's F.embedding path 0.24%, plain indexing, which accumulates in bf16, 10.9%)
    exact = (h.double() * dy.double()).reshape(2, 10704, 1024).sum(1)
    err = ((outs[1][3].double() - exact).norm() / exact.norm()).item()
    assert err < 1e-2, ("dg", err)


def test_gated_residual_segments_bad_input_is_named():
    from kernels.norm_modulate import gated_residual_segments

    x = torch.randn(6, 8)
    with pytest.raises(ValueError, match="gated_residual_segments: g need 1 or 2 rows"):
        gated_residual_segments(x, x, torch.randn(3, 8), [0, 2, 6])
    with pytest.raises(ValueError, match="gated_residual_segments: offsets must rise from 0 to 6"):
        gated_residual_segments(x, x, torch.randn(2, 8), [0, 2, 5])
    with pytest.raises(ValueError, match=r"gated_residual_segments: h \(6, 4\) must match x"):
        gated_residual_segments(x, torch.randn(6, 4), torch.randn(1, 8), [0, 6])
