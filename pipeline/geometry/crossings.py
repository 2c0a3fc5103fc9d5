"""Where triangles of a soup pass through each other: the pairs and their intersection segments.

The sign (sign.py) carries the winding number from a probe at a triangle's
centroid to a voxel along the triangle's own face; it changes on that path only
where another triangle crosses the face. This module finds those crossings:
a grid hash of the triangles' boxes (cells of the median box size; boxes
over 64 cells are tested against every box instead) gives candidate pairs, and
the exact test is six segment/triangle crossings in float64 (each edge of one
triangle through the other), from sign-of-volume predicates that are
antisymmetric, so a segment through a shared edge is counted on one side only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_MAX_CELLS = 64  # a box covering more grid cells is tested against all boxes


def orient(a, b, c, d):
    """Six times the signed volume of (a, b, c, d): > 0 when d is below the plane of (a, b, c)."""
    return ((a - d) * torch.linalg.cross(b - d, c - d, dim=-1)).sum(-1)


def _edge_orient(p, q, u, w):
    """orient(p, q, u, w) computed with the edge's ends in one fixed (lexicographic) order and negated
    when swapped: the two triangles on an edge get exactly opposite values, so a segment passing
    by the edge is inside exactly one of them."""
    swap = (u[:, 0] > w[:, 0]) | ((u[:, 0] == w[:, 0]) & ((u[:, 1] > w[:, 1]) | ((u[:, 1] == w[:, 1]) & (u[:, 2] > w[:, 2]))))
    s = swap[:, None]
    o = orient(p, q, torch.where(s, w, u), torch.where(s, u, w))
    return torch.where(swap, -o, o)


def segment_crossing(p, q, v0, v1, v2):
    """(crosses, t) for segments p->q against triangles (v0, v1, v2), all (N,3) float64: crosses is
    True where the segment passes through the triangle's interior, t the parameter of the point."""
    op, oq = orient(v0, v1, v2, p), orient(v0, v1, v2, q)
    e0, e1, e2 = _edge_orient(p, q, v0, v1), _edge_orient(p, q, v1, v2), _edge_orient(p, q, v2, v0)
    same = ((e0 > 0) & (e1 > 0) & (e2 > 0)) | ((e0 < 0) & (e1 < 0) & (e2 < 0))
    crosses = same & (op * oq < 0)
    return crosses, op / torch.where(crosses, op - oq, torch.ones_like(op))


@dataclass
class Crossings:
    """Intersecting triangle pairs, listed once per triangle (CSR by the crossed triangle)."""

    start: torch.Tensor  # (F,) first row of each triangle
    count: torch.Tensor  # (F,) rows of each triangle
    other: torch.Tensor  # (P,) the crossing triangle
    seg: torch.Tensor  # (P,2,3) float64 ends of the intersection segment (in the crossed triangle)
    hard: torch.Tensor  # (F,) bool: a crossing the face walk cannot follow (touching, coplanar, near the probe)
    line: torch.Tensor | None = None  # (P,3) n x (L1 - L0) of the crossed face's normal n (set by the sign)
    g_side: torch.Tensor | None = None  # (P,) line . (centroid - L0)

    @property
    def crossed(self) -> torch.Tensor:
        return self.count > 0


def _candidate_pairs(lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """(K,2) pairs i < j whose boxes overlap (a superset is fine; it is filtered exactly later)."""
    dev = lo.device
    n = lo.shape[0]
    ext = (hi - lo).max(1).values
    size = float(ext.median().clamp_min(1e-6))
    ilo = torch.floor((lo + 1) / size).long()
    ihi = torch.floor((hi + 1) / size).long()
    span = ihi - ilo + 1
    ncell = span.prod(1)
    big = ncell > _MAX_CELLS
    small = (~big).nonzero().squeeze(1)
    # Every (triangle, cell) entry of the small boxes.
    owner = torch.repeat_interleave(small, ncell[small])
    first = torch.cumsum(ncell[small], 0) - ncell[small]
    local = torch.arange(owner.numel(), device=dev) - torch.repeat_interleave(first, ncell[small])
    sp = span[owner]
    off = torch.stack([local // (sp[:, 1] * sp[:, 2]), (local // sp[:, 2]) % sp[:, 1], local % sp[:, 2]], 1)
    cell = ilo[owner] + off
    g = int(ihi.max()) + 2
    key = (cell[:, 0] * g + cell[:, 1]) * g + cell[:, 2]
    order = torch.argsort(key)
    key, owner = key[order], owner[order]
    run_start = torch.ones_like(key, dtype=torch.bool)
    run_start[1:] = key[1:] != key[:-1]
    run_id = torch.cumsum(run_start.long(), 0) - 1
    starts = run_start.nonzero().squeeze(1)
    ends = torch.cat([starts[1:], torch.tensor([key.numel()], device=dev)])
    pos = torch.arange(key.numel(), device=dev)
    after = ends[run_id] - pos - 1  # later entries of the same cell
    a = torch.repeat_interleave(pos, after)
    firsts = torch.cumsum(after, 0) - after
    b = a + 1 + torch.arange(a.numel(), device=dev) - torch.repeat_interleave(firsts, after)
    pairs = [torch.stack([owner[a], owner[b]], 1)]
    bigs = big.nonzero().squeeze(1)
    for s in range(0, bigs.numel(), max(1, (1 << 22) // max(n, 1))):
        bi = bigs[s : s + max(1, (1 << 22) // max(n, 1))]
        ok = ((lo[None] <= hi[bi][:, None]) & (lo[bi][:, None] <= hi[None])).all(2)
        i, j = ok.nonzero().unbind(1)
        pairs.append(torch.stack([bi[i], j], 1))
    p = torch.cat(pairs)
    p = torch.stack([p.min(1).values, p.max(1).values], 1)
    p = p[p[:, 0] != p[:, 1]]
    p = torch.unique(p[:, 0] * n + p[:, 1])
    p = torch.stack([p // n, p % n], 1)
    i, j = p.unbind(1)
    return p[((lo[i] <= hi[j]) & (lo[j] <= hi[i])).all(1)]


def _straddle(t, i, j, shared_j, eps: float = 1e-12):
    """False where the vertices of triangle j not shared with i lie strictly on one side of i's plane
    (then j meets i at most in their shared vertex): most pairs of a smooth surface, dropped before
    the six exact tests."""
    n = torch.linalg.cross(t[i, 1] - t[i, 0], t[i, 2] - t[i, 0], dim=1)
    side = ((t[j] - t[i, 0][:, None]) * n[:, None]).sum(2)  # (K,3)
    tol = eps * n.norm(dim=1, keepdim=True)
    above = (side > tol) | shared_j
    below = (side < -tol) | shared_j
    return ~(above.all(1) | below.all(1))


@torch.no_grad()
def triangle_crossings(tri: torch.Tensor, faces: torch.Tensor, probe_offset: float) -> Crossings:
    """Pairs of triangles (F,3,3) that pass through each other; faces (F,3) tell shared vertices."""
    dev = tri.device
    n = tri.shape[0]
    t = tri.double()
    lo, hi = t.min(1).values, t.max(1).values
    pairs = _candidate_pairs(lo, hi)
    f = faces.long()
    i, j = pairs.unbind(1)
    same = f[i][:, :, None] == f[j][:, None, :]
    shared = same.sum((1, 2))
    hard = torch.zeros(n, dtype=torch.bool, device=dev)
    # Triangles on one edge meet along it. One folded back so far over the other that it passes
    # between that face and its probe breaks the probe's value: both hard.
    e2 = (shared == 2).nonzero().squeeze(1)
    if e2.numel():  # both ways round in one batch
        x, y = torch.cat([i[e2], j[e2]]), torch.cat([j[e2], i[e2]])
        nx = torch.linalg.cross(t[x, 1] - t[x, 0], t[x, 2] - t[x, 0], dim=1)
        reach = 2 * probe_offset * nx / nx.norm(dim=1, keepdim=True).clamp_min(1e-300)
        g = t[x].mean(1)
        folded, _ = segment_crossing(g - reach, g + reach, t[y, 0], t[y, 1], t[y, 2])
        hard[x[folded]] = True
        hard[y[folded]] = True
    keep = (shared < 2) & _straddle(t, i, j, same.any(1)) & _straddle(t, j, i, same.any(2))
    i, j, shared, corner = i[keep], j[keep], shared[keep], same.any(2)[keep].int().argmax(1)
    # Edges of x through the face of y, for (x, y) = (i, j) then (j, i), edges ab, bc, ca: the six tests
    # of every pair in one batch (elementwise, so the same values as one call per edge).
    tx, ty = t[torch.cat([i, j])], t[torch.cat([j, i])]  # (2K,3,3)
    p, q = tx, tx[:, [1, 2, 0]]
    tv = ty[:, None].expand(-1, 3, -1, -1)
    c, s = segment_crossing(p.reshape(-1, 3), q.reshape(-1, 3), tv[:, :, 0].reshape(-1, 3),
                            tv[:, :, 1].reshape(-1, 3), tv[:, :, 2].reshape(-1, 3))
    k = i.numel()
    hits = c.view(2, k, 3).permute(1, 0, 2).reshape(k, 6)  # (K,6)
    pts = (p + (q - p) * s.view(-1, 3)[..., None]).view(2, k, 3, 3).permute(1, 0, 2, 3).reshape(k, 6, 3)
    nhit = hits.sum(1)
    # A proper crossing of two triangles pierces exactly two edges; two triangles that share a vertex
    # and fold through each other (noisy scans) pierce one, the segment running from that vertex.
    # Anything else touches or is coplanar.
    any_hit = nhit > 0
    fold = (shared == 1) & (nhit == 1)
    proper = ((shared == 0) & (nhit == 2)) | fold
    first = torch.argmax(hits.int(), 1)
    last = 5 - torch.argmax(hits.flip(1).int(), 1)
    rows = torch.arange(hits.shape[0], device=dev)
    start = torch.where(fold[:, None], t[i, corner], pts[rows, first])
    seg = torch.stack([start, pts[rows, last]], 1)
    bad = any_hit & ~proper
    hard[i[bad]] = True
    hard[j[bad]] = True
    i, j, seg = i[proper], j[proper], seg[proper]
    crossed, other = torch.cat([i, j]), torch.cat([j, i])
    seg = torch.cat([seg, seg])
    # The probe sits probe_offset off the centroid; a crossing between the face and it breaks the walk.
    nrm = torch.linalg.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0], dim=1)
    nrm = nrm / nrm.norm(dim=1, keepdim=True).clamp_min(1e-300)
    g = t[crossed].mean(1)
    reach = 2 * probe_offset * nrm[crossed]
    o = t[other]
    near_probe, _ = segment_crossing(g - reach, g + reach, o[:, 0], o[:, 1], o[:, 2])
    hard[crossed[near_probe]] = True
    order = torch.argsort(crossed, stable=True)
    crossed, other, seg = crossed[order], other[order], seg[order]
    count = torch.bincount(crossed, minlength=n)
    return Crossings(torch.cumsum(count, 0) - count, count, other, seg, hard)
