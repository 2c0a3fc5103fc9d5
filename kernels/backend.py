"""Which implementation a kernel package runs: the Triton kernel or its PyTorch reference."""
from __future__ import annotations

import os

import torch

BACKENDS = ("auto", "triton", "torch")


def use_triton(x: torch.Tensor, backend: str, what: str) -> bool:
    """``auto``: the kernel on CUDA tensors, the reference elsewhere; ``triton``: the kernel, also on the CPU
    when TRITON_INTERPRET=1 (the reference otherwise); ``torch``: the reference. ``what`` names the operation
    in the error for an unknown backend."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown {what} backend {backend!r}: expected auto, triton or torch")
    wanted = backend == "triton" or (backend == "auto" and x.is_cuda)
    return wanted and (x.is_cuda or os.environ.get("TRITON_INTERPRET") == "1")
