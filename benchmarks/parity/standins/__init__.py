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

__all__ = ["install", "patch_release_ssa", "set_release_ssa_ops", "ssa_ops"]


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


_ORIGINAL_OPS: dict = {}


def patch_release_ssa(device, use_torch_ops: bool) -> None:
    """Point the released SSA module at our PyTorch references (use_torch_ops) and, off CUDA, at a torch
    proxy that maps its hard-coded device="cuda" allocations to ``device``."""
    scoring, module = _release_ssa_modules()
    if not _ORIGINAL_OPS:
        _ORIGINAL_OPS.update(score=scoring._get_attention_score, select=module.spatial_selection_attention)
    set_release_ssa_ops(use_torch_ops)
    if str(device).split(":")[0] != "cuda":
        scoring.torch = ssa_ops.device_redirect(device)


def set_release_ssa_ops(use_torch_ops: bool) -> bool:
    """Switch the release's SSA score and selection ops between its Triton kernels and our references;
    returns whether the references were in use before (the Triton kernels take half precision only,
    so a float32 reference run of a bfloat16 comparison switches to the references for its duration)."""
    scoring, module = _release_ssa_modules()
    before = scoring._get_attention_score is ssa_ops.attention_score
    scoring._get_attention_score = ssa_ops.attention_score if use_torch_ops else _ORIGINAL_OPS["score"]
    module.spatial_selection_attention = ssa_ops.selection_attention if use_torch_ops else _ORIGINAL_OPS["select"]
    return before


def _release_ssa_modules():
    import importlib
    pkg = "direct3d_s2.modules.sparse.attention.spatial_sparse_attention"
    return (importlib.import_module(f"{pkg}.ops.compressed_attention"),
            importlib.import_module(f"{pkg}.module.spatial_sparse_attention"))
