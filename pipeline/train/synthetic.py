"""Analytic shapes written as shard rows: training data for laptops, tests and the demo without a mesh corpus."""
from __future__ import annotations

import hashlib
import io

import numpy as np
from PIL import Image

from pipeline.shards import ShardRow, View

KINDS = ("sphere", "box", "torus", "capsule")


def _sdf(kind: str, p: np.ndarray, a: float, b: float) -> np.ndarray:
    if kind == "sphere":
        return np.linalg.norm(p, axis=-1) - a
    if kind == "box":
        q = np.abs(p) - np.array([a, b, 0.5 * (a + b)])
        return np.linalg.norm(np.maximum(q, 0), axis=-1) + np.minimum(q.max(axis=-1), 0)
    if kind == "torus":
        q = np.stack([np.linalg.norm(p[..., :2], axis=-1) - a, p[..., 2]], -1)
        return np.linalg.norm(q, axis=-1) - b
    seg = np.clip(p[..., 2], -a, a)  # capsule along z
    return np.linalg.norm(p - np.stack([0 * seg, 0 * seg, seg], -1), axis=-1) - b


def _silhouette_png(coords: np.ndarray, resolution: int, axis: int, size: int = 64) -> bytes:
    keep = [i for i in range(3) if i != axis]
    img = np.full((size, size), 255, np.uint8)
    uv = (coords[:, keep] * size // resolution).clip(0, size - 1)
    depth = coords[:, axis] / resolution
    shade = (40 + 180 * depth).astype(np.uint8)
    img[uv[:, 0], uv[:, 1]] = np.minimum(img[uv[:, 0], uv[:, 1]], shade)
    alpha = np.where(img < 255, 255, 0).astype(np.uint8)  # views carry the object's coverage, as renders do
    buf = io.BytesIO()
    Image.fromarray(np.stack([img] * 3 + [alpha], -1), mode="RGBA").save(buf, format="PNG")
    return buf.getvalue()


def synthetic_row(index: int, resolution: int, band: float = 2.0, seed: int = 0) -> ShardRow:
    """Shape ``index`` of a seeded family: kind cycles, sizes vary; narrow band of |SDF| < band voxels."""
    rng = np.random.default_rng(seed * 100003 + index)
    kind = KINDS[index % len(KINDS)]
    a, b = rng.uniform(0.35, 0.8), rng.uniform(0.15, 0.35) if kind in ("torus", "capsule") else rng.uniform(0.3, 0.8)
    h = 2.0 / resolution
    axis = (np.arange(resolution) + 0.5) * h - 1
    coords, values = [], []
    for i in range(resolution):  # one slice at a time: a 256³ grid never exists at once
        jj, kk = np.meshgrid(np.arange(resolution), np.arange(resolution), indexing="ij")
        p = np.stack([np.full_like(axis[jj], axis[i]), axis[jj], axis[kk]], -1)
        d = _sdf(kind, p, a, b) / (band * h)
        m = np.abs(d) < 1
        if m.any():
            coords.append(np.stack([np.full(m.sum(), i), jj[m], kk[m]], -1))
            values.append(d[m])
    c = np.concatenate(coords).astype(np.int32)
    v = np.concatenate(values).astype(np.float32)
    digest = hashlib.sha256(f"{kind}:{a:.6f}:{b:.6f}".encode()).hexdigest()
    views = [View(png=_silhouette_png(c, resolution, ax), intrinsics=np.eye(3, dtype=np.float32),
                  extrinsics=np.eye(4, dtype=np.float32), elevation=0.0, azimuth=90.0 * ax) for ax in range(3)]
    return ShardRow(mesh_id=f"{kind}-{digest[:12]}", source_uri=f"synthetic://{kind}/{index}", content_hash=digest,
                    config_hash="synthetic", resolution=resolution, band=band, coords=c, sdf=v,
                    center=np.zeros(3), scale=1.0, face_count=0, vertex_count=0, watertight=True, views=views)


def synthetic_rows(n: int, resolution: int, seed: int = 0) -> list[ShardRow]:
    return [synthetic_row(i, resolution, seed=seed) for i in range(n)]
