"""LayerNorm over the last dimension followed by a per-shape affine map, in one pass: the DiT blocks' norms.

``norm_modulate(x, a, c, rows, eps)`` returns ``LN(x) * a[rows] + c[rows]`` in x's dtype, with the
normalisation (no affine of its own) in float32. ``a`` and ``c`` are (R, W); ``rows`` (N,) names each token's
row of them, or is None when R = 1 (one row for every token). The adaLN blocks use it with
a = 1 + scale and c = shift of each shape (``modulate(norm(x), shift, scale)``), the cross-attention's
affine norm with a = weight and c = bias.

Why a kernel: the PyTorch path (``LayerNorm32`` then ``modulate``) copies x to float32, normalises, casts
back, gathers the shapes' modulation to every token (N × 2W values when a batch holds several shapes: the
guided batch always does) and multiplies and adds in separate passes: about ten passes over N × W values.
Here each row is read once and written once. The result is rounded to x's dtype once, at the end (the
PyTorch path rounds after the norm and after each operation), so the two differ at that dtype's rounding.
The Triton path on CUDA tensors (or with TRITON_INTERPRET=1 and backend="triton"), the reference otherwise;
no autograd (inference: the sampler's steps).
"""
from __future__ import annotations

import torch

from kernels.backend import use_triton
from kernels.norm_modulate.reference import check_args, norm_modulate_reference

__all__ = ["norm_modulate", "norm_modulate_reference"]


def norm_modulate(x: torch.Tensor, a: torch.Tensor, c: torch.Tensor, rows: torch.Tensor | None = None,
                  eps: float = 1e-6, backend: str = "auto") -> torch.Tensor:
    check_args(x, a, c, rows)
    if use_triton(x, backend, "norm-modulate"):
        from kernels.norm_modulate.triton_kernel import norm_modulate_triton
        return norm_modulate_triton(x, a, c, rows, eps)
    return norm_modulate_reference(x, a, c, rows, eps)
