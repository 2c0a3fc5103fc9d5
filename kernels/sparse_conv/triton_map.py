"""Kernel-map lookup in one Triton launch: every (output voxel, kernel offset) pair binary-searches the
sorted input keys directly, with no per-offset query tensors (the PyTorch path builds 27 of them).

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
    v = tl.program_id(1)
    rows = pid * BLOCK + tl.arange(0, BLOCK)
    live = rows < M
    b = tl.load(OUT + rows * 4 + 0, mask=live, other=0).to(tl.int64)
    qi = tl.load(OUT + rows * 4 + 1, mask=live, other=0).to(tl.int64) * STRIDE + (v // (K * K) - PAD)
    qj = tl.load(OUT + rows * 4 + 2, mask=live, other=0).to(tl.int64) * STRIDE + ((v // K) % K - PAD)
    qk = tl.load(OUT + rows * 4 + 3, mask=live, other=0).to(tl.int64) * STRIDE + (v % K - PAD)
    inside = live & (qi >= 0) & (qi < R) & (qj >= 0) & (qj < R) & (qk >= 0) & (qk < R)
    key = ((b * R + qi) * R + qj) * R + qk
    lo = tl.zeros([BLOCK], tl.int64)
    hi = tl.zeros([BLOCK], tl.int64) + N
    for _ in range(STEPS):  # lower bound: first index whose key is >= the query
        open_ = lo < hi
        mid = (lo + hi) // 2
        km = tl.load(KEYS + mid, mask=open_ & inside, other=0)
        go_right = km < key
        lo = tl.where(open_ & go_right, mid + 1, lo)
        hi = tl.where(open_ & ~go_right, mid, hi)
    found = inside & (lo < N)
    hit = found & (tl.load(KEYS + lo, mask=found, other=-1) == key)
    if HAS_ORDER:
        idx = tl.load(ORDER + lo, mask=hit, other=-1)
    else:
        idx = lo
    tl.store(NBR + rows * V + v, tl.where(hit, idx, -1).to(tl.int32), mask=live)


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
    _lookup_kernel[(triton.cdiv(m, block), v)](
        sorted_keys.contiguous(), order if order is not None else sorted_keys, out, nbr, m, n, int(resolution),
        int(stride), int(padding), K=kernel_size, V=v, STEPS=steps, HAS_ORDER=order is not None, BLOCK=block)
    return nbr
