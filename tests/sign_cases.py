"""Meshes for the sign tests: one of each kind that breaks naive inside/outside tests.

Every builder returns (vertices (V,3) float64 in [-0.95, 0.95]^3, faces (F,3) int64).
"""

from __future__ import annotations

import numpy as np
import trimesh


def _blob(subdivisions=3, seed=0, radius=0.8, bumps=8):
    """A closed, outward, bumpy sphere (uneven like a scan)."""
    rng = np.random.default_rng(seed)
    m = trimesh.creation.icosphere(subdivisions=subdivisions)
    n = np.asarray(m.vertices)
    disp = np.zeros(len(n))
    for _ in range(bumps):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        disp += rng.uniform(0.02, 0.08) * np.sin(rng.uniform(1, 5) * n @ d + rng.uniform(0, 2 * np.pi))
    return n * (radius * (1 + disp))[:, None], np.asarray(m.faces, np.int64)


def inverted_closed():
    """A closed scan-like blob whose faces all point inward (negative signed volume)."""
    v, f = _blob(3, seed=1)
    return v, f[:, ::-1].copy()


def nested_shells():
    """Three closed shells one inside another, all outward (w = 1, 2, 3 going in); the middle one
    inverted (it is turned outward first)."""
    vs, fs, off = [], [], 0
    for k, r in enumerate((0.9, 0.6, 0.3)):
        v, f = _blob(3, seed=10 + k, radius=r, bumps=4)
        if k == 1:
            f = f[:, ::-1]
        vs.append(v)
        fs.append(f + off)
        off += len(v)
    return np.concatenate(vs), np.concatenate(fs)


def _hull(points):
    """Outward-oriented convex hull triangles of points."""
    from scipy.spatial import ConvexHull

    h = ConvexHull(points)
    f = h.simplices.copy()
    v = points
    n = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])
    inward = (n * (v[f].mean(1) - v[h.vertices].mean(0))).sum(1) < 0
    f[inward] = f[inward][:, ::-1]
    used = np.unique(f)
    remap = np.full(len(v), -1)
    remap[used] = np.arange(len(used))
    return v[used], remap[f]


def overlapping_convex_pieces(pieces=6, seed=3, invert_every=3):
    """Convex pieces of 50-400 large triangles each, overlapping like a convex decomposition that was
    never cut apart; every third piece inward."""
    rng = np.random.default_rng(seed)
    vs, fs, off = [], [], 0
    for k in range(pieces):
        n = int(rng.integers(30, 200))
        centre = rng.uniform(-0.35, 0.35, size=3)
        axes = rng.uniform(0.2, 0.5, size=3)
        d = rng.normal(size=(n, 3))
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        rot = np.linalg.qr(rng.normal(size=(3, 3)))[0]
        v, f = _hull(centre + (d * axes) @ rot.T)
        if invert_every and k % invert_every == invert_every - 1:
            f = f[:, ::-1]
        vs.append(v)
        fs.append(f + off)
        off += len(v)
    return np.concatenate(vs), np.concatenate(fs)


def scan_with_holes(subdivisions=4, seed=5, holes=4):
    """A bumpy closed scan with round holes cut out (open boundary loops)."""
    rng = np.random.default_rng(seed)
    v, f = _blob(subdivisions, seed=seed, radius=0.9)
    cen = v[f].mean(1)
    keep = np.ones(len(f), bool)
    for _ in range(holes):
        d = rng.normal(size=3)
        d /= np.linalg.norm(d)
        keep &= np.linalg.norm(cen / np.linalg.norm(cen, axis=1, keepdims=True) - d, axis=1) > rng.uniform(0.2, 0.45)
    return v, f[keep]


def noisy_open_scan(rings=24, seed=7):
    """A UV sphere jittered until neighbouring faces fold over each other and pass through each other
    (as noisy scans do), with its top cut off and a slot cut through it."""
    rng = np.random.default_rng(seed)
    m = trimesh.creation.uv_sphere(radius=0.9, count=[rings, rings])
    v = np.asarray(m.vertices) + 0.25 * (2 * np.pi / rings) * 0.9 * rng.normal(size=(len(m.vertices), 3))
    f = np.asarray(m.faces, np.int64)
    cen = v[f].mean(1)
    return v, f[~((cen[:, 1] > 0.55) | (np.abs(cen[:, 0] - 0.2) < 0.05))]


def single_sheet(n=40):
    """A wavy open terrain sheet: no inside anywhere."""
    x, y = np.meshgrid(np.linspace(-0.9, 0.9, n), np.linspace(-0.9, 0.9, n), indexing="ij")
    z = 0.2 * np.sin(3 * x) * np.cos(2 * y)
    v = np.stack([x, y, z], -1).reshape(-1, 3)
    i = np.arange(n - 1)[:, None] * n + np.arange(n - 1)[None]
    i = i.reshape(-1)
    f = np.concatenate([np.stack([i, i + n, i + 1], 1), np.stack([i + 1, i + n, i + n + 1], 1)])
    return v, f


def fitted(build):
    """The builder's mesh with its bounding box centred and its longest half-extent 0.95."""

    def make():
        v, f = build()
        v = v - (v.max(0) + v.min(0)) / 2
        return v * (0.95 / np.abs(v).max()), np.ascontiguousarray(f, np.int64)

    return make


CASES = {name: fitted(build) for name, build in {
    "inverted_closed": inverted_closed,
    "nested_shells": nested_shells,
    "overlapping_convex_pieces": overlapping_convex_pieces,
    "scan_with_holes": scan_with_holes,
    "noisy_open_scan": noisy_open_scan,
    "single_sheet": single_sheet,
}.items()}
