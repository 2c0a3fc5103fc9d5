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
faster (docs/vae.md). ``cpu_has_amx`` says whether this CPU has it; ``gemm_dtype('auto')`` asks it.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from .kernel_map import KernelMap, padded_index

BLOCK_BYTES = 32 << 20  # one gathered (rows, V·C) block
# The GEMMs' operand type: None computes in float32 (the reference's sums); torch.bfloat16 as described above
# (a trainer sets it for its process: TrainConfig.cpu_conv_precision).
GEMM_DTYPE: torch.dtype | None = None


def gemm_dtype(precision: str) -> torch.dtype | None:
    """``GEMM_DTYPE`` for ``TrainConfig.cpu_conv_precision``: 'fp32' None, 'bf16' bfloat16, 'auto' bfloat16 where
    this process's CPU has AMX (decided on the machine that runs the convolutions, not on the one submitting)."""
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"cpu_conv_precision: expected fp32, bf16 or auto, got {precision!r}")
    return torch.bfloat16 if precision == "bf16" or (precision == "auto" and cpu_has_amx()) else None


def cpu_has_amx() -> bool:
    """This CPU multiplies bfloat16 matrices in AMX tiles (Linux: the ``amx_bf16`` flag of /proc/cpuinfo). Without
    it bfloat16 GEMMs run no faster than float32 ones, or slower."""
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and " amx_bf16" in line for line in f)
    except OSError:
        return False


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
