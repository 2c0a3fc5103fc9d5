"""Reading checkpoint files without running code, and the errors of a checkpoint that does not fit.

``safe_load`` is ``torch.load(weights_only=True)`` with the few DeepSpeed record classes its ZeRO state
pickles allowed; a file naming anything else is an ``UnsafeCheckpoint`` and is never loaded. Both
``pipeline.train.checkpoints`` and ``pipeline.train.reshard`` read through it.
"""
from __future__ import annotations

import pickle

import torch


class CheckpointMismatch(ValueError):
    """A checkpoint of another network or model size."""


class UnsafeCheckpoint(CheckpointMismatch):
    """A checkpoint file that names a Python object outside the allowlist (it could run code); never loaded."""


def _deepspeed_globals() -> list:
    """The classes DeepSpeed's ZeRO optimizer state pickles besides tensors: plain records, no code on load."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:  # a host without DeepSpeed reads weights.pt only
        return []
    return [LossScaler, ZeroStageEnum, fragment_address]


def safe_load(source, where: str, map_location="cpu"):
    """``torch.load(weights_only=True)`` with DeepSpeed's record classes allowed; ``source`` is a path or file."""
    try:
        with torch.serialization.safe_globals(_deepspeed_globals()):
            return torch.load(source, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnsafeCheckpoint(f"{where}: refused, it is not plain tensor data ({first})") from None
