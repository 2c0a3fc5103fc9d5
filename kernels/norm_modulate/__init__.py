"""LayerNorm over the last dimension followed by a per-shape affine map, in one pass: the DiT blocks' norms.

``norm_modulate_segments(x, a, c, offsets, eps, out_dtype)`` returns ``LN(x) · a[s] + c[s]`` on the rows
``offsets[s]:offsets[s + 1]`` of shape s (the DiT's packed shapes are contiguous; ``offsets`` is a host list),
with the normalisation (no affine of its own) in float32. ``a`` and ``c`` are (S, W), or (1, W) for every
shape. The adaLN blocks use it with a = 1 + scale and c = shift of each shape (``modulate(norm(x), shift,
scale)``), the cross-attention's affine norm with a = weight and c = bias. Differentiable in x, a and c.

Why a kernel: the PyTorch path (``LayerNorm32`` then ``modulate``) copies x to float32, normalises, casts
back, gathers the shapes' modulation to every token (N × 2W values when a batch holds several shapes: the
guided batch always does) and multiplies and adds in separate passes: about ten passes over N × W values.
Here a program owns up to 64 rows of one shape, loads that shape's (a, c) once, and reads and writes each
row once; the result is rounded once, at the end (the PyTorch path rounds after the norm and after each
operation), so the two differ at that dtype's rounding. The backward writes dx and one partial row of
da = Σ dy·x̂ and dc = Σ dy a program, summed per shape afterwards in a fixed order (no atomics); it saves the
rows' mean and 1/std (8 bytes a row) instead of the float32 normalised copy PyTorch keeps for the multiply's
backward. ``out_dtype`` (default x's) lets the result be stored in the dtype its consumer casts it to anyway
(autocast's bf16 for the linear layers that follow every norm), which removes that cast. The Triton path on
CUDA tensors (or with TRITON_INTERPRET=1 and backend="triton"), the reference otherwise.

``gated_residual_segments(x, h, g, offsets)`` is the blocks' gated residual ``x + h · g[s]`` the same way: each
program reads its shape's gate row once, where the PyTorch path gathers the gate to every token first (N × W
values written and read again when a batch holds several shapes) and its backward multiplies, casts and
reduces in separate passes. The backward here is one kernel: dh = dy · g[s] and a partial row of
dg = Σ dy · h a program (dx is dy).
"""
from __future__ import annotations

import torch

from kernels.backend import use_triton
from kernels.norm_modulate.reference import (check_offsets, gated_residual_segments_reference,
                                             norm_modulate_segments_reference)

__all__ = ["norm_modulate_segments", "norm_modulate_segments_reference", "gated_residual_segments",
           "gated_residual_segments_reference"]


def norm_modulate_segments(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, offsets, eps: float = 1e-6,
                           out_dtype: torch.dtype | None = None, backend: str = "auto") -> torch.Tensor:
    """LN(x) · a[s] + c[s] on the rows offsets[s]:offsets[s + 1] (a, c with one row per shape, or one row for
    all), rounded once to ``out_dtype`` (default x's); differentiable in x, a and c."""
    check_offsets(x, {"a": a, "c": c}, offsets)
    out_dtype = out_dtype or x.dtype
    if use_triton(x, backend, "norm-modulate"):
        return _NormModulateSegments.apply(x, a, c, tuple(int(o) for o in offsets), eps, out_dtype)
    return norm_modulate_segments_reference(x, a, c, offsets, eps, out_dtype)


class _NormModulateSegments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, a, c, offsets, eps, out_dtype):
        from kernels.norm_modulate.triton_kernel import seg_forward

        x = x if x.stride(1) == 1 else x.contiguous()
        a, c = a.contiguous(), c.contiguous()
        y, mean, rstd = seg_forward(x, a, c, offsets, eps, out_dtype)
        ctx.save_for_backward(x, a, mean, rstd)
        ctx.offsets, ctx.c_dtype = offsets, c.dtype
        return y

    @staticmethod
    def backward(ctx, dy):
        from kernels.norm_modulate.triton_kernel import seg_backward

        x, a, mean, rstd = ctx.saved_tensors
        dx, da, dc = seg_backward(x, dy, a, mean, rstd, ctx.offsets)
        return dx, da.to(a.dtype), dc.to(ctx.c_dtype), None, None, None


def gated_residual_segments(x: torch.Tensor, h: torch.Tensor, g: torch.Tensor, offsets,
                            backend: str = "auto") -> torch.Tensor:
    """x + h · g[s] on the rows offsets[s]:offsets[s + 1] (g with one row per shape, or one row for all), in
    the dtype ``torch.addcmul`` would give; differentiable in x, h and g."""
    check_offsets(x, {"g": g}, offsets, "gated_residual_segments")
    if h.shape != x.shape:
        raise ValueError(f"gated_residual_segments: h {tuple(h.shape)} must match x {tuple(x.shape)}")
    if use_triton(x, backend, "gated-residual"):
        return _GatedResidualSegments.apply(x, h, g, tuple(int(o) for o in offsets))
    return gated_residual_segments_reference(x, h, g, offsets)


class _GatedResidualSegments(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, h, g, offsets):
        from kernels.norm_modulate.triton_kernel import gr_forward

        x = x if x.stride(1) == 1 else x.contiguous()
        h = h if h.stride(1) == 1 else h.contiguous()
        g = g.contiguous()
        out_dtype = torch.promote_types(torch.promote_types(x.dtype, h.dtype), g.dtype)
        ctx.save_for_backward(h, g)
        ctx.offsets, ctx.x_dtype = offsets, x.dtype
        return gr_forward(x, h, g, offsets, out_dtype)

    @staticmethod
    def backward(ctx, dy):
        from kernels.norm_modulate.triton_kernel import gr_backward

        h, g = ctx.saved_tensors
        dh, dg = gr_backward(dy, h, g, ctx.offsets)
        return dy.to(ctx.x_dtype), dh, dg.to(g.dtype), None
