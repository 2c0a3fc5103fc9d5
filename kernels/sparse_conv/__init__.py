"""Sparse 3D convolution: kernel maps from sorted keys, a Triton gather–GEMM–scatter, a PyTorch reference."""

from __future__ import annotations

import torch

from .kernel_map import KernelMap, build_kernel_map, coord_keys, kernel_offsets
from .reference import sparse_conv_reference

__all__ = [
    "KernelMap", "build_kernel_map", "coord_keys", "kernel_offsets",
    "sparse_conv", "sparse_conv_reference", "sparse_conv_triton",
]


def sparse_conv_triton(x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """Triton path (GPU, or the CPU under TRITON_INTERPRET=1); imported lazily so CPU-only installs without triton work."""
    from .triton_conv import sparse_conv_triton as impl

    return impl(x, weight, kmap)


def sparse_conv(x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, backend: str = "auto") -> torch.Tensor:
    """Sparse convolution of features ``x`` (N, Cin) with ``weight`` (V, Cin, Cout) over ``kmap``.

    ``backend``: "triton", "torch" or "auto" (Triton on CUDA tensors of 16/32-bit floats, PyTorch otherwise).
    """
    if x.ndim != 2 or weight.ndim != 3:
        raise ValueError(f"sparse_conv: expected x (N, Cin) and weight (V, Cin, Cout), got {tuple(x.shape)} and {tuple(weight.shape)}")
    if x.shape[0] != kmap.num_inputs:
        raise ValueError(f"sparse_conv: x has {x.shape[0]} rows but the kernel map was built for {kmap.num_inputs} inputs")
    if weight.shape[0] != kmap.volume:
        raise ValueError(f"sparse_conv: weight has {weight.shape[0]} kernel offsets, kernel map has {kmap.volume}")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"sparse_conv: x has {x.shape[1]} channels, weight expects {weight.shape[1]}")
    if backend == "auto":
        backend = "triton" if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) else "torch"
    if backend == "triton":
        return sparse_conv_triton(x, weight, kmap)
    if backend == "torch":
        return sparse_conv_reference(x, weight.to(x.dtype), kmap)
    raise ValueError(f"sparse_conv: unknown backend {backend!r} (expected 'auto', 'triton' or 'torch')")
