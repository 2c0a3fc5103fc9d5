"""Stand-ins for imports the release makes at module level but the parity stages never call.

- ``einops``: only ``rearrange(x, "n h d -> n (h d)")`` is reached (the SSA output); used only when
  einops is not installed.
- ``trimesh`` and ``skimage.measure``: imported by the VAE/refiner modules for mesh extraction, which
  the stages do not run; empty placeholders are installed only when the real package is missing.
"""
from __future__ import annotations

import importlib.util
import types


def _rearrange(x, pattern: str, **_):
    lhs, rhs = (side.split() for side in pattern.replace("(", " ( ").replace(")", " ) ").split("->"))
    if lhs == ["n", "h", "d"] and rhs == ["n", "(", "h", "d", ")"]:
        return x.reshape(x.shape[0], -1)
    raise NotImplementedError(f"einops stand-in: pattern {pattern!r}")


def _placeholder(name: str) -> types.ModuleType:
    mod = types.ModuleType(name)

    def missing(attr):
        raise AttributeError(f"{name} is a parity placeholder (not installed); {attr} is not available")

    mod.__getattr__ = missing
    return mod


def build_modules() -> dict[str, types.ModuleType]:
    mods: dict[str, types.ModuleType] = {}
    if importlib.util.find_spec("einops") is None:
        einops = types.ModuleType("einops")
        einops.rearrange = _rearrange
        mods["einops"] = einops
    if importlib.util.find_spec("trimesh") is None:
        mods["trimesh"] = _placeholder("trimesh")
    if importlib.util.find_spec("skimage") is None:
        skimage = _placeholder("skimage")
        skimage.__path__ = []
        measure = _placeholder("skimage.measure")
        skimage.measure = measure
        mods["skimage"] = skimage
        mods["skimage.measure"] = measure
    return mods
