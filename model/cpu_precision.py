"""bfloat16 linear layers with float32 attention, for training the DiTs on a CPU.

On a CPU that multiplies bfloat16 natively (AMX, or AVX-512 BF16 on AMD Zen 4) a bfloat16 GEMM at the DiTs'
shapes runs about 3x a float32 one, while bfloat16 attention does not pay: PyTorch's CPU flash attention, forward
and backward, ran 1.2x slower in bfloat16 for the structure DiT's self-attention and 4.9x slower for its
cross-attention on an AMD EPYC (benchmarks/RESULTS.md). ``cpu_autocast`` runs a forward pass under CPU bfloat16 autocast (linear layers, their inputs
and outputs in bfloat16; weights, gradients and optimizer state stay float32; norms and losses float32, as
autocast keeps them), and ``float32_attention`` marks the attention functions that leave autocast and compute
in float32 whatever their inputs. Off the CPU, or with autocast off, both are no-ops.
"""
from __future__ import annotations

import contextlib
import functools

import torch


def cpu_autocast(enabled: bool, device: torch.device | str) -> contextlib.AbstractContextManager:
    """bfloat16 autocast for a forward pass on ``device`` when ``enabled`` and it is the CPU; else nothing."""
    if enabled and torch.device(device).type == "cpu":
        return torch.autocast("cpu", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def float32_attention(fn):
    """``fn`` with its floating-point tensor arguments in float32 and CPU autocast off while it runs, when
    called under CPU autocast; unchanged otherwise. Its result comes back in float32: the next linear layer
    casts it as autocast does."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not torch.is_autocast_enabled("cpu"):
            return fn(*args, **kwargs)
        up = [_float32(a) for a in args]
        with torch.autocast("cpu", enabled=False):
            return fn(*up, **{k: _float32(v) for k, v in kwargs.items()})

    return wrapper


def _float32(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float32:
        return x.float()
    return x
