"""Kernel-map lookup in one Triton launch, with no per-offset query tensors (the PyTorch path builds 27).

A program binary-searches one *column* of the kernel (fixed di, dj) per output voxel: the K offsets
along k of a column are consecutive keys, so after one lower-bound search for the column's first key
the K neighbours are found by stepping through the sorted keys (the lower bound of key t + 1 is the
lower bound of t, plus one if t is present). K² searches per voxel instead of K³: 9 instead of 27 for
a 3×3×3 kernel.

Same result as the PyTorch loop in ``kernel_map.build_kernel_map``, which stays the reference and the
CPU path."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _lookup_kernel(KEYS, ORDER, OUT, NBR, M, N, R, STRIDE, PAD,
                   K: tl.constexpr, V: tl.constexpr, STEPS: tl.constexpr, HAS_ORDER: tl.constexpr,
                   BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    col = tl.program_id(1)  # (di, dj) of the kernel; the K offsets along k are walked below
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    live = rows < M
    b = tl.load(OUT + rows * 4 + 0, mask=live, other=0).to(tl.int64)
    qi = tl.load(OUT + rows * 4 + 1, mask=live, other=0).to(tl.int64) * STRIDE + (col // K - PAD)
    qj = tl.load(OUT + rows * 4 + 2, mask=live, other=0).to(tl.int64) * STRIDE + (col % K - PAD)
    qk0 = tl.load(OUT + rows * 4 + 3, mask=live, other=0).to(tl.int64) * STRIDE - PAD
    in_col = live & (qi >= 0) & (qi < R) & (qj >= 0) & (qj < R) & (qk0 + K > 0) & (qk0 < R)
    base = ((b * R + qi) * R + qj) * R
    start = base + tl.maximum(qk0, 0)  # keys of the column with k < 0 do not exist
    lo = tl.zeros([BLOCK], tl.int64)
    hi = tl.zeros([BLOCK], tl.int64) + N
    for _ in range(STEPS):  # lower bound: first index whose key is >= the column's first key
        open_ = lo < hi
        mid = (lo + hi) // 2
        km = tl.load(KEYS + mid, mask=open_ & in_col, other=0)
        go_right = km < start
        lo = tl.where(open_ & go_right, mid + 1, lo)
        hi = tl.where(open_ & ~go_right, mid, hi)
    pos = lo
    for dk in range(K):
        qk = qk0 + dk
        inside = in_col & (qk >= 0) & (qk < R)
        found = inside & (pos < N)
        hit = found & (tl.load(KEYS + pos, mask=found, other=-1) == base + qk)
        if HAS_ORDER:
            idx = tl.load(ORDER + pos, mask=hit, other=-1)
        else:
            idx = pos
        tl.store(NBR + rows * V + col * K + dk, tl.where(hit, idx, -1).to(tl.int32), mask=live)
        pos = tl.where(hit, pos + 1, pos)


def lookup(sorted_keys: torch.Tensor, order: torch.Tensor | None, out_coords: torch.Tensor, resolution: int,
           kernel_size: int, stride: int, padding: int) -> torch.Tensor:
    """(M, K³) int32 neighbour rows of ``out_coords`` (M, 4) among inputs with ``sorted_keys`` (N,) int64."""
    m, n, v = out_coords.shape[0], sorted_keys.numel(), kernel_size ** 3
    nbr = torch.empty((m, v), dtype=torch.int32, device=out_coords.device)
    if m == 0:
        return nbr
    out = out_coords.to(torch.int32).contiguous()
    steps = max(1, int(n).bit_length())  # ceil(log2(n + 1)) halvings close every search
    block = 256
    _lookup_kernel[(triton.cdiv(m, block), kernel_size * kernel_size)](
        sorted_keys.contiguous(), order if order is not None else sorted_keys, out, nbr, m, n, int(resolution),
        int(stride), int(padding), K=kernel_size, V=v, STEPS=steps, HAS_ORDER=order is not None, BLOCK=block)
    return nbr
