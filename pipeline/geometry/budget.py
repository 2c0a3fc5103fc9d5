"""Memory a mesh's sparse SDF needs, estimated before the work, and the SDF computed within a budget.

The band at resolution R holds about area * (R/2)^2 * 2*band voxels (a surface of
that area, 2*band voxel widths thick). Peak memory is a fixed process base, the
mesh's own tables (per face), the output (per voxel, kept to the end) and the
band search's working set (per voxel of the piece being computed). When the
working set does not fit, the grid is cut into slabs along x (`sdf_on_grid`'s
region) and the pieces are joined; their keys stay sorted because x is the
slowest index. When even the output does not fit, the resolution is refused.
Constants measured with benchmarks/preprocess.py (peak RSS of one-core runs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BASE_BYTES = 0.5 * 2**30  # interpreter, torch, trimesh, pyarrow, the rendered views
FACE_BYTES = 1500  # vertices, faces, triangles, topology, sign tables per face
OUTPUT_BYTES = 32  # per voxel kept until the shard is written: coords and value in torch and numpy
WORK_BYTES = 64  # per voxel of the piece being computed: candidates, sort words, points, signs
SLACK = 1.2  # estimates are multiplied by this (uneven bands, allocator)
# Check (scan_like, 49k faces, 1024^3, one core): estimated 2.3 GiB, measured peak RSS 1.35-1.57 GiB;
# the band estimate itself is 1.3x the real count on that noisy surface, exact on smooth ones.
MAX_PIECES = 64  # more slabs than this and the per-slab overhead dominates: refuse instead


class BudgetError(ValueError):
    """The mesh does not fit the task's memory at some resolution; the message says by how much."""


def band_voxels(area: float, resolution: int, band: float) -> float:
    return area * (resolution / 2) ** 2 * 2 * band


@dataclass
class Plan:
    resolution: int
    voxels: float  # estimated band voxels
    pieces: int  # slabs along x
    peak_bytes: float  # estimated peak with that many pieces


def plan(area: float, faces: int, resolutions: list[int], band: float, budget_bytes: float) -> list[Plan]:
    """Pieces per resolution so the estimated peak stays within budget; BudgetError if the output itself
    (or the mesh's tables) does not fit."""
    out = []
    fixed = BASE_BYTES + FACE_BYTES * faces * SLACK
    kept = 0.0  # outputs of the resolutions before, held until the shard is written
    for res in resolutions:
        vox = band_voxels(area, res, band) * SLACK
        room = budget_bytes - fixed - OUTPUT_BYTES * (kept + vox)
        pieces = math.ceil(WORK_BYTES * vox / room) if room > 0 else MAX_PIECES + 1
        if pieces > MAX_PIECES:
            need = fixed + OUTPUT_BYTES * (kept + vox) + WORK_BYTES * vox / MAX_PIECES
            raise BudgetError(f"at {res}^3 the band (~{vox / 1e6:.0f}M voxels, {faces:,} faces) needs "
                              f"~{need / 2**30:.1f} GiB, over the task budget of {budget_bytes / 2**30:.1f} GiB "
                              "(raise memory_per_task_gb or drop this resolution)")
        pieces = max(1, pieces)
        kept += vox
        out.append(Plan(res, vox, pieces, fixed + OUTPUT_BYTES * kept + WORK_BYTES * vox / pieces))
    return out


def surface_area(vertices: np.ndarray, faces: np.ndarray) -> float:
    t = vertices[faces]
    return float(0.5 * np.linalg.norm(np.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]), axis=1).sum())


def sdf_in_pieces(prepared, resolution: int, band: float, pieces: int):
    """`sdf_on_grid` over `pieces` slabs along x, joined (same result as one call)."""
    import torch

    from pipeline.geometry.sdf import SparseSDF, sdf_on_grid

    if pieces <= 1:
        return sdf_on_grid(prepared, resolution, band)
    cuts = np.linspace(0, resolution, pieces + 1).round().astype(int)
    parts = [sdf_on_grid(prepared, resolution, band, region=((int(a), 0, 0), (int(b), resolution, resolution)))
             for a, b in zip(cuts[:-1], cuts[1:]) if b > a]
    return SparseSDF(torch.cat([p.coords for p in parts]), torch.cat([p.values for p in parts]),
                     resolution, float(band))
