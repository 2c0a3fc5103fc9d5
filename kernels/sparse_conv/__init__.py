"""Sparse 3D convolution: kernel maps from sorted keys, a Triton gather–GEMM–scatter on GPUs, a blocked
gather–GEMM in PyTorch on CPUs (gather_gemm.py), and the per-offset PyTorch reference."""

from __future__ import annotations

import torch

from .gather_gemm import sparse_conv_gather_gemm
from .kernel_map import KernelMap, build_kernel_map, coord_keys, kernel_offsets
from .reference import sparse_conv_reference

__all__ = [
    "KernelMap", "build_kernel_map", "coord_keys", "kernel_offsets",
    "sparse_conv", "sparse_conv_gather_gemm", "sparse_conv_reference", "sparse_conv_triton",
]


def sparse_conv_triton(x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap) -> torch.Tensor:
    """Triton path (GPU, or the CPU under TRITON_INTERPRET=1); imported lazily so CPU-only installs without triton work."""
    from .triton_conv import sparse_conv_triton as impl

    return impl(x, weight, kmap)


def sparse_conv(x: torch.Tensor, weight: torch.Tensor, kmap: KernelMap, backend: str = "auto") -> torch.Tensor:
    """Sparse convolution of features ``x`` (N, Cin) with ``weight`` (V, Cin, Cout) over ``kmap``.

    ``backend``: "triton", "gemm" (gather_gemm.py), "torch" (the per-offset reference) or "auto" (Triton on
    CUDA tensors of 16/32-bit floats, "gemm" otherwise).
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
        backend = "triton" if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16, torch.float32) else "gemm"
    if backend == "triton":
        return sparse_conv_triton(x, weight, kmap)
    if backend == "gemm":
        return sparse_conv_gather_gemm(x, weight.to(x.dtype), kmap)
    if backend == "torch":
        return sparse_conv_reference(x, weight.to(x.dtype), kmap)
    raise ValueError(f"sparse_conv: unknown backend {backend!r} (expected 'auto', 'triton', 'gemm' or 'torch')")
