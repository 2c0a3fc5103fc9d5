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

from kernels.distance import column_candidates
from kernels.distance.frame import sqdist_in_frame, triangle_frames

_EPS = 1e-4  # index-space slack so rounding never drops a candidate (the exact test removes extras)
_NONE = 1 << 30  # keys from here on mark candidates outside the band: after every voxel key (< 2^30)


@dataclass
class BandPairs:
    """Closest triangle per band voxel: keys sorted ascending and unique."""

    keys: torch.Tensor  # (N,) int32 linear key (i*R + j)*R + k (< 2^30)
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


def _where(mask: torch.Tensor) -> torch.Tensor:
    """Indices where a 1-D mask holds (numpy's on the CPU: 7x faster than torch.nonzero there)."""
    if mask.is_cuda:
        return mask.nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(mask.numpy()))


@dataclass
class _Tables:
    """Per-triangle fields, stored (fields, T) so that a gather by triangle yields contiguous rows."""

    rows: torch.Tensor  # (T,) u rows of the dilated (u, v) box
    row_i: torch.Tensor  # (3, T) int64: first u, first and last v of the box
    lines: torch.Tensor  # (9, T) float64: the edge lines a*u + b*v + c >= 0 offset outward by r; b != 0
    slab: torch.Tensor  # (6, T): w = w0 + gu*u + gv*v, half width, the triangle's own w range (dilated)
    frame: torch.Tensor | None  # (18, T), CPU: local coordinates per u, v, w step, origin, 2D shape
    stride: torch.Tensor  # (3, T) int64: linear-key strides of u, v, w
    counts: torch.Tensor  # (T,) candidate bound (candidate_counts), to size chunks
    kernels: bool = False  # the GPU's Triton scan (kernels.distance.scan) rather than the PyTorch one here


def _tables(tri: torch.Tensor, res: int, band: float, cpu: bool, kernels: bool = False) -> _Tables:
    """Everything per triangle the chunks need, computed once per mesh (per-chunk small ops cost more in
    overhead than in work); kernels: in one Triton launch (the GPU's path; this code is its reference)."""
    if kernels:
        from kernels.distance.scan import triangle_tables  # Triton is imported only where it runs

        rows, row_i, lines, slab, stride, counts = triangle_tables(tri, res, band, _EPS)
        return _Tables(rows, row_i, lines, slab, None, stride, counts, kernels=True)
    h = 2.0 / res
    r = band * h
    c0 = -1.0 + 0.5 * h
    axis, tri_uvw, n_uvw = _column_frames(tri)
    lo, hi = tri_uvw.min(dim=1).values, tri_uvw.max(dim=1).values
    i_lo, i_hi = _index_range(lo, hi, h, r, res)
    nu = (i_hi[:, 0] - i_lo[:, 0] + 1).clamp(min=0)
    nv = (i_hi[:, 1] - i_lo[:, 1] + 1).clamp(min=0)
    # Three edge lines offset outward by r (projection never lengthens distances, so a column farther
    # than r from the projected triangle has no band voxel) and the plane as w = w0 + gu*u + gv*v
    # with slab half-width r/|n_w|.
    p2 = tri_uvw[:, :, :2].double()
    e = torch.roll(p2, -1, dims=1) - p2
    orient = torch.sign(n_uvw[:, 2].double())[:, None]
    inv_len = orient / e.norm(dim=2).clamp_min(1e-30)
    la, lb = -e[:, :, 1] * inv_len, e[:, :, 0] * inv_len  # inward unit normals of the edges
    lc = -(la * p2[:, :, 0] + lb * p2[:, :, 1]) + r * (1 + _EPS) + _EPS * h
    # An edge along v bounds u alone: b = +-1e-300 turns it into a bound on v beyond the grid (or none).
    lb = torch.where(lb == 0, 1e-300, lb)
    gu, gv = -n_uvw[:, 0] / n_uvw[:, 2], -n_uvw[:, 1] / n_uvw[:, 2]
    w0 = tri_uvw[:, 0, 2] - gu * tri_uvw[:, 0, 0] - gv * tri_uvw[:, 0, 1]
    half = r * n_uvw.norm(dim=1) / n_uvw[:, 2].abs()
    order = torch.stack([(axis + 1) % 3, (axis + 2) % 3, axis], dim=1)
    stride = torch.tensor([res * res, res, 1], device=tri.device)[order].T.contiguous()
    frame = None
    if cpu:  # local triangle-frame coordinates are affine in the voxel's (u, v, w) indices
        rot, shape = triangle_frames(tri)
        m_uvw = torch.gather(rot, 2, order[:, None, :].expand(-1, 3, -1)) * h  # (T,3 rows,3 uvw)
        origin = torch.einsum("tij,tj->ti", rot, c0 - tri[:, 0].double())
        frame = torch.cat([m_uvw[:, :, 0], m_uvw[:, :, 1], m_uvw[:, :, 2], origin, shape], 1)
        frame = frame.to(tri.dtype).T.contiguous()
    return _Tables(
        nu, torch.stack([i_lo[:, 0], i_lo[:, 1], i_hi[:, 1]]), torch.cat([la, lb, lc], 1).T.contiguous(),
        torch.stack([gu, gv, w0, half, i_lo[:, 2].to(tri.dtype), i_hi[:, 2].to(tri.dtype)]), frame, stride,
        candidate_counts(tri, res, band))


def _columns(tab: _Tables, s: int, e: int, res: int):
    """Columns of triangles s..e-1 near their projected triangle, with their slab: (triangle, iu, iv,
    first w, voxel count), only columns with a voxel.

    Each u row of a triangle's box keeps the v interval inside its three offset edge lines (scan
    conversion, in float64 with the index slack: never narrower than the lines)."""
    row_t, local = _expand(tab.rows[s:e])
    row_t += s
    if tab.kernels:
        from kernels.distance.scan import column_slabs, row_spans

        iu, iv_lo, ncol = row_spans(row_t, local, tab.row_i, tab.lines, res, _EPS)
        col_r, local = _expand(ncol)
        col_t, iu = row_t.index_select(0, col_r), iu.index_select(0, col_r)
        iv = iv_lo.index_select(0, col_r) + local
        return col_t, iu, iv, *column_slabs(col_t, iu, iv, tab.slab, res, _EPS)
    h = 2.0 / res
    c0 = -1.0 + 0.5 * h
    ri = tab.row_i.index_select(1, row_t)
    iu = ri[0] + local
    xu = c0 + iu.double() * h
    ln = tab.lines.index_select(1, row_t)
    bound = -(ln[0:3] * xu + ln[6:9]) / ln[3:6]  # v on each line; b > 0: v >= bound, b < 0: v <= bound
    upper = ln[3:6] < 0
    v_lo = torch.where(upper, -3.0, bound).amax(0)
    v_hi = torch.where(upper, bound, 3.0).amin(0)
    iv_lo = torch.maximum(ri[1], torch.ceil((v_lo.clamp(-3.0, 3.0) - c0) / h - _EPS).long())
    iv_hi = torch.minimum(ri[2], torch.floor((v_hi.clamp(-3.0, 3.0) - c0) / h + _EPS).long())
    col_r, local = _expand((iv_hi - iv_lo + 1).clamp(min=0))
    col_t, iu = row_t.index_select(0, col_r), iu.index_select(0, col_r)
    iv = iv_lo.index_select(0, col_r) + local
    ft = tab.slab.index_select(1, col_t)
    xu = c0 + iu.to(ft.dtype) * h
    xv = c0 + iv.to(ft.dtype) * h
    w_mid = ft[2] + ft[0] * xu + ft[1] * xv
    w_lo, w_hi = _index_range(w_mid - ft[3], w_mid + ft[3], h, 0.0, res)
    w_lo = torch.maximum(w_lo, ft[4].long())  # the triangle's own w range, dilated by r
    w_hi = torch.minimum(w_hi, ft[5].long())
    count = (w_hi - w_lo + 1).clamp(min=0)
    return col_t, iu, iv, w_lo, count


def _chunk_candidates(tri: torch.Tensor, tab: _Tables, s: int, e: int, res: int, band: float,
                      distance_backend: str, closest: bool = True):
    """Candidate pairs of triangles s..e-1, not yet unique: (key, d2 bits << 32 | owner) when `closest`,
    else (None, key << 32 | d2 bits); key >= _NONE where d2 is not below the band. owner is the int32
    word (triangle id << 3) | closest feature code."""
    col_t, iu, iv, w_lo, count = _columns(tab, s, e, res)
    if tab.frame is not None:
        return _frame_candidates(tab, col_t, iu, iv, w_lo, count, band * 2.0 / res, closest)
    # GPU: every voxel of every column in one kernel (distance, band test and packing fused).
    return column_candidates(tri, tab.stride, col_t, iu, iv, w_lo, count, res, band, closest, distance_backend)


def _mark_outside(key: torch.Tensor, d2: torch.Tensor, r: float) -> torch.Tensor:
    """Keys of pairs not below the band raised to _NONE or above (torch.where is 6x slower on the CPU)."""
    return key | ((d2 >= r * r).to(torch.int64) << 30)


def _frame_candidates(tab: _Tables, col_t, iu, iv, w_lo, count, r: float, closest: bool):
    """CPU: the columns grouped by voxel count c, each group a dense (c, columns) block whose fields
    broadcast along the column: no per-voxel gathers and every pass runs over contiguous rows."""
    dtype = tab.frame.dtype
    # Columns in order of their count (numpy's stable sort of bytes is a radix sort), so each group is
    # a slice of the tables gathered once.
    order = torch.from_numpy(np.argsort(count.clamp(max=255).to(torch.uint8).numpy(), kind="stable"))
    col_t, iu, iv, w_lo = (x.index_select(0, order) for x in (col_t, iu, iv, w_lo))
    sizes = torch.bincount(count).tolist()
    f = tab.frame.index_select(1, col_t)
    base = f[9:12] + f[0:3] * iu.to(dtype) + f[3:6] * iv.to(dtype)  # local coordinates at w = 0
    st = tab.stride.index_select(1, col_t)
    key0 = iu * st[0] + iv * st[1] + w_lo * st[2]
    if not closest:  # the words' key part, put together per column: one pass per voxel, not three
        key0, st = key0 << 32, st << 32
    w_f = w_lo.to(dtype)
    owner0 = col_t.to(torch.int32) << 3
    out, at = [], sizes[0]
    for c, n in enumerate(sizes[1:], start=1):
        if n == 0:
            continue
        g = slice(at, at + n)
        at += n
        iw = w_f[g] + torch.arange(c, dtype=dtype)[:, None]  # (c, n): the column's voxels along w
        x, y, z = (torch.addcmul(base[k, g], iw, f[6 + k, g]) for k in range(3))
        d2, feat = sqdist_in_frame(x, y, z, f[None, 12:18, g], with_feature=closest)
        key = torch.addcmul(key0[g], torch.arange(c)[:, None], st[2, g])
        if closest:
            key = _mark_outside(key, d2, r)
            out.append((key.reshape(-1), ((_bits(d2) << 32) | (owner0[g] | feat.to(torch.int32))).reshape(-1)))
        else:
            key |= _bits(d2) | ((d2 >= r * r).to(torch.int64) << 62)  # key >= _NONE outside the band
            out.append((None, key.reshape(-1)))
    if not out:
        return (torch.empty(0, dtype=torch.int64) if closest else None), torch.empty(0, dtype=torch.int64)
    words = torch.cat([w for _, w in out])
    return (torch.cat([k for k, _ in out]) if closest else None), words


def _bits(d2: torch.Tensor) -> torch.Tensor:
    """The float bits of d2 as int64: d2 >= 0, so they order like d2."""
    return d2.view(torch.int32).to(torch.int64)


def cuda_items(device: torch.device, item_bytes: int, floor: int, cap: int, share: float = 0.25) -> int:
    """How many items of `item_bytes` fit in `share` of the device's free memory (the driver's free
    bytes plus what PyTorch's allocator holds unused), within [floor, cap]."""
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return int(min(max(free * share // item_bytes, floor), cap))


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
    """Values of an int64 tensor sorted ascending, in place on the CPU (numpy's vectorized sort: 6x
    faster than an argsort, 8x than torch.sort); torch.sort on CUDA."""
    if x.is_cuda:
        return torch.sort(x).values
    x.numpy().sort()
    return x


def _nearest(packed: torch.Tensor) -> torch.Tensor:
    """Words key << 32 | d2 bits: one per key, its smallest, keys ascending and without _NONE."""
    packed = _sort(packed)
    if not packed.is_cuda:  # numpy: the same steps at a third of torch's cost
        p = packed.numpy()
        p = p[:np.searchsorted(p, _NONE << 32)]
        key = p >> 32
        first = np.ones(key.shape, dtype=bool)
        np.not_equal(key[1:], key[:-1], out=first[1:])
        return torch.from_numpy(p[first])
    key = packed >> 32
    first = torch.ones(key.shape, dtype=torch.bool, device=key.device)
    torch.ne(key[1:], key[:-1], out=first[1:])
    first &= key < _NONE  # the words outside the band sort last: dropped by the same compaction
    return packed.index_select(0, _where(first))


def _nearest_owner(key: torch.Tensor, word: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unique keys ascending, without _NONE, and the smallest word (d2 bits << 32 | owner) of each: the
    nearest pair, equal distances going to the lowest owner whatever the order of the input.

    The keys tagged with their position (key << bits | i) are sorted as plain values, then a
    segment minimum."""
    n = key.numel()
    bits = max(n - 1, 1).bit_length()
    if bits > 32:  # keys below 2^31 shifted by bits must stay below 2^63
        raise ValueError(f"{n:,} band candidates in one sort: over the 2^32 this packing holds")
    tagged = _sort((key << bits) | torch.arange(n, device=key.device))
    tagged = tagged[:int(torch.searchsorted(tagged, _NONE << bits))]
    ukey, seg = torch.unique_consecutive(tagged >> bits, return_inverse=True)
    best = torch.full(ukey.shape, torch.iinfo(torch.int64).max, dtype=torch.int64, device=key.device)
    best.scatter_reduce_(0, seg, word.index_select(0, tagged & ((1 << bits) - 1)), "amin")
    return ukey, best


def _morton_order(tri: torch.Tensor) -> torch.Tensor:
    """Triangles sorted along a Morton curve so a chunk covers a compact region (fewer duplicates)."""
    q = ((tri.mean(1) + 1) * 512).clamp(0, 1023).long()
    # bit b of axis d goes to bit 3b + d: each 10-bit coordinate spread to every third bit by shifts and
    # masks (a dozen tensor ops, where a loop over the 30 bits took 150 small kernels on the GPU)
    for shift, mask in ((16, 0x030000FF), (8, 0x0300F00F), (4, 0x030C30C3), (2, 0x09249249)):
        q = (q | (q << shift)) & mask
    return torch.argsort(q[:, 0] | (q[:, 1] << 1) | (q[:, 2] << 2))


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
    kernels = distance_backend == "triton" or (distance_backend == "auto" and tri.is_cuda)
    tab = _tables(tri, res, band, cpu=not (tri.is_cuda or kernels), kernels=kernels)
    keys, words = [], []
    chunks = list(_triangle_chunks(tab.counts, chunk))
    for s, e in chunks:
        k, w = _chunk_candidates(tri, tab, s, e, res, band, distance_backend, closest)
        # Chunks cover compact regions: de-duplicating each halves what the last sort sees.
        if closest:
            k, w = _nearest_owner(k, w)
            words.append(w)
        else:
            k = _nearest(w)
        keys.append(k)
        del w
    if not closest:  # one chunk: its words are already unique and sorted
        key, d2 = _halves(keys[0] if len(chunks) == 1 else _nearest(torch.cat(keys)))
        return BandPairs(key, d2.view(torch.float32), None, None)
    if len(chunks) == 1:
        key, word = keys[0], words[0]
    else:
        key, word = _nearest_owner(torch.cat(keys), torch.cat(words))
    del keys, words
    d2, owner = _halves(word)
    return BandPairs(key.to(torch.int32), d2.view(torch.float32), perm[(owner >> 3).long()], (owner & 7).to(torch.uint8))


def _halves(words: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) int32 halves of int64 words (little-endian: the low half comes first in memory)."""
    if words.is_cuda:
        pairs = words.view(torch.int32).view(-1, 2)
        return pairs[:, 1].contiguous(), pairs[:, 0].contiguous()
    pairs = words.numpy().view(np.int32).reshape(-1, 2)  # numpy's strided copy: 9x faster than shifts
    return torch.from_numpy(pairs[:, 1].copy()), torch.from_numpy(pairs[:, 0].copy())
