"""Inside/outside for band voxels: inside means generalized winding number w >= 0.5, made certain.

Rule (docs/sdf.md, "Sign"): every closed, consistently oriented component whose
signed volume is negative is flipped first; then a voxel is inside when the
winding number of the whole (re-oriented) soup is >= 0.5. How it is evaluated:

- every edge's faces cancel (closed parts, however they nest, overlap, fold or pass
  through themselves): w is an integer off the surface, the signed count of the
  crossings on the +z ray from the voxel. All band voxels of a grid column share
  one line, so each triangle's (x, y) projection is scan-converted onto the lines
  it covers once, with edge predicates that agree exactly between the two faces
  of an edge (winding.LineCrossings); a voxel's count is a look-up in that list.
- a boundary chain remains (open surfaces): w at one probe just off each face's
  centroid (winding.py, exact: ray crossings plus a cap over the boundary),
  carried to the voxel along the path voxel -> closest point -> across the face
  to the centroid. That path crosses no surface on its first leg (the closest
  point is the nearest surface point) and, on the second, only the triangles that
  pass through the face (crossings.py): each adds +-1, counted exactly. Along the
  path w changes otherwise only through the boundary chain: |grad w| <= sum |e| /
  (4 pi dist^2) over its edges (w is the potential of a current on the boundary,
  Biot-Savart), so the drift is bounded per face. Where the drift bound does not
  decide the side, or the closest feature touches an edge the pseudo-normal
  cannot judge, w is evaluated exactly at the voxel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.distance import EDGE_AB, EDGE_BC, EDGE_CA, FACE, VERT_A, VERT_B, VERT_C
from kernels.distance.reference import point_triangle_offset_reference
from pipeline.geometry.crossings import Crossings, triangle_crossings
from pipeline.geometry import winding
from pipeline.geometry.winding import LineCrossings, WindingNumber, _expand

WINDING_THRESHOLD = 0.5  # inside iff w >= 0.5: a hole is closed by its minimal cap, a lone sheet is outside
_PROBE_OFFSET = 1e-4  # probe distance off a face, in normalized units (far below a 1024^3 voxel, 2e-3)
_CELLS = 16  # grid of boundary-edge clusters for the drift bound
_LINES_FROM = 0.01  # exact w at voxels along grid lines when more than this share of the band needs it
_ROUNDING = 1e-6  # exact w up to float64 rounding and the rays' 1e-9 start shift (|grad w| < 1e3 at a probe)


@dataclass
class MeshTopology:
    """Per-face and per-edge adjacency facts the sign needs."""

    face_edges: torch.Tensor  # (F,3) edge id of edges ab, bc, ca
    edge_faces: torch.Tensor  # (E,) number of faces on each edge
    good_edge: torch.Tensor  # (E,) bool: exactly two faces, opposite directions (pseudo-normal holds)
    chain: torch.Tensor  # (E,) int: faces along lo->hi minus faces along hi->lo (nonzero: boundary chain)
    edge_vertices: torch.Tensor  # (E,2) lo, hi vertex ids
    labels: torch.Tensor  # (F,) component id (smallest face index of the component)
    closed: bool  # every edge good
    components: int  # connected components through shared edges
    open_chain: bool  # some edge's faces do not cancel (a boundary chain: w is not an integer everywhere)


def mesh_topology(faces: torch.Tensor, num_vertices: int) -> MeshTopology:
    """Edge table, boundary chain and components, on the faces' device (no host round trip on CUDA)."""
    f = faces.long()
    src = f.reshape(-1)
    dst = f[:, [1, 2, 0]].reshape(-1)
    lo, hi = torch.minimum(src, dst), torch.maximum(src, dst)
    und, inv, cnt = torch.unique(lo * num_vertices + hi, return_inverse=True, return_counts=True)
    fwd = torch.zeros_like(cnt).index_add_(0, inv, (src < dst).long())
    chain = 2 * fwd - cnt
    good = (cnt == 2) & (chain == 0)
    face_edges = inv.reshape(-1, 3)
    labels = component_labels(face_edges, und.numel())
    closed, components, open_chain = torch.stack([
        good.all(), (labels == torch.arange(f.shape[0], device=f.device)).sum(), (chain != 0).any()]).tolist()
    return MeshTopology(face_edges, cnt, good, chain, torch.stack([und // num_vertices, und % num_vertices], 1),
                        labels, bool(closed), int(components), bool(open_chain))


def count_components(face_edges: torch.Tensor, num_edges: int) -> int:
    labels = component_labels(face_edges, num_edges)
    return int((labels == torch.arange(labels.numel(), device=labels.device)).sum())


def component_labels(face_edges: torch.Tensor, num_edges: int) -> torch.Tensor:
    """Component of each face through shared edges: hook roots to the smallest neighbouring root, then
    jump pointers to the roots, until nothing changes (Shiloach-Vishkin style)."""
    n = face_edges.shape[0]
    dev = face_edges.device
    parent = torch.arange(n, device=dev)
    flat = face_edges.reshape(-1)
    while True:
        edge_min = torch.full((num_edges,), n, device=dev).scatter_reduce_(0, flat, parent.repeat_interleave(3), "amin")
        low = edge_min[face_edges].amin(1)  # smallest root among the faces sharing an edge with each face
        hooked = parent.scatter_reduce(0, parent, low, "amin")  # roots only: every face points at a root here
        while True:  # pointer jumping: depth halves each step; checked every third step (one host read)
            for _ in range(3):
                hooked = hooked[hooked]
            nxt = hooked[hooked]
            if torch.equal(nxt, hooked):
                break
            hooked = nxt
        if torch.equal(hooked, parent):
            return parent
        parent = hooked


def orient_components(tri: torch.Tensor, faces: torch.Tensor, topo: MeshTopology):
    """Faces with every closed, consistently oriented component of negative signed volume flipped,
    and how many were flipped. Open or inconsistent components keep their faces."""
    dev = faces.device
    n = faces.shape[0]
    bad_face = (~topo.good_edge)[topo.face_edges.to(dev)].any(1)
    lab = topo.labels.to(dev)
    comp_bad = torch.zeros(n, dtype=torch.long, device=dev).index_add_(0, lab, bad_face.long()) > 0
    t = tri.double()
    vol6 = (t[:, 0] * torch.linalg.cross(t[:, 1], t[:, 2], dim=1)).sum(1)
    comp_vol = torch.zeros(n, dtype=torch.float64, device=dev).index_add_(0, lab, vol6)
    flip_comp = (~comp_bad) & (comp_vol < 0)
    flip = flip_comp[lab]
    flips = int(flip_comp.sum())
    if flips == 0:
        return faces, 0
    return torch.where(flip[:, None], faces[:, [0, 2, 1]], faces), flips


def pseudo_normals(tri: torch.Tensor, topo: MeshTopology, faces: torch.Tensor, num_vertices: int):
    """Unit face normals, edge normals (sum of adjacent face normals), angle-weighted vertex normals."""
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1)
    fn = n / n.norm(dim=1, keepdim=True).clamp_min(1e-30)
    fe = topo.face_edges.to(tri.device)
    en = torch.zeros(int(topo.edge_faces.numel()), 3, dtype=tri.dtype, device=tri.device)
    en.index_add_(0, fe.reshape(-1), fn.repeat_interleave(3, dim=0))
    vn = torch.zeros(num_vertices, 3, dtype=tri.dtype, device=tri.device)
    for k in range(3):
        e1 = tri[:, (k + 1) % 3] - tri[:, k]
        e2 = tri[:, (k + 2) % 3] - tri[:, k]
        cos = (e1 * e2).sum(1) / (e1.norm(dim=1) * e2.norm(dim=1)).clamp_min(1e-30)
        angle = torch.arccos(cos.clamp(-1, 1))
        vn.index_add_(0, faces[:, k].long(), angle[:, None] * fn)
    return fn, en, vn


# Feature code -> vertex slot of a point on the feature (the plane's anchor).
_ANCHOR = torch.tensor([0, 0, 1, 2, 0, 1, 2])
assert (FACE, EDGE_AB, EDGE_BC, EDGE_CA, VERT_A, VERT_B, VERT_C) == tuple(range(7))


def feature_planes(tri, faces, normals, topo) -> torch.Tensor:
    """(4, F*7) rows: pseudo-normal n of each (face, feature code) and n . anchor, for one gather per voxel."""
    fn, en, vn = normals
    dev = tri.device
    normal = torch.empty(tri.shape[0], 7, 3, dtype=tri.dtype, device=dev)
    normal[:, FACE] = fn
    fe = topo.face_edges.to(dev)
    for code, slot in ((EDGE_AB, 0), (EDGE_BC, 1), (EDGE_CA, 2)):
        normal[:, code] = en[fe[:, slot]]
    for code, slot in ((VERT_A, 0), (VERT_B, 1), (VERT_C, 2)):
        normal[:, code] = vn[faces[:, slot].long()]
    anchor = tri[:, _ANCHOR.to(dev)]  # (F,7,3)
    return torch.cat([normal, (normal * anchor).sum(2, keepdim=True)], 2).reshape(-1, 4).T.contiguous()


def feature_side(points, planes, tri_id, feature):
    """+1 where the point is on the outer side of its closest feature's pseudo-normal, -1 on the inner."""
    row = planes.index_select(1, tri_id * 7 + feature.long())
    dot = points[:, 0] * row[0] + points[:, 1] * row[1] + points[:, 2] * row[2] - row[3]
    return torch.where(dot < 0, -1.0, 1.0).to(points.dtype)


def open_features(faces, topo, num_vertices) -> torch.Tensor:
    """(F*7,) True where a (face, feature code) is, or touches, an edge the pseudo-normal cannot judge."""
    dev = faces.device
    fe = topo.face_edges.to(dev)
    open_edge = (~topo.good_edge).to(dev)
    f = faces.long()
    # A vertex is open when any edge around it is.
    open_vert = torch.zeros(num_vertices, dtype=torch.bool, device=dev)
    for k in range(3):
        oe = open_edge[fe[:, k]]
        open_vert[f[oe, k]] = True
        open_vert[f[oe, (k + 1) % 3]] = True
    table = torch.zeros(f.shape[0], 7, dtype=torch.bool, device=dev)
    for code, slot in ((EDGE_AB, 0), (EDGE_BC, 1), (EDGE_CA, 2)):
        table[:, code] = open_edge[fe[:, slot]]
    for code, slot in ((VERT_A, 0), (VERT_B, 1), (VERT_C, 2)):
        table[:, code] = open_vert[f[:, slot]]
    return table.reshape(-1)




def _point_segment_distance(p, a, b):
    ab = b - a
    s = (((p - a) * ab).sum(-1) / (ab * ab).sum(-1).clamp_min(1e-300)).clamp(0, 1)
    return (p - a - s[..., None] * ab).norm(dim=-1)


@dataclass
class BoundaryChain:
    """Edges whose faces do not cancel, with multiplicity-weighted lengths, clustered on a 16^3 grid."""

    ends: torch.Tensor  # (B,2,3) float64, sorted by cluster
    weight: torch.Tensor  # (B,) |chain| * length
    mult: torch.Tensor  # (B,) float64 chain multiplicity along ends[:, 0] -> ends[:, 1]
    center: torch.Tensor  # (C,3) cluster centres
    radius: torch.Tensor  # (C,) reach of the cluster's edges from its centre
    length: torch.Tensor  # (C,) summed weight
    start: torch.Tensor  # (C,) first edge of each cluster
    count: torch.Tensor  # (C,)


def boundary_chain(v: torch.Tensor, topo: MeshTopology) -> BoundaryChain | None:
    """None when every edge's faces cancel (w is an integer off the surface)."""
    on = (topo.chain != 0).nonzero().squeeze(1).to(v.device)
    if on.numel() == 0:
        return None
    ends = v.double()[topo.edge_vertices.to(v.device)[on]]  # (B,2,3)
    mult = topo.chain.to(v.device)[on].double()
    weight = mult.abs() * (ends[:, 1] - ends[:, 0]).norm(dim=1)
    cell = ((ends.mean(1) + 1) * (_CELLS / 2)).floor().clamp(0, _CELLS - 1).long()
    key = (cell[:, 0] * _CELLS + cell[:, 1]) * _CELLS + cell[:, 2]
    order = torch.argsort(key)
    ends, weight, mult, key = ends[order], weight[order], mult[order], key[order]
    _, inv, count = torch.unique_consecutive(key, return_inverse=True, return_counts=True)
    c = count.numel()
    length = torch.zeros(c, dtype=torch.float64, device=v.device).index_add_(0, inv, weight)
    center = torch.zeros(c, 3, dtype=torch.float64, device=v.device).index_add_(0, inv, ends.mean(1)) / count[:, None]
    reach = (ends - center[inv][:, None]).norm(dim=2).max(1).values
    radius = torch.zeros(c, dtype=torch.float64, device=v.device).scatter_reduce_(0, inv, reach, "amax")
    return BoundaryChain(ends, weight, mult, center, radius, length, torch.cumsum(count, 0) - count, count)


def drift_bound(chain: BoundaryChain, centroid: torch.Tensor, reach: torch.Tensor, budget: int | None = None):
    """Per face: bound on |w(voxel) - w(probe)| from the boundary chain, for paths of length <= reach
    that stay within reach of the centroid (inf where the chain comes that close)."""
    f, c = centroid.shape[0], chain.center.shape[0]
    out = torch.zeros(f, dtype=torch.float64, device=centroid.device)
    step = max(1, (budget or winding.pair_budget(centroid.device)) // c)
    for s in range(0, f, step):
        g, R = centroid[s : s + step], reach[s : s + step]
        gap = (g[:, None] - chain.center[None]).norm(dim=2) - R[:, None] - chain.radius[None]  # (T,C)
        far = gap > chain.radius[None]
        total = torch.where(far, chain.length[None] / gap.clamp_min(1e-300) ** 2, 0.0).sum(1)
        ti, ci = (~far).nonzero().unbind(1)
        owner, e = _expand(chain.count[ci], chain.start[ci])
        t = ti[owner]
        d = _point_segment_distance(g[t], chain.ends[e, 0], chain.ends[e, 1]) - R[t]
        near = torch.where(d > 0, chain.weight[e] / d.clamp_min(1e-300) ** 2, torch.inf)
        total.index_add_(0, t, near)
        out[s : s + step] = R * total / (4 * torch.pi)
    return out


def drift_bound_fine(chain: BoundaryChain, centroid: torch.Tensor, reach: torch.Tensor, budget: int | None = None):
    """A tighter drift bound for the faces where `drift_bound` does not decide: the gradient of w at the
    centroid exactly (Biot-Savart of each straight boundary edge in closed form, so the two sides of
    a slot cancel) plus its change within reach: |grad w(x) - grad w(g)| <= |x - g| sum 4|e| /
    (4 pi d^3) (the kernel's Jacobian has norm <= 4 / d^3)."""
    f, b = centroid.shape[0], chain.ends.shape[0]
    out = torch.empty(f, dtype=torch.float64, device=centroid.device)
    step = max(1, (budget or winding.pair_budget(centroid.device)) // b)
    for s in range(0, f, step):
        g, R = centroid[s : s + step, None], reach[s : s + step]
        a, c = chain.ends[None, :, 0] - g, chain.ends[None, :, 1] - g
        la, lc = a.norm(dim=2), c.norm(dim=2)
        fac = chain.mult[None] * (la + lc) / (la * lc * (la * lc + (a * c).sum(2))).clamp_min(1e-300)
        grad = (torch.linalg.cross(a, c, dim=2) * fac[..., None]).sum(1).norm(dim=1) / (4 * torch.pi)
        d = _point_segment_distance(g, chain.ends[None, :, 0], chain.ends[None, :, 1]) - R[:, None]
        hess = torch.where(d > 0, chain.weight[None] / d.clamp_min(1e-300) ** 3, torch.inf).sum(1) / torch.pi
        out[s : s + step] = R * grad + R * R * hess
    return out


@dataclass
class SignPrep:
    """Everything the sign needs that depends on the mesh alone, so resolutions can share it."""

    method: str  # "lines" (w an integer), "winding" (open soups), "pseudonormal" or "none"
    planes: torch.Tensor | None = None  # feature_planes(...) table
    side_values: torch.Tensor | None = None  # (F,2) winding number outside / inside each face (winding path)
    side_err: torch.Tensor | None = None  # (F,) bound on the probe values' error
    open_table: torch.Tensor | None = None  # open_features(...) table (winding path)
    winding: WindingNumber | None = None
    crossings: Crossings | None = None
    chain: BoundaryChain | None = None
    tri64: torch.Tensor | None = None  # (F,3,3) float64 triangles
    centroid: torch.Tensor | None = None  # (F,3) float64
    normal: torch.Tensor | None = None  # (F,3) float64 unit normals
    rho: torch.Tensor | None = None  # (F,) farthest vertex from the centroid
    flipped: int = 0  # components turned outward
    _drift: dict | None = None  # band half-width -> (F,) drift bound

    def drift(self, reach: float) -> torch.Tensor:
        self._drift = self._drift or {}
        if reach not in self._drift:
            self._drift[reach] = drift_bound(self.chain, self.centroid, self.rho + reach + _PROBE_OFFSET)
        return self._drift[reach]


def prepare_sign(method: str, tri: torch.Tensor, faces: torch.Tensor, vertices: torch.Tensor):
    """(SignPrep, triangles): components turned outward, topology, pseudo-normal planes and, unless the
    mesh is one closed component that crosses itself nowhere, the winding data. `faces` index the
    welded `vertices`; the returned triangles carry the re-oriented vertex order."""
    if method == "none":
        return SignPrep(method), tri
    nv = vertices.shape[0]
    topo = mesh_topology(faces, nv)
    flips = 0
    if method == "winding":
        faces, flips = orient_components(tri, faces, topo)
        if flips:
            tri = vertices[faces]
            topo = mesh_topology(faces, nv)
    t = tri.double()
    if method == "winding" and not topo.open_chain:
        # Every edge's faces cancel (closed parts, however they overlap, nest or pass through
        # themselves): w is an integer off the surface, the signed count of crossings on the +z ray
        # from the voxel, counted once per grid line for all its voxels (winding.LineCrossings).
        return SignPrep("lines", tri64=t, flipped=flips), tri
    planes = feature_planes(tri, faces, pseudo_normals(tri, topo, faces, nv), topo)
    if method == "pseudonormal":
        return SignPrep("pseudonormal", planes), tri
    cross = triangle_crossings(tri, faces, _PROBE_OFFSET)
    n = torch.linalg.cross(t[:, 1] - t[:, 0], t[:, 2] - t[:, 0], dim=1)
    n = n / n.norm(dim=1, keepdim=True).clamp_min(1e-300)
    g = t.mean(1)
    chain = boundary_chain(vertices, topo)
    on = (topo.chain != 0).nonzero().squeeze(1).to(tri.device)
    wn = WindingNumber(t, vertices.double()[topo.edge_vertices.to(tri.device)[on]], topo.chain.to(tri.device)[on])
    probe = g + _PROBE_OFFSET * n
    outer = wn(probe)
    # Crossing a face against its normal adds one: w just inside = w just outside + 1. The probe's
    # offset from the face is part of the path the drift bound covers.
    inner = outer + 1
    err = torch.full_like(outer, _ROUNDING)
    rho = (t - g[:, None]).norm(dim=2).max(1).values
    crossed_face = torch.repeat_interleave(torch.arange(t.shape[0], device=t.device), cross.count)
    cross.line = torch.linalg.cross(n[crossed_face], cross.seg[:, 1] - cross.seg[:, 0], dim=1)
    cross.g_side = (cross.line * (g[crossed_face] - cross.seg[:, 0])).sum(1)
    # The pseudo-normal of an edge or vertex judges the side only where the faces around it do not pass
    # through each other; voxels closest to such a feature of a crossed face are evaluated exactly.
    fold_vertex = torch.zeros(nv, dtype=torch.bool, device=faces.device)
    fold_vertex[faces[cross.crossed | cross.hard].reshape(-1)] = True
    fold = fold_vertex[faces.long()]  # (F,3)
    fold_table = torch.stack([torch.zeros_like(fold[:, 0]), fold[:, 0] | fold[:, 1], fold[:, 1] | fold[:, 2],
                              fold[:, 2] | fold[:, 0], fold[:, 0], fold[:, 1], fold[:, 2]], 1).reshape(-1)
    open_table = open_features(faces, topo, nv) | fold_table
    return SignPrep(method, planes, torch.stack([outer, inner], 1), err, open_table, wn,
                    cross, chain, t, g, n, rho, flips), tri


def _walk_crossings(prep: SignPrep, points: torch.Tensor, tri_id: torch.Tensor, piece: int = 1 << 18):
    """Signed crossings met walking from each voxel's closest point across its face to the centroid.

    In the face's plane (normal n) the walk c -> g crosses the intersection segment L0 -> L1 when
    each pair of ends lies on opposite sides of the other's line; with m = n x (L1 - L0) and
    k = n x (g - c) those sides are the signs of m.(c - L0), m.(g - L0), k.(L0 - c), k.(L1 - c).
    """
    cr = prep.crossings
    out = torch.zeros(points.shape[0], dtype=torch.float64, device=points.device)
    for s in range(0, points.shape[0], piece):
        t = tri_id[s : s + piece]
        tri = prep.tri64[t]
        p = points[s : s + piece].double()
        diff, _ = point_triangle_offset_reference(p, tri[:, 0], tri[:, 1], tri[:, 2])
        c = p - diff
        d = prep.centroid[t] - c
        k = torch.linalg.cross(prep.normal[t], d, dim=1)
        owner, row = _expand(cr.count[t], cr.start[t])
        cx, cy, cz = c[owner].unbind(1)
        kx, ky, kz = k[owner].unbind(1)
        l0, l1 = cr.seg[row, 0], cr.seg[row, 1]
        m = cr.line[row]  # n x (L1 - L0)
        g_side = cr.g_side[row]  # m . (g - L0), fixed per row
        c_side = m[:, 0] * (cx - l0[:, 0]) + m[:, 1] * (cy - l0[:, 1]) + m[:, 2] * (cz - l0[:, 2])
        o1 = kx * (l0[:, 0] - cx) + ky * (l0[:, 1] - cy) + kz * (l0[:, 2] - cz)
        o2 = kx * (l1[:, 0] - cx) + ky * (l1[:, 1] - cy) + kz * (l1[:, 2] - cz)
        hit = (o1 * o2 < 0) & (c_side * g_side < 0)
        ns = prep.normal[cr.other[row]]
        dx, dy, dz = d[owner].unbind(1)
        # Leaving a surface along its normal lowers w by one: w(start) = w(centroid) + sum sign(d . n_s).
        step = torch.where(hit, torch.sign(dx * ns[:, 0] + dy * ns[:, 1] + dz * ns[:, 2]), 0.0)
        out[s : s + piece].index_add_(0, owner, step)
    return out


def band_signs(prep: SignPrep, points: torch.Tensor, tri_id: torch.Tensor, feature: torch.Tensor,
               reach: float, coords: torch.Tensor, resolution: int, lines=None) -> torch.Tensor:
    """-1 inside, +1 outside for band voxels (coords (N,3) sorted by (i, j, k), centres `points`), given
    each one's closest triangle and feature; reach is the band half-width (the farthest a voxel is
    from its closest point); lines ((i0, j0), (i1, j1)) bounds the voxels' columns when they come
    from a region; points may be None for the methods "none" and "lines" (float32 signs then)."""
    if prep.method == "none":
        return torch.ones(coords.shape[0], dtype=torch.float32, device=coords.device)
    if prep.method == "lines":
        w = LineCrossings(prep.tri64, resolution, lines)(coords)
        return torch.where(w >= 1, -1.0, 1.0).to(torch.float32)
    side = feature_side(points, prep.planes, tri_id, feature)
    if prep.method == "pseudonormal":
        return side
    w = prep.side_values[tri_id, (side < 0).long()]
    err = prep.side_err[tri_id] + prep.drift(reach)[tri_id]
    direct = prep.open_table.index_select(0, tri_id * 7 + feature.long()) | prep.crossings.hard[tri_id]
    walk = prep.crossings.crossed[tri_id] & ~direct
    if walk.any():
        idx = walk.nonzero().squeeze(1)
        w[idx] += _walk_crossings(prep, points[idx], tri_id[idx])
    unsure = (~direct & ((w - WINDING_THRESHOLD).abs() <= err)).nonzero().squeeze(1)
    if unsure.numel():
        faces, at = torch.unique(tri_id[unsure], return_inverse=True)
        fine = drift_bound_fine(prep.chain, prep.centroid[faces], prep.rho[faces] + reach + _PROBE_OFFSET)
        still = (w[unsure] - WINDING_THRESHOLD).abs() <= prep.side_err[tri_id[unsure]] + fine[at]
        direct[unsure[still]] = True
    if direct.any():
        idx = direct.nonzero().squeeze(1)
        # Counting along grid lines scan-converts every triangle once; a ray per voxel is cheaper for
        # a few voxels (a ray costs about as much as a hundred (triangle, line) tests).
        if idx.numel() > _LINES_FROM * points.shape[0]:
            w[idx] = prep.winding.on_grid(coords[idx], resolution, lines)
        else:
            w[idx] = prep.winding(points[idx])
    return torch.where(w >= WINDING_THRESHOLD, -1.0, 1.0).to(points.dtype)
