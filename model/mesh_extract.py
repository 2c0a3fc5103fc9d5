"""Mesh extraction from a sparse SDF: marching tetrahedra over the active cells only.

A cell is the cube between 8 voxel centres that are all in the sparse set; it
is split into the 6 tetrahedra around its main diagonal (the Kuhn split, which
matches across neighbouring cells, so the surface has no cracks and none of
marching cubes' ambiguous cases). Vertices sit on grid edges and are shared
through an edge key, so the result is an indexed mesh with shared vertices, no
degenerate or duplicate faces, and every face wound with its normal pointing
from negative (inside) to positive values. No dense R³ array is built.
"""

from __future__ import annotations

from itertools import permutations

import torch

from kernels.sparse_conv import build_kernel_map, coord_keys

# corners of a cell by bits (di, dj, dk) -> di·4 + dj·2 + dk, as kernel_offsets(2) orders them
_AXIS_BIT = (4, 2, 1)
_TETS = torch.tensor([[0, _AXIS_BIT[a], _AXIS_BIT[a] + _AXIS_BIT[b], 7] for a, b, _ in permutations(range(3))])


def _case_table() -> dict[int, list[list[tuple[int, int]]]]:
    """For each inside-mask of a tetrahedron's 4 corners: triangles as 3 (inside, outside) corner edges."""
    table = {}
    for code in range(1, 15):
        ins = [i for i in range(4) if code >> i & 1]
        outs = [i for i in range(4) if not code >> i & 1]
        if len(ins) == 1:
            table[code] = [[(ins[0], o) for o in outs]]
        elif len(ins) == 3:
            table[code] = [[(i, outs[0]) for i in ins]]
        else:
            (a, b), (c, d) = ins, outs
            # the quad a-c, a-d, b-d, b-c, in cycle order, as two triangles
            table[code] = [[(a, c), (a, d), (b, d)], [(a, c), (b, d), (b, c)]]
    return table


_CASES = _case_table()


def extract_mesh(coords: torch.Tensor, values: torch.Tensor, resolution: int, level: float = 0.0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-surface ``values = level`` of a sparse SDF -> (vertices (V, 3) float32 in [-1, 1]³, faces (F, 3) int64).

    ``coords`` (N, 3) int voxel indices in [0, resolution), ``values`` (N,); voxel
    centre x = −1 + (i + ½)·2/R. An SDF with no sign change gives an empty mesh.
    """
    if coords.ndim != 2 or coords.shape[1] != 3 or values.shape != (coords.shape[0],):
        raise ValueError(f"extract_mesh: expected coords (N, 3) and values (N,), got {tuple(coords.shape)} and {tuple(values.shape)}")
    if coords.shape[0] == 0:
        raise ValueError("extract_mesh: empty sparse SDF (no voxels)")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("extract_mesh: the SDF holds NaN or infinite values")
    device = coords.device
    c4 = torch.cat([torch.zeros_like(coords[:, :1]), coords], 1).to(torch.int32)
    order = torch.argsort(coord_keys(c4, resolution))
    c4, values = c4[order], values[order].float()
    if bool((coord_keys(c4, resolution).diff() == 0).any()):
        raise ValueError("extract_mesh: duplicated voxel coordinates")
    corners = build_kernel_map(c4, c4, resolution, kernel_size=2, padding=0, in_sorted=True).neighbors.long()
    full = (corners >= 0).all(1)
    cv = values[corners.clamp(min=0)]
    inside = cv < level
    active = full & inside.any(1) & ~inside.all(1)
    tets = corners[active][:, _TETS.to(device)].reshape(-1, 4)  # (T, 4) global voxel rows
    tin = values[tets] < level
    code = (tin.long() * torch.tensor([1, 2, 4, 8], device=device)).sum(1)
    n = c4.shape[0]
    edge_in, edge_out = [], []
    for cse, tris in _CASES.items():
        sel = tets[code == cse]
        if sel.shape[0] == 0:
            continue
        for tri in tris:
            edge_in.append(torch.stack([sel[:, i] for i, _ in tri], 1))
            edge_out.append(torch.stack([sel[:, o] for _, o in tri], 1))
    if not edge_in:
        return torch.zeros((0, 3), device=device), torch.zeros((0, 3), dtype=torch.long, device=device)
    ein, eout = torch.cat(edge_in), torch.cat(edge_out)  # (F, 3) each
    # a vertex exactly on an outside corner belongs to that corner, so every edge meeting there shares it
    on_corner = values[eout] == level
    keys = torch.where(on_corner, eout * n + eout, ein * n + eout)
    ukeys, faces = torch.unique(keys.reshape(-1), return_inverse=True)
    faces = faces.reshape(-1, 3)
    a, b = ukeys // n, ukeys % n
    pos = -1.0 + (c4[:, 1:].float() + 0.5) * (2.0 / resolution)
    va, vb = values[a], values[b]
    t = torch.where(a == b, torch.zeros_like(va), (level - va) / (vb - va).where(a != b, torch.ones_like(va)))
    verts = pos[a] + t[:, None] * (pos[b] - pos[a])
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    faces, ein, eout = faces[keep], ein[keep], eout[keep]
    # wind each face so its normal points along the SDF's rise (inside -> outside corner)
    p = verts[faces]
    normal = torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=1)
    rise = (pos[eout] - pos[ein]).sum(1)
    flip = (normal * rise).sum(1) < 0
    faces[flip] = faces[flip][:, [0, 2, 1]]
    faces = _unique_faces(faces)
    used, faces = torch.unique(faces.reshape(-1), return_inverse=True)
    return verts[used].float(), faces.reshape(-1, 3)


def _unique_faces(faces: torch.Tensor) -> torch.Tensor:
    _, first = torch.unique(torch.sort(faces, dim=1).values, dim=0, return_inverse=True)
    keep = torch.full((int(first.max()) + 1,), faces.shape[0], dtype=torch.long, device=faces.device)
    keep.scatter_reduce_(0, first, torch.arange(faces.shape[0], device=faces.device), "amin")
    return faces[keep.sort().values]
