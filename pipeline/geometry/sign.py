"""Inside/outside for band voxels: angle-weighted pseudo-normals and the generalized winding number.

Definition: a point is inside when the generalized winding number w (Jacobson et
al. 2013) is >= 0.5. On a closed, consistently oriented, single-component mesh
w is 0 or 1, and at a band voxel the sign of (p - feature) . pseudo-normal of its
closest feature equals it exactly (Baerentzen & Aanaes 2005), so that case costs
nothing extra. On any other mesh (open, several shells, non-manifold) w is
evaluated: at one probe just off each triangle's centroid, the other side
following from the face's own solid angle (voxels inherit the value of their
closest triangle's side), and at the voxel itself
where its closest feature touches a boundary or non-manifold edge, where w
varies fastest. w is summed exactly for near triangles and by clusters' dipole
terms for far ones (Barill et al. 2018, first order).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kernels.distance import EDGE_AB, EDGE_BC, EDGE_CA, FACE, VERT_A, VERT_B, VERT_C

WINDING_THRESHOLD = 0.5  # inside iff w >= 0.5: a hole is closed by its minimal cap, a lone sheet is outside
_PROBE_OFFSET = 1e-4  # probe distance off a face, in normalized units (far below a 1024^3 voxel, 2e-3)


@dataclass
class MeshTopology:
    """Per-face and per-edge adjacency facts the sign needs."""

    face_edges: torch.Tensor  # (F,3) edge id of edges ab, bc, ca
    edge_faces: torch.Tensor  # (E,) number of faces on each edge
    closed: bool  # every edge on exactly two faces with opposite directions
    components: int  # connected components through shared edges


def mesh_topology(faces: torch.Tensor, num_vertices: int) -> MeshTopology:
    """Edge table and component count, on the faces' device (no host round trip on CUDA)."""
    f = faces.long()
    src = f.reshape(-1)
    dst = f[:, [1, 2, 0]].reshape(-1)
    lo, hi = torch.minimum(src, dst), torch.maximum(src, dst)
    und, inv, cnt = torch.unique(lo * num_vertices + hi, return_inverse=True, return_counts=True)
    directed = torch.unique(src * num_vertices + dst).numel()
    closed = bool((cnt == 2).all()) and directed == src.numel()
    face_edges = inv.reshape(-1, 3)
    return MeshTopology(face_edges, cnt, closed, count_components(face_edges, und.numel()))


def count_components(face_edges: torch.Tensor, num_edges: int) -> int:
    """Connected components of faces joined by shared edges: hook roots to the smallest neighbouring
    root, then jump pointers to the roots, until nothing changes (Shiloach-Vishkin style)."""
    n = face_edges.shape[0]
    dev = face_edges.device
    ids = torch.arange(n, device=dev)
    parent = ids.clone()
    flat = face_edges.reshape(-1)
    while True:
        edge_min = torch.full((num_edges,), n, device=dev).scatter_reduce_(0, flat, parent.repeat_interleave(3), "amin")
        low = edge_min[face_edges].amin(1)  # smallest root among the faces sharing an edge with each face
        hooked = parent.scatter_reduce(0, parent, low, "amin")  # roots only: every face points at a root here
        while True:  # pointer jumping: depth halves each step
            nxt = hooked[hooked]
            if torch.equal(nxt, hooked):
                break
            hooked = nxt
        if torch.equal(hooked, parent):
            return int((parent == ids).sum())
        parent = hooked


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
    """(F*7,) True where a (face, feature code) is, or touches, an edge not shared by exactly two faces."""
    dev = faces.device
    fe = topo.face_edges.to(dev)
    open_edge = (topo.edge_faces != 2).to(dev)
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


def _solid_angle(q, a, b, c):
    """Signed solid angle of triangles (a,b,c) seen from q (Van Oosterom & Strackee 1983)."""
    a, b, c = a - q, b - q, c - q
    la, lb, lc = a.norm(dim=-1), b.norm(dim=-1), c.norm(dim=-1)
    det = (a * torch.linalg.cross(b, c, dim=-1)).sum(-1)
    den = la * lb * lc + (a * b).sum(-1) * lc + (b * c).sum(-1) * la + (c * a).sum(-1) * lb
    return 2.0 * torch.atan2(det, den)


def _morton(cell: torch.Tensor, bits: int) -> torch.Tensor:
    code = torch.zeros_like(cell[:, 0])
    for bit in range(bits):
        for d in range(3):
            code |= ((cell[:, d] >> bit) & 1) << (3 * bit + 2 - d)
    return code


def _expand(counts: torch.Tensor, starts: torch.Tensor):
    """For ragged children: (owner row, child index) for every child of every row."""
    owner = torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)
    first = torch.cumsum(counts, 0) - counts
    return owner, starts[owner] + torch.arange(owner.numel(), device=counts.device) - first[owner]


class WindingNumber:
    """Generalized winding number of a triangle soup: exact for near triangles, dipoles for far cells.

    Cells form a grid hierarchy (4^3 ... 64^3 over [-1,1]^3, Morton-ordered so each
    cell's children and triangles are contiguous); a cell farther than beta times
    its radius contributes its area-weighted dipole (Barill et al. 2018, Sec. 3.2).
    """

    def __init__(self, tri: torch.Tensor, beta: float = 2.5, levels: tuple[int, ...] = (2, 3, 4, 5, 6)):
        self.beta = beta
        tri = tri.double()
        cen = tri.mean(1)
        finest = levels[-1]
        cell = ((cen + 1) * (2 ** (finest - 1))).floor().clamp(0, 2**finest - 1).long()
        code = _morton(cell, finest)
        order = torch.argsort(code)
        self.tri, code, cen = tri[order], code[order], cen[order]
        area_vec = 0.5 * torch.linalg.cross(self.tri[:, 1] - self.tri[:, 0], self.tri[:, 2] - self.tri[:, 0], dim=1)
        area = area_vec.norm(dim=1)
        self.cells = []  # per level: center, dipole, radius, child start, child count
        for lv in levels:
            key = code >> (3 * (finest - lv))
            uniq, inv = torch.unique_consecutive(key, return_inverse=True)
            c = uniq.numel()
            a = torch.zeros(c, dtype=tri.dtype, device=tri.device).index_add_(0, inv, area)
            center = torch.zeros(c, 3, dtype=tri.dtype, device=tri.device).index_add_(0, inv, area[:, None] * cen)
            center /= a.clamp_min(1e-300)[:, None]
            dipole = torch.zeros(c, 3, dtype=tri.dtype, device=tri.device).index_add_(0, inv, area_vec)
            reach = (self.tri - center[inv][:, None]).norm(dim=2).max(1).values
            radius = torch.zeros(c, dtype=tri.dtype, device=tri.device).scatter_reduce_(0, inv, reach, "amax")
            self.cells.append({"key": uniq, "inv": inv, "center": center, "dipole": dipole, "radius": radius})
        for lv, (parent, child) in enumerate(zip(self.cells[:-1], self.cells[1:])):
            shift = 3 * (levels[lv + 1] - levels[lv])
            owner = torch.searchsorted(parent["key"], child["key"] >> shift)
            parent["count"] = torch.bincount(owner, minlength=parent["key"].numel())
            parent["start"] = torch.cumsum(parent["count"], 0) - parent["count"]
        last = self.cells[-1]
        last["count"] = torch.bincount(last["inv"], minlength=last["key"].numel())
        last["start"] = torch.cumsum(last["count"], 0) - last["count"]
        # Built in float64, evaluated in float32: errors stay far below the dipole truncation's.
        self.tri = self.tri.float()
        for cells in self.cells:
            for k in ("center", "dipole", "radius"):
                cells[k] = cells[k].float()

    @torch.no_grad()
    def __call__(self, points: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
        out = torch.empty(points.shape[0], dtype=torch.float32, device=points.device)
        chunk = chunk or (1 << 15 if points.is_cuda else 1 << 12)  # GPU: fewer launches, under 1 GiB
        for s in range(0, points.shape[0], chunk):
            out[s : s + chunk] = self._eval(points[s : s + chunk].float())
        return out

    def _eval(self, q: torch.Tensor) -> torch.Tensor:
        m = q.shape[0]
        w = torch.zeros(m, dtype=q.dtype, device=q.device)
        top = self.cells[0]["key"].numel()
        qi = torch.arange(m, device=q.device).repeat_interleave(top)
        ci = torch.arange(top, device=q.device).repeat(m)
        for cells in self.cells:
            rel = cells["center"].index_select(0, ci) - q.index_select(0, qi)
            dist = rel.norm(dim=1)
            far = dist > self.beta * cells["radius"].index_select(0, ci)
            f_idx = far.nonzero().squeeze(1)
            n_idx = (~far).nonzero().squeeze(1)
            rel_f, dist_f = rel.index_select(0, f_idx), dist.index_select(0, f_idx)
            dip = (rel_f * cells["dipole"].index_select(0, ci.index_select(0, f_idx))).sum(1) / dist_f**3
            w.index_add_(0, qi.index_select(0, f_idx), dip)
            ci_n = ci.index_select(0, n_idx)
            owner, ci = _expand(cells["count"].index_select(0, ci_n), cells["start"].index_select(0, ci_n))
            qi = qi.index_select(0, n_idx).index_select(0, owner)
        t = self.tri.index_select(0, ci)
        w.index_add_(0, qi, _solid_angle(q.index_select(0, qi), t[:, 0], t[:, 1], t[:, 2]))
        return w / (4 * torch.pi)


def winding_side_values(tri: torch.Tensor, wn: WindingNumber) -> torch.Tensor:
    """(F, 2) winding number just outside (column 0) and just inside (column 1) each face's centroid.

    Only the outer probe is evaluated. The inner probe is its mirror image through the face, so the
    face's own solid angle flips sign there while every other term is continuous: w_in = w_out - 2*own.
    """
    n = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1)
    n = n / n.norm(dim=1, keepdim=True).clamp_min(1e-30)
    probe = tri.mean(1) + _PROBE_OFFSET * n
    outer = wn(probe)
    t = tri.double()
    own = (_solid_angle(probe.double(), t[:, 0], t[:, 1], t[:, 2]) / (4 * torch.pi)).to(outer.dtype)
    return torch.stack([outer, outer - 2 * own], 1)


@dataclass
class SignPrep:
    """Everything the sign needs that depends on the mesh alone, so resolutions can share it."""

    method: str  # "winding", "pseudonormal" or "none"
    planes: torch.Tensor | None = None  # feature_planes(...) table
    side_values: torch.Tensor | None = None  # (F,2) winding number outside / inside each face (winding path)
    open_table: torch.Tensor | None = None  # open_features(...) table (winding path)
    winding: WindingNumber | None = None


def prepare_sign(method: str, tri: torch.Tensor, faces: torch.Tensor, num_vertices: int) -> SignPrep:
    """Topology, pseudo-normal planes and, unless the mesh is closed with one component, the winding data."""
    if method == "none":
        return SignPrep(method)
    topo = mesh_topology(faces, num_vertices)
    planes = feature_planes(tri, faces, pseudo_normals(tri, topo, faces, num_vertices), topo)
    if method == "pseudonormal" or (topo.closed and topo.components == 1):
        return SignPrep("pseudonormal", planes)
    wn = WindingNumber(tri)
    return SignPrep(method, planes, winding_side_values(tri, wn), open_features(faces, topo, num_vertices), wn)


def band_signs(prep: SignPrep, points: torch.Tensor, tri_id: torch.Tensor, feature: torch.Tensor) -> torch.Tensor:
    """-1 inside, +1 outside for each band voxel, given its closest triangle and feature."""
    if prep.method == "none":
        return torch.ones(points.shape[0], dtype=points.dtype, device=points.device)
    side = feature_side(points, prep.planes, tri_id, feature)
    if prep.method == "pseudonormal":
        return side
    w = prep.side_values[tri_id, (side < 0).long()]
    near_open = prep.open_table.index_select(0, tri_id * 7 + feature.long())
    if near_open.any():
        w[near_open] = prep.winding(points[near_open])
    return torch.where(w >= WINDING_THRESHOLD, -1.0, 1.0).to(points.dtype)
