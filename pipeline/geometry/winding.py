"""Exact generalized winding number of a triangle soup, by crossings and a cap over its boundary.

w(q) = sum of the triangles' signed solid angles seen from q, over 4 pi (Jacobson et
al. 2013). Summing every triangle costs F per point; instead, with the soup's
boundary chain dS (edges whose faces do not cancel, with multiplicity), take the
cap C = the edges of dS swept to infinity along -x (strips from each edge to an
apex at x = -inf). S - C has no boundary, so its winding number is an integer:
the signed count of crossings of the ray from q along +x (the strips are
parallel to that ray, so it never meets them). Hence

    w_S(q) = sum over triangles the +x ray crosses of sign(n_x)  +  w_C(q),

w_C(q) = sum over boundary edges of their strip's solid angle (closed form,
Van Oosterom & Strackee 1983 with one vertex at infinity). Cost per point: the
triangles above it in a (y, z) grid, plus one term per boundary edge; none
on closed meshes. Ray starts are moved by at most 1e-9 so no ray runs inside the
plane of an edge. Everything is float64 and the crossing predicates are
computed once per edge (crossings.segment_crossing), so a ray through a
shared edge is counted on one side only.
"""

from __future__ import annotations

import torch

from pipeline.geometry.band import cuda_items
from pipeline.geometry.crossings import segment_crossing

_RAY_END = 4.0  # x of the ray's far end: beyond every vertex of a mesh in [-1, 1]^3
_MAX_CELLS = 256  # grid cells a triangle may be listed in before it is tested by every ray
_JITTER = 2e-9  # start of each ray moved by up to 1e-9 in y and z (see WindingNumber.__call__)


def solid_angle(q, a, b, c):
    """Signed solid angle of triangles (a,b,c) seen from q (Van Oosterom & Strackee 1983)."""
    a, b, c = a - q, b - q, c - q
    la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
    det = (a * torch.linalg.cross(b, c, dim=-1)).sum(-1)
    den = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
    return 2.0 * torch.atan2(det, den)


def strip_solid_angle(q, b, c, axis: int = 0, planar: bool = False):
    """Solid angle of the triangles (apex at -inf along `axis`, b, c) seen from points q: q (P,1,3), b
    and c (1,B,3) give (P,B). The apex enters as the direction u = -e_axis (the formula is homogeneous
    in each vertex); written per coordinate, since this is the open meshes' per-point loop. planar:
    also (P,) True where a point lies in the plane of one of its strips (the angle jumps there)."""
    k1, k2 = (axis + 1) % 3, (axis + 2) % 3
    b0, b1, b2 = (b[..., k] - q[..., k] for k in (axis, k1, k2))
    c0, c1, c2 = (c[..., k] - q[..., k] for k in (axis, k1, k2))
    lb = (b0 * b0 + b1 * b1 + b2 * b2).sqrt()
    lc = (c0 * c0 + c1 * c1 + c2 * c2).sqrt()
    det = b2 * c1 - b1 * c2  # u . (b x c)
    den = lb * lc - b0 * lc + (b0 * c0 + b1 * c1 + b2 * c2) - c0 * lb
    if planar:
        return 2.0 * torch.atan2(det, den), (det == 0).any(-1)
    return 2.0 * torch.atan2(det, den)


@torch.no_grad()
def winding_exact(points: torch.Tensor, tri: torch.Tensor, budget: int = 1 << 22) -> torch.Tensor:
    """float64 winding number of every point against every triangle (P*F solid angles, in pieces):
    the plain definition, for tests."""
    t = tri.double()
    out = torch.empty(points.shape[0], dtype=torch.float64, device=points.device)
    step = max(1, budget // max(1, t.shape[0]))
    for s in range(0, points.shape[0], step):
        q = points[s : s + step].double()[:, None]
        out[s : s + step] = solid_angle(q, t[None, :, 0], t[None, :, 1], t[None, :, 2]).sum(1) / (4 * torch.pi)
    return out


def _expand(counts: torch.Tensor, starts: torch.Tensor):
    """For ragged children: (owner row, child index) for every child of every row."""
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return owner, starts[owner] + torch.arange(owner.numel(), device=counts.device) - first[owner]


class WindingNumber:
    """Exact winding number of triangles (F,3,3) whose boundary chain is `edges` (B,2,3) with integer
    `multiplicity` (B,) (empty or None for a closed soup: then w is an integer)."""

    def __init__(self, tri: torch.Tensor, edges: torch.Tensor | None = None,
                 multiplicity: torch.Tensor | None = None):
        t = tri.double()
        dev = t.device
        self.tri = t
        self.sign_x = torch.sign(torch.linalg.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0], dim=1)[:, 0])
        self.x_max = t[:, :, 0].max(1).values
        self.edges = None if edges is None or edges.numel() == 0 else edges.double()
        self.mult = None if self.edges is None else multiplicity.double()
        # (y, z) grid over [-1, 1]^2; each triangle listed in every cell its box touches.
        g = int(min(1024, max(8, (t.shape[0] ** 0.5) * 0.7)))
        self.g = g
        lo = ((t[:, :, 1:].min(1).values + 1) * g / 2).floor().clamp(0, g - 1).long()
        hi = ((t[:, :, 1:].max(1).values + 1) * g / 2).floor().clamp(0, g - 1).long()
        span = hi - lo + 1
        n = span.prod(1)
        # A triangle over many cells (large faces of CAD or game assets) is tested by every ray instead,
        # so the table stays proportional to the faces.
        big = n > _MAX_CELLS
        self.big = big.nonzero().squeeze(1)
        n = torch.where(big, 0, n)
        owner = torch.repeat_interleave(torch.arange(t.shape[0], device=dev), n)
        local = torch.arange(owner.numel(), device=dev) - torch.repeat_interleave(torch.cumsum(n, 0) - n, n)
        cy = lo[owner, 0] + local // span[owner, 1]
        cz = lo[owner, 1] + local % span[owner, 1]
        cell = cy * g + cz
        order = torch.argsort(cell)
        self.cell_tri = owner[order]
        self.cell_count = torch.bincount(cell, minlength=g * g)
        self.cell_start = torch.cumsum(self.cell_count, 0) - self.cell_count

    @torch.no_grad()
    def on_grid(self, coords: torch.Tensor, resolution: int, lines=None, budget: int | None = None) -> torch.Tensor:
        """(N,) float64 winding numbers at voxel centres (coords (N,3) sorted by (i, j, k)): the
        crossings on the +z grid lines (LineCrossings) plus the boundary's strips swept to z = -inf.
        A voxel whose line lies in the vertical plane of a boundary edge (where its strip's angle jumps)
        takes the jittered +x ray of __call__ instead."""
        h = 2.0 / resolution
        p = -1 + (coords.double() + 0.5) * h
        out = LineCrossings(self.tri, resolution, lines)(coords).double()
        if self.edges is None:
            return out
        step = max(1, (budget or pair_budget(p.device)) // self.edges.shape[0])
        for s in range(0, p.shape[0], step):
            q = p[s : s + step, None]
            ang, on = strip_solid_angle(q, self.edges[None, :, 0], self.edges[None, :, 1], axis=2, planar=True)
            w = out[s : s + step] + (ang * self.mult[None]).sum(1) / (4 * torch.pi)
            if on.any():
                w[on] = self(p[s : s + step][on])
            out[s : s + step] = w
        return out

    @torch.no_grad()
    def __call__(self, points: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        """(P,) float64 winding numbers; budget: (point, triangle or edge) pairs at a time."""
        q = points.double().clone()
        budget = budget or pair_budget(q.device)
        # A ray along a grid line of a symmetric or CAD mesh can run inside the plane of an edge, where
        # no predicate decides; moving the start by 1e-9 in (y, z), a fixed pseudo-random amount, makes
        # that impossible and changes w only for points within 1e-9 of the surface.
        gen = torch.Generator().manual_seed(0x5D1)
        q[:, 1:] += ((torch.rand(q.shape[0], 2, generator=gen, dtype=torch.float64) - 0.5) * _JITTER).to(q.device)
        out = torch.zeros(q.shape[0], dtype=torch.float64, device=q.device)
        g = self.g
        cyz = ((q[:, 1:] + 1) * g / 2).floor().clamp(0, g - 1).long()
        cell = cyz[:, 0] * g + cyz[:, 1]
        nbig = self.big.numel()
        counts = self.cell_count[cell] + nbig
        # Pieces of about `budget` (point, triangle) pairs.
        csum = torch.cumsum(counts, 0)
        s = 0
        while s < q.shape[0]:
            base = int(csum[s - 1]) if s else 0
            e = max(s + 1, int(torch.searchsorted(csum, base + budget, right=True)))
            owner, idx = _expand(counts[s:e] - nbig, self.cell_start[cell[s:e]])
            tid = self.cell_tri[idx]
            if nbig:
                owner = torch.cat([owner, torch.arange(e - s, device=q.device).repeat_interleave(nbig)])
                tid = torch.cat([tid, self.big.repeat(e - s)])
            p = q[s:e][owner]
            keep = (self.x_max[tid] > p[:, 0]).nonzero().squeeze(1)
            owner, tid, p = owner[keep], tid[keep], p[keep]
            end = p.clone()
            end[:, 0] = _RAY_END
            t = self.tri[tid]
            hit, _ = segment_crossing(p, end, t[:, 0], t[:, 1], t[:, 2])
            out[s:e].index_add_(0, owner, torch.where(hit, self.sign_x[tid], 0.0))
            s = e
        if self.edges is not None:
            step = max(1, budget // self.edges.shape[0])
            for s in range(0, q.shape[0], step):
                p = q[s : s + step, None]
                ang = strip_solid_angle(p, self.edges[None, :, 0], self.edges[None, :, 1])
                out[s : s + step] += (ang * self.mult[None]).sum(1) / (4 * torch.pi)
        return out


# ---------- winding numbers of voxel centres along grid lines ----------
#
# Every band voxel of a column (i, j) lies on one grid line parallel to z; the +z rays of all of them
# run along it. So the crossings are found once per line, by scan-converting each triangle's (x, y)
# projection onto the lines it covers, and a voxel's ray count is a sum over the crossings above it.


def _edge_lines(t: torch.Tensor):
    """(A, B, C, tie), each (F,3), of the edges ab, bc, ca in the (x, y) plane: A px + B py + C is the
    side of p from the edge (> 0: left of it going along the triangle).

    The coefficients come from the edge's ends in one fixed (lexicographic) order and are negated when
    the triangle runs the other way, so the two triangles on an edge get exactly opposite values at
    every point. An exact zero (p on the edge's line) takes the sign `tie` it has for p moved by
    (eps, eps^2), so a line through an edge or a vertex is inside exactly one triangle of a closed fan.
    """
    u, w = t[:, :, :2], t[:, [1, 2, 0], :2]
    swap = (u[..., 0] > w[..., 0]) | ((u[..., 0] == w[..., 0]) & (u[..., 1] > w[..., 1]))
    a = torch.where(swap[..., None], w, u)
    d = torch.where(swap[..., None], u, w) - a
    flip = torch.where(swap, -1.0, 1.0).to(t.dtype)
    A, B = -d[..., 1], d[..., 0]
    C = d[..., 1] * a[..., 0] - d[..., 0] * a[..., 1]
    tie = torch.where(d[..., 1] != 0, -torch.sign(d[..., 1]), torch.sign(d[..., 0]))
    return A * flip, B * flip, C * flip, tie * flip


class LineCrossings:
    """Crossings of the z-parallel grid lines through voxel centres with a closed soup's triangles.

    Sorted by key = line * (R + 1) + k_c, with line = i * R + j and k_c the number of voxel centres on
    the line below the crossing; `after` holds, per crossing, the signed count (+1 where the triangle's
    normal points to +z) of it and every later crossing on its line: w of a voxel is `after` at the
    first crossing above it on its line (0 when there is none).
    """

    def __init__(self, tri: torch.Tensor, resolution: int, lines=None, budget: int | None = None):
        """tri (F,3,3) float64; lines ((i0, j0), (i1, j1)) limits the lines to that box (hi exclusive);
        budget: (triangle, line) pairs tested at once (about 100 bytes each)."""
        t = tri.double()
        dev = t.device
        budget = budget or _budget(dev)
        r = self.resolution = resolution
        h = 2.0 / r
        (i0, j0), (i1, j1) = lines if lines is not None else ((0, 0), (r, r))
        # The GPU runs each stage below as one Triton kernel (kernels.distance.lines; this is their
        # reference): the same float64 steps, so the same crossings.
        lines_k = _line_kernels() if t.is_cuda else None
        # Columns x_i under each triangle's x extent (a little slack: the exact test removes extras).
        x, y = t[:, :, 0], t[:, :, 1]
        if lines_k:
            t = t.contiguous()
            owner, col = _ragged(*lines_k.triangle_columns(t, r, i0, i1))
            r_lo, nrow = lines_k.column_rows(t, owner, col, r, j0, j1)
        else:
            c_lo = torch.ceil((x.min(1).values + 1) / h - 0.5 - 1e-6).clamp_min(i0).long()
            c_hi = torch.floor((x.max(1).values + 1) / h - 0.5 + 1e-6).clamp_max(i1 - 1).long()
            owner, col = _ragged(c_lo, (c_hi - c_lo + 1).clamp_min(0))
            px = -1 + (col.double() + 0.5) * h
            # Per (triangle, column): the rows whose line can pass through the triangle, and the edge
            # functions at x_i (the row's y is the one term left per line).
            ylo, yhi = _column_spans(x[owner], y[owner], px)
            empty = ~(ylo <= yhi)  # a slack column that no edge reaches
            ylo, yhi = torch.where(empty, 0.0, ylo), torch.where(empty, -1.0, yhi)
            r_lo = torch.ceil((ylo + 1) / h - 0.5 - 1e-6).clamp_min(j0).long()
            nrow = (torch.floor((yhi + 1) / h - 0.5 + 1e-6).clamp_max(j1 - 1).long() - r_lo + 1).clamp_min(0)
            A, B, C, tie = _edge_lines(t)
            base = A[owner] * px[:, None] + C[owner]  # (P,3)
        keys, signs = [], []
        csum = torch.cumsum(nrow, 0)
        pairs = int(csum[-1]) if nrow.numel() else 0
        s = 0
        while s < nrow.numel():  # pieces of about `budget` (triangle, line) pairs
            done = int(csum[s - 1]) if s else 0
            e = (nrow.numel() if pairs - done <= budget
                 else max(s + 1, int(torch.searchsorted(csum, done + budget, right=True))))
            rep, j = _ragged(r_lo[s:e], nrow[s:e], pairs - done if e == nrow.numel() else None)
            if lines_k:  # pairs that miss keep a key after every line's and sign 0: they count nowhere
                key, sign = lines_k.line_hits(t, owner[s:e], col[s:e], rep, j, r)
                keys.append(key)
                signs.append(sign)
                s = e
                continue
            tid = owner[s:e][rep]
            py = -1 + (j.double() + 0.5) * h
            o = base[s:e][rep] + B[tid] * py[:, None]
            side = torch.where(o == 0, tie[tid], o)
            pos, neg = (side > 0).all(1), (side < 0).all(1)
            hit = (pos | neg).nonzero().squeeze(1)
            o, tid, v = o[hit], tid[hit], t[tid[hit], :, 2]
            # Height of the crossing, barycentric: o(b->c) weighs a, o(c->a) weighs b, o(a->b) weighs c.
            den = o.sum(1)
            zc = torch.where(den != 0, (o[:, [1, 2, 0]] * v).sum(1) / torch.where(den != 0, den, 1.0), v.mean(1))
            below = torch.ceil((zc + 1) / h - 0.5).clamp(0, r).long()  # voxel centres strictly below it
            keys.append(((col[s:e][rep[hit]] * r + j[hit]) * (r + 1) + below))
            signs.append(torch.where(pos[hit], 1, -1))
            s = e
        key = torch.cat(keys) if keys else torch.empty(0, dtype=torch.long, device=dev)
        sign = torch.cat(signs) if signs else torch.empty(0, dtype=torch.long, device=dev)
        order = torch.argsort(key)
        self.keys, sign = key[order], sign[order]
        self.line = torch.div(self.keys, r + 1, rounding_mode="floor")
        # after[c] = sum of the signs from c to the end of its line: a suffix sum restarted per line.
        total = torch.cumsum(sign, 0)
        if self.line.is_cuda:  # the last crossing of each one's line: a binary search (a cummin scan is slow there)
            end = torch.searchsorted(self.line, self.line, right=True) - 1
        else:
            last = torch.ones_like(self.line, dtype=torch.bool)
            last[:-1] = self.line[1:] != self.line[:-1]
            idx = torch.arange(self.line.numel(), device=dev)
            end = torch.where(last, idx, self.line.numel()).flip(0).cummin(0).values.flip(0)
        self.after = total[end] - total + sign

    def __call__(self, coords: torch.Tensor, budget: int | None = None) -> torch.Tensor:
        """(N,) int64 winding numbers at voxel centres (N,3) sorted by (i, j, k): the signed crossings
        above each one on its line; `budget` voxels at a time."""
        r = self.resolution
        n = coords.shape[0]
        out = torch.zeros(n, dtype=torch.long, device=coords.device)
        if self.keys.numel() == 0:
            return out
        budget = budget or _budget(coords.device)
        # A last entry on no line stands for "no crossing above" past the end.
        line_of = torch.cat([self.line, self.line.new_full((1,), -1)])
        after = torch.cat([self.after, self.after.new_zeros(1)])
        for s in range(0, n, budget):
            c = coords[s : s + budget].long()
            line = c[:, 0] * r + c[:, 1]
            key = line * (r + 1) + c[:, 2]
            if key.is_cuda:  # the first crossing above each voxel by binary search: no host read
                first = torch.searchsorted(self.keys, key, right=True)
                out[s : s + budget] = torch.where(line_of[first] == line, after[first], 0)
                continue
            # Index of the first crossing above each voxel = the crossings at or below it: those before
            # this piece's first voxel, plus this piece's crossings placed among its sorted voxels.
            lo, hi = torch.searchsorted(self.keys, torch.stack([key[0], key[-1] + 1])).tolist()
            at = torch.searchsorted(key, self.keys[lo:hi])
            first = lo + torch.cumsum(torch.bincount(at, minlength=key.numel() + 1), 0)[:-1]
            out[s : s + budget] = torch.where(line_of[first] == line, after[first], 0)
        return out


def _line_kernels():
    from kernels.distance import lines  # Triton is imported only where it runs

    return lines


def pair_budget(device: torch.device) -> int:
    """(point, triangle or boundary edge) pairs evaluated at once: ~2M on the CPU (cache, peak memory); on
    CUDA what a quarter of the free memory holds at ~256 bytes a pair (up to 2^26), so an open mesh's
    strips and rays take a few pieces of ~50 kernels each instead of hundreds."""
    return 1 << 21 if device.type != "cuda" else cuda_items(device, 256, 1 << 21, 1 << 26)


def _budget(device: torch.device) -> int:
    # CPU: pieces that stay in cache and bound the peak (~100 MB). CUDA: what a quarter of the free memory
    # holds at ~100 bytes an item, so a line count is one piece (each piece costs ~30 kernels and reads).
    return 1 << 20 if device.type != "cuda" else cuda_items(device, 100, 1 << 23, 1 << 27)


def _ragged(start: torch.Tensor, count: torch.Tensor, total: int | None = None):
    """(owner, value) for the ranges start[i], ..., start[i] + count[i] - 1, in order; total: sum(count)
    when known (no host read for the output's size)."""
    owner = torch.repeat_interleave(torch.arange(count.numel(), device=count.device), count, output_size=total)
    first = torch.cumsum(count, 0) - count
    return owner, start[owner] + torch.arange(owner.numel(), device=count.device) - first[owner]


def _column_spans(x, y, xc):
    """[lo, hi] of y over each triangle's cut by the line x = xc (edges whose x range holds xc), with
    slack so rounding in the cut never drops a line; lo > hi where no edge reaches xc. The three edges
    side by side: (P,3) arrays, a dozen kernels on the GPU."""
    xb, yb = x[:, [1, 2, 0]], y[:, [1, 2, 0]]
    xc = xc[:, None]
    dx = xb - x
    flat = dx == 0
    tt = ((xc - x) / torch.where(flat, 1.0, dx)).clamp(0, 1)
    yc = y + tt * (yb - y)
    covers = (torch.minimum(x, xb) <= xc) & (xc <= torch.maximum(x, xb))
    lo = torch.where(covers, torch.where(flat, torch.minimum(y, yb), yc), torch.inf).amin(1)
    hi = torch.where(covers, torch.where(flat, torch.maximum(y, yb), yc), -torch.inf).amax(1)
    return lo - 1e-9, hi + 1e-9
