"""Triton GroupNorm (+ SiLU): split statistics, then one fused normalise-scale-shift-activate pass.

Layout: x (N, C, S) contiguous with S the flattened spatial extent, so group g of sample n is one contiguous
run of (C / G)·S elements. Pass 1, grid (N·G, SPLIT): each program reduces its share of a run in tiles,
merging each tile's (count, mean, M2) into its own by Chan's formula (no E[x²] − E[x]² cancellation).
The SPLIT partial results of a run are merged the same way in PyTorch (tiny tensors, no host sync).
Pass 2, grid (N·C, ⌈S / BLOCK⌉): y = (x − mean)·rstd·w[c] + b[c], SiLU, stored in x's dtype.
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl


@triton.jit
def _stats_kernel(X, CNT, MEAN, M2, L, CHUNK, SPLIT, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    start = part * CHUNK
    end = tl.minimum(start + CHUNK, L)
    base = X + row * L
    n_acc = tl.full([], 0.0, tl.float32)
    mean_acc = tl.full([], 0.0, tl.float32)
    m2_acc = tl.full([], 0.0, tl.float32)
    for t0 in range(start, end, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        ok = offs < end
        v = tl.load(base + offs, mask=ok, other=0.0).to(tl.float32)
        nb = tl.sum(ok.to(tl.float32), 0)
        mb = tl.sum(v, 0) / tl.maximum(nb, 1.0)
        dv = tl.where(ok, v - mb, 0.0)
        m2b = tl.sum(dv * dv, 0)
        n_new = n_acc + nb
        delta = mb - mean_acc
        mean_acc = mean_acc + delta * (nb / tl.maximum(n_new, 1.0))
        m2_acc = m2_acc + m2b + delta * delta * (n_acc * nb / tl.maximum(n_new, 1.0))
        n_acc = n_new
    out = row * SPLIT + part
    tl.store(CNT + out, n_acc)
    tl.store(MEAN + out, mean_acc)
    tl.store(M2 + out, m2_acc)


@triton.jit
def _apply_kernel(X, Y, MEAN, RSTD, W, B, C, CPG, S, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
                  SILU: tl.constexpr, BLOCK: tl.constexpr):
    nc = tl.program_id(0)
    blk = tl.program_id(1)
    c = nc % C
    grp = nc // CPG  # (n · C + c) // (C / G) = n · G + g
    mean = tl.load(MEAN + grp)
    rstd = tl.load(RSTD + grp)
    scale = rstd
    shift = -mean * rstd
    if HAS_W:
        w = tl.load(W + c).to(tl.float32)
        scale = scale * w
        shift = shift * w
    if HAS_B:
        shift = shift + tl.load(B + c).to(tl.float32)
    offs = blk * BLOCK + tl.arange(0, BLOCK)
    ok = offs < S
    base = nc.to(tl.int64) * S
    v = tl.load(X + base + offs, mask=ok, other=0.0).to(tl.float32)
    y = v * scale + shift
    if SILU:
        y = y / (1.0 + tl.exp(-y))
    tl.store(Y + base + offs, y.to(Y.dtype.element_ty), mask=ok)


@functools.lru_cache(maxsize=None)
def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 8


def _split(rows: int, length: int, block: int, device: torch.device) -> int:
    """Programs per run: enough for ~4 waves over the SMs, each reducing at least 8 tiles."""
    sms = _sm_count(device)
    want = max(1, (4 * sms + rows - 1) // rows)
    return max(1, min(want, triton.cdiv(length, 8 * block)))


def group_stats(x: torch.Tensor, groups: int, eps: float, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 mean and 1 / sqrt(var + eps) of each (sample, group) of contiguous x, each of shape (N · G,)."""
    n = x.shape[0]
    rows = n * groups
    length = x.numel() // max(rows, 1)
    split = _split(rows, length, block, x.device)
    chunk = triton.cdiv(triton.cdiv(length, split), block) * block
    split = triton.cdiv(length, chunk) if length else 1
    cnt, mean, m2 = (torch.empty(rows, split, device=x.device, dtype=torch.float32) for _ in range(3))
    _stats_kernel[(rows, split)](x, cnt, mean, m2, length, chunk, split, BLOCK=block, num_warps=4)
    total = cnt.sum(1, keepdim=True)
    gmean = (cnt * mean).sum(1, keepdim=True) / total.clamp_min(1.0)
    gm2 = (m2 + cnt * (mean - gmean) ** 2).sum(1)
    var = gm2 / total.squeeze(1).clamp_min(1.0)
    return gmean.squeeze(1), torch.rsqrt(var + eps)


def group_norm_act_triton(x: torch.Tensor, groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          eps: float = 1e-5, silu: bool = False, block: int = 1024) -> torch.Tensor:
    x = x.contiguous()
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(n * c, 1)
    y = torch.empty_like(x)
    if x.numel() == 0:
        return y
    mean, rstd = group_stats(x, groups, eps)
    w = weight.contiguous() if weight is not None else mean  # a placeholder pointer when absent
    b = bias.contiguous() if bias is not None else mean
    _apply_kernel[(n * c, triton.cdiv(s, block))](x, y, mean, rstd, w, b, c, c // groups, s,
                                                    HAS_W=weight is not None, HAS_B=bias is not None,
                                                    SILU=silu, BLOCK=block, num_warps=4)
    return y
