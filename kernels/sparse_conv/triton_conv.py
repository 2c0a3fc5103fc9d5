"""Sparse convolution as one fused gather–GEMM–scatter Triton kernel per pass.

Forward and input gradient are output-stationary: a program owns a tile of
output rows, walks the kernel offsets, gathers the matching input rows through
the kernel map and accumulates their product with the weight slice in
registers, so nothing but the output is written. The weight gradient reduces
x[nbr]ᵀ·dy over row chunks per offset and adds the partial sums atomically.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .kernel_map import KernelMap


@triton.jit
def _gather_gemm_kernel(
    x_ptr, w_ptr, nbr_ptr, out_ptr,
    M, CIN, COUT, V, stride_nm, stride_nv,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr, SKIP_EMPTY: tl.constexpr = True,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < M
    col_ok = cols < COUT
    rows64 = rows.to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for v in range(V):
        idx = tl.load(nbr_ptr + rows64 * stride_nm + v * stride_nv, mask=row_ok, other=-1)
        # a tile of sorted outputs often has no neighbour at an offset: skip its GEMM
        if (not SKIP_EMPTY) or tl.max(idx, axis=0) >= 0:
            ok = idx >= 0
            idx64 = idx.to(tl.int64)
            for c0 in range(0, CIN, BLOCK_K):
                ck = c0 + tl.arange(0, BLOCK_K)
                ck_ok = ck < CIN
                a = tl.load(x_ptr + idx64[:, None] * CIN + ck[None, :],
                            mask=ok[:, None] & ck_ok[None, :], other=0.0)
                b = tl.load(w_ptr + (v * CIN + ck[:, None]).to(tl.int64) * COUT + cols[None, :],
                            mask=ck_ok[:, None] & col_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=PRECISION)
    tl.store(out_ptr + rows64[:, None] * COUT + cols[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def _weight_grad_kernel(
    x_ptr, dy_ptr, nbr_ptr, dw_ptr,
    M, CIN, COUT, stride_nm, stride_nv, ROWS_PER_PROG,
    BLOCK_M: tl.constexpr, BLOCK_CI: tl.constexpr, BLOCK_CO: tl.constexpr,
    PRECISION: tl.constexpr,
):
    v = tl.program_id(0)
    pid_c = tl.program_id(1)
    split = tl.program_id(2)
    n_co = tl.cdiv(COUT, BLOCK_CO)
    ci = (pid_c // n_co) * BLOCK_CI + tl.arange(0, BLOCK_CI)
    co = (pid_c % n_co) * BLOCK_CO + tl.arange(0, BLOCK_CO)
    ci_ok = ci < CIN
    co_ok = co < COUT
    start = split * ROWS_PER_PROG
    end = tl.minimum(start + ROWS_PER_PROG, M)
    acc = tl.zeros((BLOCK_CI, BLOCK_CO), dtype=tl.float32)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rows64 = rows.to(tl.int64)
        idx = tl.load(nbr_ptr + rows64 * stride_nm + v * stride_nv, mask=rows < end, other=-1)
        ok = idx >= 0
        a = tl.load(x_ptr + idx.to(tl.int64)[:, None] * CIN + ci[None, :],
                    mask=ok[:, None] & ci_ok[None, :], other=0.0)
        g = tl.load(dy_ptr + rows64[:, None] * COUT + co[None, :],
                    mask=ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(tl.trans(a), g, acc, input_precision=PRECISION)
    tl.atomic_add(dw_ptr + (v * CIN + ci[:, None]).to(tl.int64) * COUT + co[None, :], acc,
                  mask=ci_ok[:, None] & co_ok[None, :])


def _fwd_configs():
    out = []
    for bm in (64, 128):
        for bn in (32, 64, 128):
            for bk in (32, 64):
                for warps, stages in ((4, 2), (4, 3), (8, 3)):
                    out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=warps, num_stages=stages))
    return out


def _prune_fwd(configs, named_args, **kwargs):
    # one tile width per channel count (wider tiles only add masked work); the tuner picks rows, warps, stages
    cout, cin = named_args["COUT"], named_args["CIN"]
    bn = min(128, max(32, triton.next_power_of_2(cout)))
    bk = min(64, max(32, triton.next_power_of_2(cin)))
    keep = [c for c in configs if c.kwargs["BLOCK_N"] == bn and c.kwargs["BLOCK_K"] == bk]
    return keep or configs[:1]


def _wgrad_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_CI": bc, "BLOCK_CO": bo}, num_warps=w, num_stages=s)
            for bm in (64, 128) for bc, bo in ((32, 32), (64, 64)) for w, s in ((4, 2), (8, 3))]


# on the GPU the block shapes are tuned once per channel pair; the interpreter runs one fixed shape
_gather_gemm_tuned = triton.autotune(_fwd_configs(), key=["CIN", "COUT"], prune_configs_by={"early_config_prune": _prune_fwd})(_gather_gemm_kernel)
_weight_grad_tuned = triton.autotune(_wgrad_configs(), key=["CIN", "COUT"], reset_to_zero=["dw_ptr"])(_weight_grad_kernel)

_ROW_QUANTUM = 128  # rows per weight-gradient program are a multiple of every BLOCK_M tried


def autotune_enabled() -> bool:
    """Whether GPU launches tune their block shapes (S2_CONV_AUTOTUNE, default on).

    Tuning compiles every candidate once per (Cin, Cout, dtype): for a paper-size VAE that is a few
    hundred compilations, minutes before the first training step. ``S2_CONV_AUTOTUNE=0`` launches
    one fixed shape per channel pair instead (no tuning, one compilation each)."""
    return os.environ.get("S2_CONV_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def _pow2_block(n: int, lo: int, hi: int) -> int:
    return max(lo, min(hi, triton.next_power_of_2(int(n))))


def _precision(dtype: torch.dtype) -> str:
    # float32 stays exact (the tests compare with conv3d); half types use the tensor cores
    return "ieee" if dtype == torch.float32 else "tf32"


def gather_gemm(x: torch.Tensor, weight: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """out[o] = Σ_v x[neighbors[o, v]] @ weight[v] (rows with -1 skipped); weight (V, Cin, Cout)."""
    x = x.contiguous()
    weight = weight.to(x.dtype).contiguous()
    m, vol = neighbors.shape
    cin, cout = weight.shape[1], weight.shape[2]
    out = torch.empty((m, cout), dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    if x.is_cuda and autotune_enabled():
        grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(cout, meta["BLOCK_N"]))  # noqa: E731
        _gather_gemm_tuned[grid](x, weight, neighbors, out, m, cin, cout, vol, neighbors.stride(0),
                                 neighbors.stride(1), PRECISION=_precision(x.dtype))
        return out
    block_m = 64 if cin >= 128 else 128
    # the GPU's fixed shape is the one the tuner's pruning keeps (tile widths of at least 32)
    lo = 32 if x.is_cuda else 16
    block_n = _pow2_block(cout, lo, 128)
    block_k = _pow2_block(cin, lo, 64)
    grid = (triton.cdiv(m, block_m), triton.cdiv(cout, block_n))
    _gather_gemm_kernel[grid](
        x, weight, neighbors, out, m, cin, cout, vol, neighbors.stride(0), neighbors.stride(1),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, PRECISION=_precision(x.dtype),
        num_warps=4 if block_n * block_m <= 8192 else 8, num_stages=3 if x.is_cuda else 2,
    )
    return out


def weight_grad(x: torch.Tensor, dy: torch.Tensor, neighbors: torch.Tensor) -> torch.Tensor:
    """dW[v] = Σ_o x[neighbors[o, v]]ᵀ dy[o], in float32, shape (V, Cin, Cout)."""
    x = x.contiguous()
    dy = dy.to(x.dtype).contiguous()
    m, vol = neighbors.shape
    cin, cout = x.shape[1], dy.shape[1]
    dw = torch.zeros((vol, cin, cout), dtype=torch.float32, device=x.device)
    if m == 0:
        return dw
    # enough programs to fill the GPU, each reducing a contiguous run of rows
    target = 2048 if x.is_cuda else 4
    splits = max(1, min(triton.cdiv(m, _ROW_QUANTUM), target // max(1, vol)))
    rows_per_prog = triton.cdiv(triton.cdiv(m, splits), _ROW_QUANTUM) * _ROW_QUANTUM
    splits = triton.cdiv(m, rows_per_prog)
    if x.is_cuda and autotune_enabled():
        grid = lambda meta: (vol, triton.cdiv(cin, meta["BLOCK_CI"]) * triton.cdiv(cout, meta["BLOCK_CO"]), splits)  # noqa: E731
        _weight_grad_tuned[grid](x, dy, neighbors, dw, m, cin, cout, neighbors.stride(0), neighbors.stride(1),
                                 rows_per_prog, PRECISION=_precision(x.dtype))
        return dw
    block_m = 64
    lo = 32 if x.is_cuda else 16
    block_ci = _pow2_block(cin, lo, 64)
    block_co = _pow2_block(cout, lo, 64)
    tiles = triton.cdiv(cin, block_ci) * triton.cdiv(cout, block_co)
    _weight_grad_kernel[(vol, tiles, splits)](
        x, dy, neighbors, dw, m, cin, cout, neighbors.stride(0), neighbors.stride(1), rows_per_prog,
        BLOCK_M=block_m, BLOCK_CI=block_ci, BLOCK_CO=block_co, PRECISION=_precision(x.dtype),
        num_warps=4, num_stages=2,
    )
    return dw


class SparseConvFunction(torch.autograd.Function):
    """Autograd wrapper: forward and both gradients through the Triton kernels."""

    @staticmethod
    def forward(ctx, x, weight, kmap: KernelMap):
        ctx.save_for_backward(x, weight)
        ctx.kmap = kmap
        return gather_gemm(x, weight, kmap.neighbors)

    @staticmethod
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        kmap: KernelMap = ctx.kmap
        dy = dy.contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            dx = gather_gemm(dy.to(x.dtype), weight.transpose(1, 2), kmap.inverse)
        if ctx.needs_input_grad[1]:
            dw = weight_grad(x, dy, kmap.neighbors).to(weight.dtype)
        return dx, dw, None


def sparse_conv_triton(x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """Triton sparse convolution; x (N, Cin), weight (V, Cin, Cout) -> (M, Cout)."""
    return SparseConvFunction.apply(x, weight, kmap)
