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
from typing import Callable

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


CHUNK = 1 << 21  # voxels per pass: bounds the per-cell temporaries (1024³ surfaces have ~25M voxels)


def extract_mesh(coords: torch.Tensor, values: torch.Tensor, resolution: int, level: float = 0.0,
                 chunk: int = CHUNK, fill: float | Callable[[torch.Tensor], torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Iso-surface ``values = level`` of a sparse SDF -> (vertices (V, 3) float32 in [-1, 1]³, faces (F, 3) int64).

    ``coords`` (N, 3) int voxel indices in [0, resolution), ``values`` (N,); voxel
    centre x = −1 + (i + ½)·2/R. An SDF with no sign change gives an empty mesh.
    ``fill``: the value of every voxel not in the set (the released generator marches a dense grid
    filled with 1 outside its sparse voxels, so surfaces close where the set ends), including one layer
    of voxels just outside the grid, so a shape that reaches the grid's border is closed there too (the
    release's dense grid ends at the border and leaves such a surface open); vertices stay in [−1, 1]³
    (a value below −1 would put one up to half a voxel beyond the border: it is clamped onto it). A callable
    maps those voxels' indices (M, 3; −1 or ``resolution`` for the outer layer) to their values (M,), e.g.
    ``enclosed_fill``'s. None: cells with a missing corner make no surface. Cells are processed ``chunk``
    voxels at a time; only the faces' edge keys outlive a pass.
    """
    if coords.ndim != 2 or coords.shape[1] != 3 or values.shape != (coords.shape[0],):
        raise ValueError(f"extract_mesh: expected coords (N, 3) and values (N,), got {tuple(coords.shape)} and {tuple(values.shape)}")
    if coords.shape[0] == 0:
        raise ValueError("extract_mesh: empty sparse SDF (no voxels)")
    if not bool(torch.isfinite(values).all()):
        raise ValueError("extract_mesh: the SDF holds NaN or infinite values")
    grid, shift = resolution, 0
    if fill is not None:  # march on a grid one voxel larger on every side, the outer layer valued fill
        grid, shift = resolution + 2, 1
        coords, values = _with_shell(coords.long() + 1, values, grid, fill if callable(fill) else float(fill))
    device = coords.device
    c4 = torch.cat([torch.zeros_like(coords[:, :1]), coords], 1).to(torch.int32)
    skeys = coord_keys(c4, grid)
    skeys, order = torch.sort(skeys)
    if bool((skeys.diff() == 0).any()):
        raise ValueError("extract_mesh: duplicated voxel coordinates")
    del skeys
    c4, values = c4[order], values[order].float()
    del order
    n = c4.shape[0]
    tet_corners = _TETS.to(device)
    weights = torch.tensor([1, 2, 4, 8], device=device)

    def pos(rows):
        return -1.0 + (c4[rows, 1:].float() - shift + 0.5) * (2.0 / resolution)

    def edge_point(a, b):
        """Where the iso-level crosses the edge between voxel rows a (inside) and b; a == b: on voxel b."""
        va, vb = values[a], values[b]
        t = torch.where(a == b, torch.zeros_like(va), (level - va) / (vb - va).where(a != b, torch.ones_like(va)))
        pa = pos(a)
        return pa + t[..., None] * (pos(b) - pa)

    face_keys, snapped = [], []
    for s in range(0, n, chunk):
        corners = build_kernel_map(c4, c4[s:s + chunk], grid, kernel_size=2, padding=0, in_sorted=True).neighbors
        inside = values[corners.clamp(min=0).long()] < level
        active = (corners >= 0).all(1) & inside.any(1) & ~inside.all(1)
        del inside
        if not bool(active.any()):
            continue
        tets = corners[active].long()[:, tet_corners].reshape(-1, 4)  # (T, 4) global voxel rows
        del corners, active
        code = ((values[tets] < level).long() * weights).sum(1)
        edge_in, edge_out = [], []
        for cse, tris in _CASES.items():
            sel = tets[code == cse]
            if sel.shape[0] == 0:
                continue
            for tri in tris:
                edge_in.append(torch.stack([sel[:, i] for i, _ in tri], 1))
                edge_out.append(torch.stack([sel[:, o] for _, o in tri], 1))
        del tets, code
        ein, eout = torch.cat(edge_in), torch.cat(edge_out)  # (F, 3) each
        del edge_in, edge_out
        # a vertex exactly on an outside corner belongs to that corner, so every edge meeting there shares it
        on_corner = values[eout] == level
        a = torch.where(on_corner, eout, ein)
        keys = a * n + eout
        # wind each face so its normal points along the SDF's rise (inside -> outside corner)
        p = edge_point(a, eout)  # (F, 3 vertices, 3)
        del a
        normal = torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=1)
        rise = (pos(eout) - pos(ein)).sum(1)
        flip = (normal * rise).sum(1) < 0
        keys[flip] = keys[flip][:, [0, 2, 1]]
        face_keys.append(keys)
        snapped.append(on_corner.any(1))
        del ein, eout, on_corner, p, normal, rise, flip
    if not face_keys:
        return torch.zeros((0, 3), device=device), torch.zeros((0, 3), dtype=torch.long, device=device)
    keys, snapped = torch.cat(face_keys), torch.cat(snapped)
    del face_keys
    ukeys, faces = torch.unique(keys.reshape(-1), return_inverse=True)
    del keys
    faces = faces.reshape(-1, 3)
    verts = edge_point(ukeys // n, ukeys % n)
    del ukeys
    keep = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
    faces, snapped = faces[keep], snapped[keep]
    if bool(snapped.any()):
        # only faces with a vertex snapped onto a corner can coincide: a marching-tetrahedra triangle with all
        # three vertices inside edges lies strictly inside its tetrahedron
        faces = torch.cat([faces[~snapped], _unique_faces(faces[snapped])])
    used = torch.zeros(verts.shape[0], dtype=torch.bool, device=device)
    used[faces.reshape(-1)] = True
    if not bool(used.all()):
        remap = torch.cumsum(used, 0) - 1
        verts, faces = verts[used], remap[faces]
    if shift:
        verts = verts.clamp(-1.0, 1.0)
    return verts.float(), faces


def _with_shell(coords: torch.Tensor, values: torch.Tensor, resolution: int, fill):
    """The set plus every missing voxel of its 26-neighbourhood (inside the grid), valued ``fill`` (a number, or a
    callable of their indices one lower, the frame of the grid before the outer layer was added)."""
    r = torch.arange(-1, 2, device=coords.device)
    offsets = torch.stack(torch.meshgrid(r, r, r, indexing="ij"), -1).reshape(-1, 3)
    c = coords.long()

    def key(x):
        return (x[:, 0] * resolution + x[:, 1]) * resolution + x[:, 2]

    have = torch.unique(key(c))
    ring = (c[:, None, :] + offsets[None]).reshape(-1, 3)
    ring = ring[((ring >= 0) & (ring < resolution)).all(1)]
    rk = torch.unique(key(ring))
    pos = torch.searchsorted(have, rk).clamp(max=len(have) - 1)
    new = rk[have[pos] != rk]
    shell = torch.stack([new // (resolution * resolution), (new // resolution) % resolution, new % resolution], 1)
    if callable(fill):
        ring_values = fill(shell - 1).to(values.device, values.dtype)
    else:
        ring_values = torch.full((len(shell),), fill, dtype=values.dtype, device=values.device)
    return torch.cat([coords, shell.to(coords.dtype)]), torch.cat([values, ring_values])


_FACES6 = torch.tensor([[1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])


def enclosed_fill(coords: torch.Tensor, values: torch.Tensor, resolution: int, latent_coords: torch.Tensor,
                  latent_res: int, level: float = 0.0) -> Callable[[torch.Tensor], torch.Tensor]:
    """``extract_mesh``'s fill for a set decoded on latent voxels: the empty latent voxels that reach the grid's
    border are outside (+1, the release's fill); an empty region the set encloses takes the majority sign of the
    decoded voxels that face it (−1 or +1). Voxels of an occupied latent voxel missing from the set are +1.

    A decoder trained on a narrow band decodes a solid's outer band but not its core: with +1 everywhere the
    core is outside, so a second surface runs along the band's inner edge. When that inner shell closes on
    itself, the clean-up drops it as interior; where the band is thin it joins the outer wall and the shape is
    hollow (the demo's die, docs/demo.md). A cavity (a hollow sphere's) is faced by positive voxels and stays
    outside. Regions are found on the latent grid (128³ at 1024³), not the voxel grid."""
    from scipy import ndimage

    f = resolution // latent_res
    if f * latent_res != resolution:
        raise ValueError(f"enclosed_fill: resolution {resolution} is not a multiple of the latent grid {latent_res}")
    device = coords.device
    lc = latent_coords.long().cpu()
    empty = torch.ones((latent_res,) * 3, dtype=torch.bool)
    empty[lc[:, 0], lc[:, 1], lc[:, 2]] = False
    labels_np, n = ndimage.label(empty.numpy())  # 6-connected empty regions, 0 = occupied latent voxel
    labels = torch.from_numpy(labels_np).long()
    faces = [labels[0], labels[-1], labels[:, 0], labels[:, -1], labels[:, :, 0], labels[:, :, -1]]
    enclosed = torch.ones(n + 1, dtype=torch.bool)
    enclosed[0] = False
    enclosed[torch.unique(torch.cat([x.reshape(-1) for x in faces]))] = False
    labels, enclosed = labels.reshape(-1).to(device), enclosed.to(device)
    region_value = torch.ones(n + 1, device=device)
    if bool(enclosed.any()):
        votes = torch.zeros(n + 1, device=device)
        for s in range(0, len(coords), CHUNK):  # bounds the temporaries at 1024³ (tens of millions of voxels)
            c = coords[s:s + CHUNK].long()
            sign = torch.where(values[s:s + CHUNK].float() < level, -1.0, 1.0)
            for off in _FACES6.to(device):
                nb = c + off
                ok = ((nb >= 0) & (nb < resolution)).all(1)
                lab = labels[_flat(nb[ok] // f, latent_res)]
                mine = enclosed[lab]
                votes.index_add_(0, lab[mine], sign[ok][mine])
        region_value[enclosed & (votes < 0)] = -1.0

    def fill(idx: torch.Tensor) -> torch.Tensor:
        i = idx.long().to(device)
        out = torch.ones(len(i), device=device)
        inside = ((i >= 0) & (i < resolution)).all(1)
        out[inside] = region_value[labels[_flat(i[inside] // f, latent_res)]]
        return out

    return fill


def _flat(idx: torch.Tensor, res: int) -> torch.Tensor:
    return (idx[:, 0] * res + idx[:, 1]) * res + idx[:, 2]


def _unique_faces(faces: torch.Tensor) -> torch.Tensor:
    _, first = torch.unique(torch.sort(faces, dim=1).values, dim=0, return_inverse=True)
    keep = torch.full((int(first.max()) + 1,), faces.shape[0], dtype=torch.long, device=faces.device)
    keep.scatter_reduce_(0, first, torch.arange(faces.shape[0], device=faces.device), "amin")
    return faces[keep.sort().values]
