"""Triton norm_modulate: a program normalises BLOCK_M rows of W values (W ≤ BLOCK_W, one tile a row) in
float32 and applies its row of (a, c): y = (x − mean)·rstd·a[r] + c[r], stored in x's dtype."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _norm_modulate_kernel(X, A, C, ROWS, Y, N, W, sx, sy, sa, eps,
                          HAS_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr):
    m = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    k = tl.arange(0, BLOCK_W)
    mok = m < N
    kok = k < W
    ok = mok[:, None] & kok[None, :]
    x = tl.load(X + m[:, None] * sx + k[None, :], mask=ok, other=0.0).to(tl.float32)
    mean = tl.sum(x, 1) / W
    d = tl.where(ok, x - mean[:, None], 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(d * d, 1) / W + eps)
    if HAS_ROWS:
        r = tl.load(ROWS + m, mask=mok, other=0).to(tl.int64)
    else:
        r = tl.zeros([BLOCK_M], dtype=tl.int64)
    a = tl.load(A + r[:, None] * sa + k[None, :], mask=ok, other=0.0).to(tl.float32)
    c = tl.load(C + r[:, None] * sa + k[None, :], mask=ok, other=0.0).to(tl.float32)
    y = d * rstd[:, None] * a + c
    tl.store(Y + m[:, None] * sy + k[None, :], y.to(Y.dtype.element_ty), mask=ok)


def norm_modulate_triton(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, rows: torch.Tensor | None,
                         eps: float) -> torch.Tensor:
    n, w = x.shape
    x = x if x.stride(1) == 1 else x.contiguous()
    a, c = a.contiguous(), c.contiguous()
    y = torch.empty_like(x, memory_format=torch.contiguous_format)
    if n == 0:
        return y
    block_w = triton.next_power_of_2(w)
    # about 16 float32 values a thread for each of x, a and c (three tiles live at once): no spills
    block_m = max(1, min(16, 4096 // block_w))
    rows_arg = rows.contiguous() if rows is not None else a  # a placeholder pointer when there are no rows
    _norm_modulate_kernel[(triton.cdiv(n, block_m),)](
        x, a, c, rows_arg, y, n, w, x.stride(0), y.stride(0), a.stride(0), eps,
        HAS_ROWS=rows is not None, BLOCK_M=block_m, BLOCK_W=block_w, num_warps=4 if block_w < 1024 else 8)
    return y
