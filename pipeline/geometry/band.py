"""Narrow band of a triangle mesh on a sparse voxel grid, found from the triangles alone.

Each triangle enumerates the voxel centres that can lie within the band: the
columns along its dominant normal axis whose 2D position is within the band of
the projected triangle (projection never lengthens distances), and in each
column only the few voxels inside the slab |n.x - n.a| < band. Exact distances
are then taken for these candidates and the minimum per voxel kept by one sort.
No array of size R^3 is ever made; memory grows with the surface.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from kernels.distance import point_triangle_sqdist
from kernels.distance.frame import sqdist_in_frame, triangle_frames

# For dominant axis a: position of x, y, z in the (u, v, w=a) column frame, u=(a+1)%3, v=(a+2)%3.
_XYZ_FROM_UVW = torch.tensor([[2, 0, 1], [1, 2, 0], [0, 1, 2]])
_EPS = 1e-4  # index-space slack so rounding never drops a candidate (the exact test removes extras)
_NONE = 1 << 30  # key of a candidate outside the band: after every voxel key (< 2^30 at R <= 1024)


@dataclass
class BandPairs:
    """Closest triangle per band voxel: keys sorted ascending and unique."""

    keys: torch.Tensor  # (N,) int64 linear key (i*R + j)*R + k
    d2: torch.Tensor  # (N,) float32 squared distance to the mesh
    tri: torch.Tensor | None  # (N,) int64 index of a closest triangle
    feature: torch.Tensor | None  # (N,) uint8 closest feature on that triangle


def _column_frames(tri: torch.Tensor):
    """Dominant axis and the triangle's coordinates reordered to (u, v, w)."""
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1)
    axis = n.abs().argmax(dim=1)
    order = torch.stack([(axis + 1) % 3, (axis + 2) % 3, axis], dim=1)  # (T,3)
    tri_uvw = torch.gather(tri, 2, order[:, None, :].expand(-1, 3, -1))
    n_uvw = torch.gather(n, 1, order)
    return axis, tri_uvw, n_uvw


def _index_range(lo: torch.Tensor, hi: torch.Tensor, h: float, r: float, res: int):
    """Voxel indices whose centres lie in [lo - r, hi + r], clamped to the grid."""
    c0 = -1.0 + 0.5 * h
    i_lo = torch.ceil((lo - r - c0) / h - _EPS).clamp(0, res - 1).long()
    i_hi = torch.floor((hi + r - c0) / h + _EPS).clamp(-1, res - 1).long()
    return i_lo, i_hi


def candidate_counts(tri: torch.Tensor, res: int, band: float) -> torch.Tensor:
    """Upper bound on the candidates each triangle enumerates (used to size chunks)."""
    h = 2.0 / res
    r = band * h
    axis, tri_uvw, n_uvw = _column_frames(tri)
    lo, hi = tri_uvw.min(dim=1).values, tri_uvw.max(dim=1).values
    i_lo, i_hi = _index_range(lo, hi, h, r, res)
    ext = (i_hi - i_lo + 1).clamp(min=0)
    slab = torch.ceil(2 * r / (h * n_uvw[:, 2].abs() / n_uvw.norm(dim=1))).long() + 2
    return ext[:, 0] * ext[:, 1] * torch.minimum(slab, ext[:, 2])


def _expand(counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(owner, local) for a ragged range: owner[j] repeats i counts[i] times, local counts 0.. within it."""
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(owner.numel(), device=counts.device) - start.index_select(0, owner)
    return owner, local


def _take(mask: torch.Tensor, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Rows where mask holds, for several tensors with one nonzero (boolean indexing redoes it per tensor)."""
    idx = mask.nonzero().squeeze(1)
    return [t.index_select(0, idx) for t in tensors]


def _chunk_candidates(tri: torch.Tensor, first_id: int, res: int, band: float, distance_backend: str, frames=None,
                      closest: bool = True):
    """Candidate pairs (key, d2, owner) of one chunk of triangles numbered from first_id; not yet unique,
    key _NONE where d2 is not below the band.

    owner is the int32 word (triangle id << 3) | closest feature code, None unless `closest`. frames:
    this chunk's rows of `_frames(tri)`, computed once for the whole mesh (per-chunk small ops cost
    more in overhead).
    """
    frames = frames or _frames(tri, distance_backend)
    h = 2.0 / res
    r = band * h
    c0 = -1.0 + 0.5 * h
    axis, tri_uvw, n_uvw = frames[:3]
    lo, hi = tri_uvw.min(dim=1).values, tri_uvw.max(dim=1).values
    i_lo, i_hi = _index_range(lo, hi, h, r, res)
    nu = (i_hi[:, 0] - i_lo[:, 0] + 1).clamp(min=0)
    nv = (i_hi[:, 1] - i_lo[:, 1] + 1).clamp(min=0)

    # Per-triangle column table: three edge lines offset outward by r (projection never lengthens
    # distances, so a column farther than r from the projected triangle has no band voxel) and the
    # plane as w = w0 + gu*u + gv*v with slab half-width r/|n_w|.
    p2 = tri_uvw[:, :, :2]
    e = torch.roll(p2, -1, dims=1) - p2
    orient = torch.sign(n_uvw[:, 2])[:, None]
    inv_len = orient / e.norm(dim=2).clamp_min(1e-30)
    la, lb = -e[:, :, 1] * inv_len, e[:, :, 0] * inv_len  # inward unit normals of the edges
    lc = -(la * p2[:, :, 0] + lb * p2[:, :, 1]) + r * (1 + _EPS) + _EPS * h
    gu, gv = -n_uvw[:, 0] / n_uvw[:, 2], -n_uvw[:, 1] / n_uvw[:, 2]
    w0 = tri_uvw[:, 0, 2] - gu * tri_uvw[:, 0, 0] - gv * tri_uvw[:, 0, 1]
    half = r * n_uvw.norm(dim=1) / n_uvw[:, 2].abs()
    ftab = torch.cat([la, lb, lc, torch.stack([gu, gv, w0, half], 1)], 1)  # (T, 13)
    itab = torch.stack([i_lo[:, 0], i_lo[:, 1], nv, i_lo[:, 2], i_hi[:, 2]], 1)  # (T, 5)

    col_t, local = _expand(nu * nv)
    # Gather only the fields the column test needs; the slab fields only for the columns it keeps.
    it = itab[:, :3].T.contiguous().index_select(1, col_t)  # (fields, columns): contiguous rows
    row = torch.div(local, it[2], rounding_mode="floor")
    iu = it[0] + row
    iv = it[1] + local - row * it[2]
    xu = c0 + iu.to(tri.dtype) * h
    xv = c0 + iv.to(tri.dtype) * h
    ft = ftab[:, :9].T.contiguous().index_select(1, col_t)
    keep = ft[0] * xu + ft[3] * xv + ft[6] >= 0
    for k in (1, 2):
        keep &= ft[k] * xu + ft[3 + k] * xv + ft[6 + k] >= 0
    sel = keep.nonzero().squeeze(1)
    col_t, iu, iv, xu, xv = (x.index_select(0, sel) for x in (col_t, iu, iv, xu, xv))
    ft = torch.cat([ftab[:, 9:], itab[:, 3:].to(ftab.dtype)], 1).T.contiguous().index_select(1, col_t)

    w_mid = ft[2] + ft[0] * xu + ft[1] * xv
    w_lo, w_hi = _index_range(w_mid - ft[3], w_mid + ft[3], h, 0.0, res)
    w_lo = torch.maximum(w_lo, ft[4].long())  # the triangle's own w range, dilated by r
    w_hi = torch.minimum(w_hi, ft[5].long())
    cand_c, local = _expand((w_hi - w_lo + 1).clamp(min=0))
    iw = w_lo.index_select(0, cand_c) + local
    t_loc = col_t.index_select(0, cand_c)

    if tri.is_cuda or distance_backend == "triton":
        uvw = torch.stack([iu[cand_c], iv[cand_c], iw], dim=1)
        xyz = torch.gather(uvw, 1, _XYZ_FROM_UVW.to(uvw.device)[axis[t_loc]])
        pts = c0 + xyz.to(tri.dtype) * h
        d2, feat = point_triangle_sqdist(pts, tri, t_loc, backend=distance_backend)
        key = (xyz[:, 0] * res + xyz[:, 1]) * res + xyz[:, 2]
        return torch.where(d2 < r * r, key, _NONE), d2, _owner(t_loc, first_id, feat) if closest else None

    # CPU: local triangle-frame coordinates are affine in (iu, iv, iw); a column shares iu, iv.
    rot, shape = frames[3:]
    order = torch.stack([(axis + 1) % 3, (axis + 2) % 3, axis], dim=1)
    m_uvw = torch.gather(rot, 2, order[:, None, :].expand(-1, 3, -1)) * h  # (T,3 rows,3 uvw)
    origin = torch.einsum("tij,tj->ti", rot, c0 - tri[:, 0].double())
    base_tab = torch.cat([m_uvw[:, :, 0], m_uvw[:, :, 1], origin], 1).to(tri.dtype)  # (T, 9)
    # Tables are kept transposed (fields, rows) so every per-candidate field is a contiguous row.
    bt = base_tab.T.contiguous().index_select(1, col_t)
    base = bt[6:9] + bt[0:3] * iu.to(tri.dtype) + bt[3:6] * iv.to(tri.dtype)
    cand_tab = torch.cat([m_uvw[:, :, 2], shape], 1).to(tri.dtype).T.contiguous().index_select(1, t_loc)  # (9, N)
    loc = base.index_select(1, cand_c) + cand_tab[0:3] * iw.to(tri.dtype)
    d2, feat = sqdist_in_frame(loc[0], loc[1], loc[2], cand_tab[3:9].T, with_feature=closest)
    # Linear key: the column's (u, v) part plus w times the dominant axis' stride.
    stride = torch.tensor([res * res, res, 1], device=tri.device)
    col_key = iu * stride[(axis + 1) % 3].index_select(0, col_t) + iv * stride[(axis + 2) % 3].index_select(0, col_t)
    key = col_key.index_select(0, cand_c) + iw * stride[axis].index_select(0, col_t).index_select(0, cand_c)
    return torch.where(d2 < r * r, key, _NONE), d2, _owner(t_loc, first_id, feat) if closest else None


def _frames(tri: torch.Tensor, distance_backend: str) -> tuple:
    """Per-triangle column frames (axis, uvw triangle, uvw normal) and, for the CPU path, triangle frames."""
    cpu = not (tri.is_cuda or distance_backend == "triton")
    return _column_frames(tri) + (triangle_frames(tri) if cpu else (None, None))


def _owner(t_loc: torch.Tensor, first_id: int, feat: torch.Tensor) -> torch.Tensor:
    """One int32 per pair: triangle id (< 2^28) and its 3-bit closest-feature code."""
    return ((t_loc.to(torch.int32) + first_id) << 3) | feat.to(torch.int32)


def _bits(d2: torch.Tensor) -> torch.Tensor:
    """The float bits of d2 as int64: d2 >= 0, so they order like d2."""
    return d2.view(torch.int32).to(torch.int64)


def _triangle_chunks(counts: torch.Tensor, chunk: int) -> Iterator[tuple[int, int]]:
    """Consecutive triangle ranges whose candidate bound stays near `chunk` (one triangle may exceed it)."""
    csum = torch.cumsum(counts, 0).cpu()
    start, n = 0, counts.numel()
    while start < n:
        base = int(csum[start - 1]) if start else 0
        stop = int(torch.searchsorted(csum, base + chunk, right=True))
        stop = max(stop, start + 1)
        yield start, min(stop, n)
        start = stop


def _sort(x: torch.Tensor) -> torch.Tensor:
    """Values of an int64 tensor sorted ascending: numpy's vectorized sort on the CPU (6x faster than
    an argsort, 8x than torch.sort), torch.sort on CUDA."""
    return torch.sort(x).values if x.is_cuda else torch.from_numpy(np.sort(x.numpy()))


def _nearest(packed: torch.Tensor) -> torch.Tensor:
    """Words key << 32 | d2 bits: one per key, its smallest, keys ascending and without _NONE."""
    packed = _sort(packed)
    _, counts = torch.unique_consecutive(packed >> 32, return_counts=True)
    packed = packed.index_select(0, torch.cumsum(counts, 0) - counts)
    if packed.numel() and int(packed[-1] >> 32) == _NONE:
        packed = packed[:-1]
    return packed


def _nearest_owner(key: torch.Tensor, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique keys ascending, without _NONE, and the smallest word (d2 bits << 32 | owner) of each: the
    nearest pair, equal distances going to the lowest owner whatever the order of the input.

    The keys tagged with their position (key << bits | i) are sorted as plain values, then a
    segment minimum."""
    n = key.numel()
    bits = max(n - 1, 1).bit_length()
    if bits > 32:  # _NONE << bits must stay below 2^63
        raise ValueError(f"{n:,} band candidates in one sort: over the 2^32 this packing holds")
    tagged = _sort((key << bits) | torch.arange(n, device=key.device))
    ukey, seg = torch.unique_consecutive(tagged >> bits, return_inverse=True)
    best = torch.full(ukey.shape, torch.iinfo(torch.int64).max, dtype=torch.int64, device=key.device)
    best.scatter_reduce_(0, seg, word.index_select(0, tagged & ((1 << bits) - 1)), "amin")
    if ukey.numel() and int(ukey[-1]) == _NONE:
        ukey, best = ukey[:-1], best[:-1]
    return ukey, best


def _morton_order(tri: torch.Tensor) -> torch.Tensor:
    """Triangles sorted along a Morton curve so a chunk covers a compact region (fewer duplicates)."""
    q = ((tri.mean(1) + 1) * 512).clamp(0, 1023).long()
    code = torch.zeros_like(q[:, 0])
    for bit in range(10):
        for d in range(3):
            code |= ((q[:, d] >> bit) & 1) << (3 * bit + d)
    return torch.argsort(code)


@torch.no_grad()
def band_pairs(tri: torch.Tensor, res: int, band: float, chunk: int = 1 << 20, distance_backend: str = "auto",
               closest: bool = True) -> BandPairs:
    """Every voxel centre with distance < band*h to the triangles (F,3,3), with its closest triangle and
    feature; without them (tri and feature None) when not `closest`: a sign counted along grid lines
    needs only the distances, and the pair words shrink to (key, d2)."""
    if res > 1024:
        raise ValueError(f"resolution {res} > 1024: linear keys would not fit the packed 31 bits")
    if tri.shape[0] == 0:
        empty = torch.empty(0, dtype=torch.int64, device=tri.device)
        return BandPairs(empty, empty.float(), empty if closest else None, empty.to(torch.uint8) if closest else None)
    perm = _morton_order(tri)
    tri = tri[perm]
    counts = candidate_counts(tri, res, band)
    frames = _frames(tri, distance_backend)
    keys, words = [], []
    for s, e in _triangle_chunks(counts, chunk):
        k, d2, owner = _chunk_candidates(tri[s:e], s, res, band, distance_backend,
                                         tuple(x[s:e] if x is not None else None for x in frames), closest)
        # Chunks cover compact regions: de-duplicating each halves what the last sort sees.
        if closest:
            k, w = _nearest_owner(k, (_bits(d2) << 32) | owner)
            words.append(w)
        else:
            k = _nearest((k << 32) | _bits(d2))
        keys.append(k)
        del d2, owner
    if not closest:
        packed = _nearest(torch.cat(keys))
        return BandPairs(packed >> 32, (packed & 0xFFFFFFFF).to(torch.int32).view(torch.float32), None, None)
    key, word = _nearest_owner(torch.cat(keys), torch.cat(words))
    del keys, words
    owner = (word & 0xFFFFFFFF).to(torch.int32)
    return BandPairs(
        keys=key,
        d2=(word >> 32).to(torch.int32).view(torch.float32),
        tri=perm[(owner >> 3).long()],
        feature=(owner & 7).to(torch.uint8),
    )
