"""Sparse convolution as one gather and one GEMM per block of rows: the CPU path.

The reference (reference.py) runs one gather, one small GEMM and one out-of-place ``index_add`` per kernel
offset, and autograd's backward the same again: on a CPU at the SS-VAE's 64³ level that is 27 copies of the
output a convolution and most of a training step. Here each block of output rows gathers all of its
neighbours at once, missing ones reading an appended zero row, into a (rows, V·C_in) matrix that meets the
weight as one (V·C_in, C_out) GEMM. The backward needs no scatter: the weight gradient is the same gathered
matrix against the output gradient, and the input gradient gathers the output gradient through the map seen
from the inputs (``KernelMap.inverse``) against the transposed weight. Blocks keep each gathered matrix
near ``BLOCK_BYTES``, so memory stays a few times the features whatever the kernel volume.

Half-precision inputs are computed in float32 and the result cast back, as the reference does. ``GEMM_DTYPE``
bfloat16 instead multiplies bfloat16 operands (float32 accumulation inside the GEMM, outputs rounded to bfloat16,
weight gradients summed over blocks in float32): on a CPU with AMX that made the demo's SS-VAE step 1.35-1.5x
faster, and bfloat16 GEMMs ran about 3x float32's on an AMD EPYC with AVX-512 BF16 (docs/vae.md).
``cpu_bf16_gemm`` names the instructions this CPU has for them; ``gemm_dtype('auto')`` asks it.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .kernel_map import KernelMap, padded_index

BLOCK_BYTES = 32 << 20  # one gathered (rows, V·C) block
# The GEMMs' operand type: None computes in float32 (the reference's sums); torch.bfloat16 as described above
# (a trainer sets it for its process: TrainConfig.cpu_conv_precision).
GEMM_DTYPE: torch.dtype | None = None


def gemm_dtype(precision: str, setting: str = "cpu_conv_precision") -> torch.dtype | None:
    """``GEMM_DTYPE`` for ``TrainConfig.cpu_conv_precision`` (or the DiTs' ``cpu_dit_precision``, named by
    ``setting``): 'fp32' None, 'bf16' bfloat16, 'auto' bfloat16 where this process's CPU multiplies bfloat16
    natively (``cpu_bf16_gemm``; decided on the machine that runs the GEMMs, not on the one submitting)."""
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"{setting}: expected fp32, bf16 or auto, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and cpu_bf16_gemm()) else None


BF16_GEMM_FLAGS = ("amx_bf16", "avx512_bf16")  # in the order named: AMX tiles first


def cpu_bf16_gemm() -> str:
    """The instructions this CPU multiplies bfloat16 matrices with, as /proc/cpuinfo names them (Linux):
    ``amx_bf16`` (AMX tiles, Xeon since Sapphire Rapids) or ``avx512_bf16`` (AVX-512 dot products, AMD Zen 4 and
    Xeon Cooper Lake); '' where it has neither. Without them bfloat16 GEMMs are emulated, no faster than float32
    ones or slower; with either, oneDNN's bfloat16 GEMMs beat float32 at the convolutions' shapes (docs/vae.md)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((set(line.split(":", 1)[1].split()) for line in f if line.startswith("flags")), set())
    except OSError:
        return ""
    return next((name for name in BF16_GEMM_FLAGS if name in flags), "")


def _gather_gemm(src: torch.Tensor, idx: torch.Tensor, w2: torch.Tensor, out: torch.Tensor) -> None:
    """out[r] = src[idx[r]].flatten() @ w2 for every row r, in blocks of rows; src ends with its zero row."""
    width = idx.shape[1] * src.shape[1]
    step = max(1, BLOCK_BYTES // max(1, width * src.element_size()))
    for lo in range(0, idx.shape[0], step):
        hi = min(lo + step, idx.shape[0])
        torch.mm(_gather(src, idx[lo:hi]), w2, out=out[lo:hi])


def _gather(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """(rows, V·C): row r is src[idx[r, 0]], ..., src[idx[r, V − 1]] side by side (index_select on the flat
    index: about 1.7× advanced indexing on a CPU)."""
    return src.index_select(0, idx.reshape(-1)).reshape(idx.shape[0], idx.shape[1] * src.shape[1])


def _with_zero_row(t: torch.Tensor) -> torch.Tensor:
    return torch.cat([t, t.new_zeros((1, t.shape[1]))])


class _GatherGemmConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, kmap: KernelMap):
        op = GEMM_DTYPE or torch.promote_types(x.dtype, torch.float32)
        xf, wf = x.to(op), weight.to(op)
        volume, cin, cout = wf.shape
        idx = padded_index(kmap)
        out = torch.empty((kmap.num_outputs, cout), dtype=op, device=x.device)
        _gather_gemm(_with_zero_row(xf), idx, wf.reshape(volume * cin, cout), out)
        ctx.save_for_backward(x, weight)
        ctx.kmap = kmap
        return out.to(x.dtype)

    @staticmethod
    @once_differentiable  # a second derivative would need the gathers' own backward: an error, not a wrong value
    def backward(ctx, dy):
        x, weight = ctx.saved_tensors
        kmap = ctx.kmap
        acc = torch.promote_types(x.dtype, torch.float32)
        op = GEMM_DTYPE or acc
        wf, dyf = weight.to(op), dy.to(op)
        volume, cin, cout = wf.shape
        dx = dw = None
        if ctx.needs_input_grad[0]:
            inv = padded_index(kmap, inverse=True)
            # dx[i] = Σ_v dy[inverse[i, v]] @ weight[v]^T: rows of (v, c_out) against weight as (V·C_out, C_in)
            w2t = wf.transpose(1, 2).reshape(volume * cout, cin)
            dxf = torch.empty((x.shape[0], cin), dtype=op, device=x.device)
            _gather_gemm(_with_zero_row(dyf), inv, w2t, dxf)
            dx = dxf.to(x.dtype)
        if ctx.needs_input_grad[1]:
            idx = padded_index(kmap)
            xp = _with_zero_row(x.to(op))
            width = volume * cin
            # accumulated as (C_out, V·C_in) = dy^T @ gathered: the gathered block stays row-major for the GEMM
            # (its transpose as the left operand took twice as long on a CPU)
            dwt = torch.zeros((cout, width), dtype=acc, device=x.device)
            step = max(1, BLOCK_BYTES // max(1, width * xp.element_size()))
            for lo in range(0, idx.shape[0], step):
                hi = min(lo + step, idx.shape[0])
                if op == acc:
                    dwt.addmm_(dyf[lo:hi].t(), _gather(xp, idx[lo:hi]))
                else:  # each block's product in the operand type, their sum in float32
                    dwt += torch.mm(dyf[lo:hi].t(), _gather(xp, idx[lo:hi]))
            dw = dwt.t().reshape(volume, cin, cout).to(weight.dtype)
        return dx, dw, None


def sparse_conv_gather_gemm(x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """out[o] = Σ_v x[kmap.neighbors[o, v]] @ weight[v]; x (N, Cin), weight (V, Cin, Cout) -> (M, Cout).

    What ``sparse_conv_reference`` computes, by blocks of whole-neighbourhood GEMMs; differentiable in x and
    weight."""
    return _GatherGemmConv.apply(x, weight, kmap)
