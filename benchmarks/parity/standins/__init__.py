"""Stand-ins that let the released Direct3D-S2 package import and run without its compiled dependencies.

``install(device, ssa_ops)`` puts them into ``sys.modules`` (only inside the parity harness process):
torchsparse and flash_attn always (ours, so both sides of a comparison run the same attention and conv
arithmetic on every machine), einops / trimesh / skimage only where the real package is missing.
After the release is imported, ``patch_release_ssa`` swaps the release's SSA Triton ops for the
PyTorch references in ``ssa_ops`` when asked to (float32 runs, CPU runs).
"""
from __future__ import annotations

import sys

from . import flash_attn as _flash_attn
from . import misc as _misc
from . import ssa_ops
from . import torchsparse as _torchsparse

__all__ = ["install", "patch_release_ssa", "ssa_ops"]


def install() -> list[str]:
    """Insert the stand-in modules into sys.modules; returns the names installed."""
    mods = {}
    mods.update(_torchsparse.build_modules())
    mods["flash_attn"] = _flash_attn.build_module()
    mods.update(_misc.build_modules())
    for name, mod in mods.items():
        existing = sys.modules.get(name)
        if name in ("torchsparse", "flash_attn") and existing is not None \
                and not str(getattr(existing, "__version__", "")).endswith("parity-standin"):
            # the real library already imported in this process would be half-replaced: refuse
            raise RuntimeError(f"{name} is already imported in this process; run the parity harness on its own")
        sys.modules[name] = mod
    return sorted(mods)


def patch_release_ssa(device, use_torch_ops: bool) -> None:
    """Point the released SSA module at our PyTorch references (use_torch_ops) and, off CUDA, at a torch
    proxy that maps its hard-coded device="cuda" allocations to ``device``."""
    import importlib
    pkg = "direct3d_s2.modules.sparse.attention.spatial_sparse_attention"
    scoring = importlib.import_module(f"{pkg}.ops.compressed_attention")
    module = importlib.import_module(f"{pkg}.module.spatial_sparse_attention")
    if use_torch_ops:
        scoring._get_attention_score = ssa_ops.attention_score
        module.spatial_selection_attention = ssa_ops.selection_attention
    if str(device).split(":")[0] != "cuda":
        scoring.torch = ssa_ops.device_redirect(device)
