"""Triton helpers shared by the kernels that visit the 27 neighbours of a block of voxels on a dense grid
(kernels/smooth, kernels/conv3d): voxels in flattened D·H·W order, zero padding outside the grid."""
from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def voxel_block(D, H, W, BLOCK: tl.constexpr):
    """The BLOCK voxels of program_id(0): flat index, in-grid mask, and their z, y, x."""
    v = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    return v, v < D * H * W, v // (H * W), (v // W) % H, v % W


@triton.jit
def tap_neighbour(vz, vy, vx, live, D, H, W, tap: tl.constexpr):
    """Flat index of each voxel's neighbour at ``tap`` (0..26, offsets (tap // 9, tap // 3 % 3, tap % 3) − 1)
    and whether it lies inside the grid."""
    zz = vz + (tap // 9 - 1)
    yy = vy + (tap // 3 % 3 - 1)
    xx = vx + (tap % 3 - 1)
    ok = live & (zz >= 0) & (zz < D) & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
    return (zz * H + yy) * W + xx, ok
