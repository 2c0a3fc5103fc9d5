"""Sparse convolution equals dense conv3d on the same voxels: PyTorch reference and Triton kernel, forward and backward."""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

if not torch.cuda.is_available():
    # the Triton kernels run in the interpreter on CPU-only machines (read when the kernel module is imported)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from kernels.sparse_conv import build_kernel_map, sparse_conv, sparse_conv_reference, sparse_conv_triton  # noqa: E402


def random_structure(res: int, count: int, batch: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    c = torch.cat([torch.randint(0, batch, (count, 1), generator=g), torch.randint(0, res, (count, 3), generator=g)], 1)
    c = torch.unique(c, dim=0)  # sorted by (b, i, j, k), i.e. by key
    return c.to(torch.int32)


def dense_conv(coords, x, w, res, out_coords, kernel_size, stride, padding):
    """conv3d on a dense grid holding the sparse features, read back at out_coords."""
    batch = int(coords[:, 0].max()) + 1
    grid = torch.zeros(batch, x.shape[1], res, res, res, dtype=x.dtype)
    c = coords.long()
    grid[c[:, 0], :, c[:, 1], c[:, 2], c[:, 3]] = x
    k = kernel_size
    wd = w.reshape(k, k, k, w.shape[1], w.shape[2]).permute(4, 3, 0, 1, 2)
    y = F.conv3d(grid, wd, stride=stride, padding=padding)
    o = out_coords.long()
    return y[o[:, 0], :, o[:, 1], o[:, 2], o[:, 3]]


CASES = [  # (res, voxels, cin, cout, kernel, stride, padding)
    (10, 300, 3, 5, 3, 1, 1),
    (12, 500, 16, 32, 3, 1, 1),
    (12, 400, 20, 7, 2, 2, 0),
    (12, 400, 8, 16, 3, 2, 1),
]


def _case(res, count, cin, cout, k, stride, pad, seed, dtype, device="cpu"):
    coords = random_structure(res, count, 2, seed)
    if stride == 1:
        out = coords
    else:
        out = coords.clone()
        out[:, 1:] //= stride
        out = torch.unique(out, dim=0)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(coords.shape[0], cin, generator=g, dtype=torch.float64)
    w = torch.randn(k ** 3, cin, cout, generator=g, dtype=torch.float64) / (cin * k ** 3) ** 0.5
    dy = torch.randn(out.shape[0], cout, generator=g, dtype=torch.float64)
    kmap = build_kernel_map(coords.to(device), out.to(device), res, k, stride, pad, in_sorted=True)
    return coords, out, x, w, dy, kmap


def _dense_grads(coords, out, x, w, dy, res, k, stride, pad):
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = dense_conv(coords, xr, wr, res, out, k, stride, pad)
    y.backward(dy)
    return y.detach(), xr.grad, wr.grad


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_conv3d(case):
    res, count, cin, cout, k, stride, pad = case
    coords, out, x, w, dy, kmap = _case(res, count, cin, cout, k, stride, pad, 0, torch.float64)
    y_ref, gx_ref, gw_ref = _dense_grads(coords, out, x, w, dy, res, k, stride, pad)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = sparse_conv(xs, ws, kmap, backend="torch")
    y.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xs.grad, gx_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ws.grad, gw_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", CASES[:3])
def test_triton_matches_conv3d(case):
    res, count, cin, cout, k, stride, pad = case
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    coords, out, x, w, dy, kmap = _case(res, count, cin, cout, k, stride, pad, 1, torch.float32, dev)
    y_ref, gx_ref, gw_ref = _dense_grads(coords, out, x, w, dy, res, k, stride, pad)
    xs = x.float().to(dev).requires_grad_()
    ws = w.float().to(dev).requires_grad_()
    y = sparse_conv_triton(xs, ws, kmap)
    y.backward(dy.float().to(dev))
    for got, want in ((y, y_ref), (xs.grad, gx_ref), (ws.grad, gw_ref)):
        err = (got.detach().double().cpu() - want).norm() / want.norm()
        assert err < 1e-5, f"relative error {err:.2e}"


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("block_bytes", [None, 2048])
def test_gather_gemm_matches_conv3d(case, block_bytes, monkeypatch):
    """The CPU path ("auto" on CPU tensors) equals dense conv3d in value and both gradients, strided maps
    (their inverse built by scatter) and many row blocks (a block of a few rows) included."""
    from kernels.sparse_conv import gather_gemm

    if block_bytes:
        monkeypatch.setattr(gather_gemm, "BLOCK_BYTES", block_bytes)
    res, count, cin, cout, k, stride, pad = case
    coords, out, x, w, dy, kmap = _case(res, count, cin, cout, k, stride, pad, 2, torch.float64)
    y_ref, gx_ref, gw_ref = _dense_grads(coords, out, x, w, dy, res, k, stride, pad)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    y = sparse_conv(xs, ws, kmap)
    assert y.grad_fn is not None and "GatherGemm" in type(y.grad_fn).__name__
    y.backward(dy)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(xs.grad, gx_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ws.grad, gw_ref, rtol=1e-10, atol=1e-10)


def test_gather_gemm_half_precision_and_partial_grads():
    """bf16 input sums in float32 as the reference does; a frozen weight or input gets no gradient."""
    res, count, cin, cout, k, stride, pad = CASES[1]
    _, _, x, w, dy, kmap = _case(res, count, cin, cout, k, stride, pad, 3, torch.float32)
    x, w, dy = x.float(), w.float(), dy.float()
    got = sparse_conv(x.bfloat16(), w.bfloat16(), kmap, backend="gemm")
    # float32 sums of the same bf16 values, one rounding at the end: within a bf16 step of the exact result
    want = sparse_conv_reference(x.bfloat16().float(), w.bfloat16().float(), kmap)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, rtol=2 ** -7, atol=1e-6)
    xs = x.clone().requires_grad_()
    sparse_conv(xs, w, kmap, backend="gemm").backward(dy)
    ws = w.clone().requires_grad_()
    sparse_conv(x, ws, kmap, backend="gemm").backward(dy)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    sparse_conv_reference(xr, wr, kmap).backward(dy)
    torch.testing.assert_close(xs.grad, xr.grad, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ws.grad, wr.grad, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_bytes", [None, 4096])
def test_gather_gemm_bf16_operands_for_float32_tensors(block_bytes, monkeypatch):
    """GEMM_DTYPE bfloat16 (TrainConfig.cpu_conv_precision): float32 tensors in and out, each product of
    bfloat16-rounded operands summed in float32, so value and both gradients stay within a few bf16 steps of
    the float32 reference (the weight gradient over several row blocks too); None restores float32 exactly."""
    from kernels.sparse_conv import gather_gemm

    if block_bytes:
        monkeypatch.setattr(gather_gemm, "BLOCK_BYTES", block_bytes)
    res, count, cin, cout, k, stride, pad = CASES[1]
    _, _, x, w, dy, kmap = _case(res, count, cin, cout, k, stride, pad, 5, torch.float32)
    x, w, dy = x.float(), w.float(), dy.float()
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    want = sparse_conv_reference(xr, wr, kmap)
    want.backward(dy)
    monkeypatch.setattr(gather_gemm, "GEMM_DTYPE", torch.bfloat16)
    xs, ws = x.clone().requires_grad_(), w.clone().requires_grad_()
    got = sparse_conv(xs, ws, kmap, backend="gemm")
    got.backward(dy)
    assert got.dtype == xs.grad.dtype == ws.grad.dtype == torch.float32
    for a, b in ((got, want), (xs.grad, xr.grad), (ws.grad, wr.grad)):
        err = float((a - b).abs().max() / b.abs().max())
        assert 0 < err < 3e-2, err  # rounded (not float32), yet close
    monkeypatch.setattr(gather_gemm, "GEMM_DTYPE", None)
    torch.testing.assert_close(sparse_conv(x, w, kmap, backend="gemm"), want.detach(), rtol=1e-5, atol=1e-5)


def test_cpu_bf16_gemm_reads_the_flags(monkeypatch, tmp_path):
    """AMX tiles or AVX-512 BF16 count (AMX named first), a flag that only contains the name does not, and an
    unreadable /proc/cpuinfo reads as neither."""
    import builtins

    from kernels.sparse_conv import gather_gemm

    real_open = builtins.open
    for flags, want in (("fpu avx512f amx_bf16 amx_tile avx512_bf16", "amx_bf16"),
                        ("fpu avx512f avx512_bf16 avx512_vnni", "avx512_bf16"),
                        ("fpu avx512f avx512_vnni", ""), ("fpu xamx_bf16 avx512_bf16x", "")):
        info = tmp_path / "cpuinfo"
        info.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
        monkeypatch.setattr(builtins, "open", lambda p, *a, **k: real_open(info if p == "/proc/cpuinfo" else p, *a, **k))
        assert gather_gemm.cpu_bf16_gemm() == want
    monkeypatch.setattr(builtins, "open", lambda p, *a, **k: (_ for _ in ()).throw(OSError(p)))
    assert gather_gemm.cpu_bf16_gemm() == ""


@pytest.mark.parametrize("isa", ["amx_bf16", "avx512_bf16", ""])
def test_cpu_conv_precision_auto_asks_this_cpu(isa, monkeypatch):
    """TrainConfig.cpu_conv_precision as the worker applies it: auto is bf16 exactly where the CPU multiplies
    bfloat16 natively; a name outside fp32 / bf16 / auto is an error that names the setting."""
    from kernels.sparse_conv import gather_gemm

    monkeypatch.setattr(gather_gemm, "cpu_bf16_gemm", lambda: isa)
    assert gather_gemm.gemm_dtype("auto") is (torch.bfloat16 if isa else None)
    assert gather_gemm.gemm_dtype("bf16") is torch.bfloat16 and gather_gemm.gemm_dtype("fp32") is None
    with pytest.raises(ValueError, match="cpu_conv_precision.*'fp16'"):
        gather_gemm.gemm_dtype("fp16")


def test_gather_gemm_with_no_outputs_or_no_neighbours():
    coords = random_structure(6, 50, 1, 0)
    kmap = build_kernel_map(coords, coords[:0], 6)
    x = torch.randn(coords.shape[0], 4, requires_grad=True)
    y = sparse_conv(x, torch.randn(27, 4, 3), kmap, backend="gemm")
    assert y.shape == (0, 3)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    from kernels.sparse_conv.kernel_map import padded_index

    coords4 = random_structure(6, 50, 1, 1)
    kmap = build_kernel_map(coords4, coords4, 6)
    idx = padded_index(kmap)
    assert padded_index(kmap) is idx  # built once, shared by every conv on the map
    assert torch.equal(idx, torch.where(kmap.neighbors >= 0, kmap.neighbors.long(), len(coords4)))
    far = torch.tensor([[0, 0, 0, 0], [0, 5, 5, 5]], dtype=torch.int32)  # no voxel has a neighbour but itself
    kmap = build_kernel_map(far, far, 6)
    w = torch.randn(27, 4, 3)
    x = torch.randn(2, 4)
    torch.testing.assert_close(sparse_conv(x, w, kmap, backend="gemm"), x @ w[13])


def test_kernel_map_entries_point_at_the_right_voxels():
    coords = random_structure(9, 200, 1, 3)
    kmap = build_kernel_map(coords, coords, 9, 3, in_sorted=True)
    offs = torch.stack(torch.meshgrid(*[torch.arange(-1, 2)] * 3, indexing="ij"), -1).reshape(-1, 3)
    nbr = kmap.neighbors.long()
    o, v = torch.nonzero(nbr >= 0, as_tuple=True)
    assert torch.equal(coords[nbr[o, v], 1:] - coords[o, 1:], offs[v].to(torch.int32))
    # and every neighbour that exists is found
    have = {tuple(c) for c in coords[:, 1:].tolist()}
    expected = sum((tuple((c + d).tolist()) in have) for c in coords[:, 1:] for d in offs)
    assert int((nbr >= 0).sum()) == expected
    assert kmap.symmetric and torch.equal(kmap.inverse, nbr.flip(1).int())


@pytest.mark.parametrize("kernel,stride,padding,sort", [(3, 1, 1, True), (3, 1, 1, False), (2, 2, 0, False),
                                                         (3, 2, 1, True), (1, 1, 0, False)])
def test_triton_kernel_map_equals_the_searchsorted_one(kernel, stride, padding, sort):
    """The one-launch binary-search map (GPU path) equals the PyTorch reference, unsorted inputs included."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    coords = random_structure(11, 400, 3, 7)
    if not sort:
        coords = coords[torch.randperm(len(coords), generator=torch.Generator().manual_seed(1))]
    out = coords if stride == 1 else torch.unique(torch.cat([coords[:, :1], coords[:, 1:] // stride], 1), dim=0)
    out = out.to(device)
    coords = coords.to(device)
    if stride == 1:
        out = coords
    ref = build_kernel_map(coords, out, 11, kernel, stride, padding, in_sorted=sort, backend="torch")
    got = build_kernel_map(coords, out, 11, kernel, stride, padding, in_sorted=sort, backend="triton")
    assert torch.equal(got.neighbors, ref.neighbors) and got.symmetric == ref.symmetric
    assert int((got.neighbors >= 0).sum()) > 0
    empty = build_kernel_map(coords, out[:0], 11, kernel, stride, padding, in_sorted=sort, backend="triton")
    assert empty.neighbors.shape == (0, kernel ** 3)
    with pytest.raises(ValueError, match="backend"):
        build_kernel_map(coords, out, 11, kernel, stride, padding, backend="cuda")


def test_inverse_map_of_a_strided_map():
    coords = random_structure(8, 150, 2, 4)
    out = coords.clone()
    out[:, 1:] //= 2
    out = torch.unique(out, dim=0)
    kmap = build_kernel_map(coords, out, 8, 2, 2, 0, in_sorted=True)
    inv = kmap.inverse.long()
    i, v = torch.nonzero(inv >= 0, as_tuple=True)
    assert torch.equal(kmap.neighbors.long()[inv[i, v], v], i)
    assert int((inv >= 0).sum()) == coords.shape[0]  # every fine voxel has exactly one parent


def test_mismatched_channels_named():
    coords = random_structure(6, 50, 1, 0)
    kmap = build_kernel_map(coords, coords, 6)
    with pytest.raises(ValueError, match="channels"):
        sparse_conv(torch.randn(coords.shape[0], 4), torch.randn(27, 5, 3), kmap)
    with pytest.raises(ValueError, match="rows"):
        sparse_conv(torch.randn(coords.shape[0] + 1, 4), torch.randn(27, 4, 3), kmap)
    with pytest.raises(ValueError, match="backend"):
        sparse_conv(torch.randn(coords.shape[0], 4), torch.randn(27, 4, 3), kmap, backend="spconv")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("autotune", ["1", "0"])
def test_triton_half_precision_on_gpu(dtype, autotune, monkeypatch):
    monkeypatch.setenv("S2_CONV_AUTOTUNE", autotune)  # tuned and fixed launch shapes
    res, count, cin, cout, k, stride, pad = (32, 20000, 64, 64, 3, 1, 1)
    coords, out, x, w, dy, kmap = _case(res, count, cin, cout, k, stride, pad, 5, dtype, "cuda")
    xs = x.to("cuda", dtype).requires_grad_()
    ws = w.to("cuda", dtype).requires_grad_()
    y = sparse_conv_triton(xs, ws, kmap)
    y.backward(dy.to("cuda", dtype))
    xr, wr = x.cuda().requires_grad_(), w.cuda().requires_grad_()
    yr = sparse_conv_reference(xr, wr, kmap)
    yr.backward(dy.cuda())
    for got, want in ((y, yr), (xs.grad, xr.grad), (ws.grad, wr.grad)):
        err = (got.detach().double() - want.detach()).norm() / want.detach().norm()
        assert err < 1e-2, f"{dtype}: relative error {err:.2e}"


def torchsparse_conv(coords, x, kernel, bias, kernel_size, stride, out_coords):
    """torchsparse's conv written out voxel by voxel: output p, offset t reads input p·stride + d(t).

    Odd kernels: t = (dz·K + dy)·K + dx, d = (dx, dy, dz) − (K−1)/2 (x = column 1 fastest);
    even kernels: t = (dx·K + dy)·K + dz, d = (dx, dy, dz) (x slowest).
    """
    k = kernel_size
    row = {tuple(c): n for n, c in enumerate(coords.tolist())}
    out = torch.zeros(out_coords.shape[0], kernel.shape[2], dtype=x.dtype)
    for o, (b, px, py, pz) in enumerate(out_coords.tolist()):
        for t in range(k ** 3):
            if k % 2:
                dx, dy, dz = t % k - k // 2, t // k % k - k // 2, t // (k * k) - k // 2
            else:
                dx, dy, dz = t // (k * k), t // k % k, t % k
            n = row.get((b, px * stride + dx, py * stride + dy, pz * stride + dz))
            if n is not None:
                out[o] += x[n] @ kernel[t]
    return out + bias


@pytest.mark.parametrize("kernel_size", [3, 5])
def test_torchsparse_kernel_layout_submanifold(kernel_size):
    from model.sparse import SparseTensor
    from model.sparse.layers import SparseConv3d, kernel_from_torchsparse, kernel_to_torchsparse

    coords = random_structure(7, 260, 2, seed=kernel_size)
    g = torch.Generator().manual_seed(3)
    x = torch.randn(coords.shape[0], 4, generator=g, dtype=torch.float64)
    ts_kernel = torch.randn(kernel_size ** 3, 4, 6, generator=g, dtype=torch.float64)
    bias = torch.randn(6, generator=g, dtype=torch.float64)
    conv = SparseConv3d(4, 6, kernel_size).double()
    with torch.no_grad():
        conv.weight.copy_(kernel_from_torchsparse(ts_kernel))
        conv.bias.copy_(bias)
    got = conv(SparseTensor(coords, x, 7)).feats
    want = torchsparse_conv(coords, x, ts_kernel, bias, kernel_size, 1, coords)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert torch.equal(kernel_to_torchsparse(conv.weight.detach()), ts_kernel)
    # the layout is not symmetric: using the kernel unconverted gives another result
    with torch.no_grad():
        conv.weight.copy_(ts_kernel)
    assert not torch.allclose(conv(SparseTensor(coords, x, 7)).feats, want)


def test_torchsparse_kernel_layout_strided():
    from model.sparse import SparseTensor
    from model.sparse.layers import SparseConvDown, kernel_from_torchsparse

    coords = random_structure(8, 300, 2, seed=5)
    g = torch.Generator().manual_seed(4)
    x = torch.randn(coords.shape[0], 3, generator=g, dtype=torch.float64)
    ts_kernel = torch.randn(8, 3, 5, generator=g, dtype=torch.float64)
    bias = torch.randn(5, generator=g, dtype=torch.float64)
    conv = SparseConvDown(3, 5).double()
    with torch.no_grad():
        conv.weight.copy_(kernel_from_torchsparse(ts_kernel))
        conv.bias.copy_(bias)
    y = conv(SparseTensor(coords, x, 8))
    want = torchsparse_conv(coords, x, ts_kernel, bias, 2, 2, y.coords)
    torch.testing.assert_close(y.feats, want, rtol=1e-10, atol=1e-10)


def test_torchsparse_kernel_layout_rejects_non_cubes():
    from model.sparse.layers import kernel_from_torchsparse

    with pytest.raises(ValueError, match="not a cube"):
        kernel_from_torchsparse(torch.zeros(26, 2, 2))


def test_reference_sums_half_precision_in_float32():
    coords, out, x, w, _, kmap = _case(12, 500, 16, 32, 3, 1, 1, seed=7, dtype=torch.float64)
    xb, wb = x.bfloat16(), w.bfloat16()
    exact = sparse_conv_reference(xb.double(), wb.double(), kmap)
    got = sparse_conv_reference(xb, wb, kmap)
    assert got.dtype == torch.bfloat16
    # summing the 27 offsets in bfloat16 rounds once per offset; the reference rounds the products only
    nbr = kmap.neighbors.long()
    naive = torch.zeros(len(out), w.shape[2], dtype=torch.bfloat16)
    for v in range(27):
        ok = nbr[:, v] >= 0
        naive[ok] += xb[nbr[ok, v]] @ wb[v]
    err, naive_err = (got.double() - exact).abs().max(), (naive.double() - exact).abs().max()
    assert err < 0.6 * naive_err and err < 2 ** -7 * exact.abs().max()
