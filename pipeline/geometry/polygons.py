"""Polygon faces to triangles, and an OFF reader that uses it (for files trimesh's own path rejects).

`triangulate` clips ears of each polygon projected onto the plane of its Newell
normal; a polygon where no ear is found (self-overlapping, or degenerate to a
line) is fanned from its first vertex so no face is lost. Triangles keep the
polygon's orientation.
"""

from __future__ import annotations

import numpy as np


class PolygonError(ValueError):
    """The file's polygons cannot be read; the message says where."""


def _ear_clip(p2: np.ndarray) -> list[tuple[int, int, int]] | None:
    """Triangles (local indices) of a simple counter-clockwise 2D polygon, or None if clipping stalls."""
    idx = list(range(len(p2)))
    out = []
    guard = 0
    while len(idx) > 3:
        n = len(idx)
        for k in range(n):
            a, b, c = idx[k - 1], idx[k], idx[(k + 1) % n]
            pa, pb, pc = p2[a], p2[b], p2[c]
            cross = (pb[0] - pa[0]) * (pc[1] - pa[1]) - (pb[1] - pa[1]) * (pc[0] - pa[0])
            if cross <= 0:
                continue  # reflex or flat corner
            others = [p2[j] for j in idx if j not in (a, b, c)]
            if others and _any_inside(np.asarray(others), pa, pb, pc):
                continue
            out.append((a, b, c))
            idx.pop(k)
            break
        else:
            return None
        guard += 1
        if guard > len(p2) * 2:
            return None
    out.append(tuple(idx))
    return out


def _any_inside(q, a, b, c) -> bool:
    def side(p0, p1):
        return (p1[0] - p0[0]) * (q[:, 1] - p0[1]) - (p1[1] - p0[1]) * (q[:, 0] - p0[0])

    return bool(((side(a, b) >= 0) & (side(b, c) >= 0) & (side(c, a) >= 0)).any())


def triangulate(vertices: np.ndarray, polygon: list[int]) -> list[tuple[int, int, int]]:
    """Triangles (vertex ids) covering one polygon face of 3 or more vertices."""
    if len(polygon) == 3:
        return [tuple(polygon)]
    p = vertices[polygon]
    # Newell normal: robust for non-planar and concave polygons.
    nrm = np.cross(p, np.roll(p, -1, axis=0)).sum(0)
    if np.linalg.norm(nrm) > 0:
        axis = int(np.argmax(np.abs(nrm)))
        u, v = (axis + 1) % 3, (axis + 2) % 3
        p2 = p[:, [u, v]].copy()
        if nrm[axis] < 0:  # seen from the normal's side the polygon must run counter-clockwise
            p2[:, 1] *= -1
        tris = _ear_clip(p2)
        if tris is not None:
            return [(polygon[a], polygon[b], polygon[c]) for a, b, c in tris]
    return [(polygon[0], polygon[k], polygon[k + 1]) for k in range(1, len(polygon) - 1)]


def read_off(data: bytes) -> tuple[np.ndarray, np.ndarray]:
    """Vertices and triangulated faces of an OFF file (OFF, COFF, NOFF, ... headers; colours ignored)."""
    lines = [ln.split("#", 1)[0].strip() for ln in data.decode("utf-8", "replace").splitlines()]
    tokens = [ln for ln in lines if ln]
    if not tokens or not tokens[0].upper().lstrip("STCN4").startswith("OFF"):
        raise PolygonError("no OFF header on the first line")
    head = tokens[0].split()
    rest = head[1:] if len(head) > 1 else tokens[1].split()
    body = tokens[1:] if len(head) > 1 else tokens[2:]
    try:
        nv, nf = int(rest[0]), int(rest[1])
    except (IndexError, ValueError) as e:
        raise PolygonError(f"bad OFF counts line {' '.join(rest)!r}") from e
    if len(body) < nv + nf:
        raise PolygonError(f"truncated: the header promises {nv} vertices and {nf} faces, "
                           f"the file has {len(body)} data lines")
    try:
        v = np.array([[float(x) for x in body[i].split()[:3]] for i in range(nv)], np.float64)
    except ValueError as e:
        raise PolygonError(f"bad vertex line: {e}") from e
    if v.shape != (nv, 3):
        raise PolygonError("a vertex line has fewer than 3 coordinates")
    tris = []
    for k in range(nf):
        parts = body[nv + k].split()
        try:
            n = int(parts[0])
            poly = [int(x) for x in parts[1 : 1 + n]]
        except (IndexError, ValueError) as e:
            raise PolygonError(f"bad face line {nv + k + 1}: {body[nv + k][:60]!r}") from e
        if len(poly) != n or n < 3:
            raise PolygonError(f"face {k} lists {len(poly)} of {n} vertices")
        if min(poly) < 0 or max(poly) >= nv:
            raise PolygonError(f"face {k} references vertex {max(poly)}, the file has {nv}")
        tris.extend(triangulate(v, poly))
    return v, np.asarray(tris, np.int64).reshape(-1, 3)
