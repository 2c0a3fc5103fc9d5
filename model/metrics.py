"""Reconstruction metrics between two meshes on sampled surface points.

Chamfer distance, F-score at distance thresholds (0.005 and 0.001 by default,
the columns of the paper's VAE table) and normal consistency. Distances are in
the frame the meshes are given in; the project's normalised frame is [-1, 1]³
(longest half-extent 0.95).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy.spatial import cKDTree


def sample_surface(vertices: torch.Tensor, faces: torch.Tensor, count: int, seed: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` points uniformly on the surface (area-weighted faces) and their face normals, float64 on the CPU."""
    if faces.shape[0] == 0:
        raise ValueError("sample_surface: the mesh has no faces")
    v = vertices.detach().double().cpu()
    tri = v[faces.detach().long().cpu()]  # (F, 3, 3)
    cross = torch.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=1)
    area = cross.norm(dim=1)
    if not float(area.sum()) > 0:
        raise ValueError("sample_surface: the mesh has zero area")
    g = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(area, count, replacement=True, generator=g)
    u, w = torch.rand(count, generator=g, dtype=torch.float64), torch.rand(count, generator=g, dtype=torch.float64)
    fold = u + w > 1  # reflect into the triangle so points are uniform on it
    u, w = torch.where(fold, 1 - u, u), torch.where(fold, 1 - w, w)
    t = tri[idx]
    pts = t[:, 0] + u[:, None] * (t[:, 1] - t[:, 0]) + w[:, None] * (t[:, 2] - t[:, 0])
    normals = cross[idx] / area[idx].clamp(min=1e-30)[:, None]
    return pts, normals


@dataclass
class ReconstructionMetrics:
    chamfer: float
    fscore: dict[float, float]
    normal_consistency: float

    def row(self) -> dict[str, float]:
        out = {"chamfer": self.chamfer, "normal_consistency": self.normal_consistency}
        out.update({f"f1@{t:g}": f for t, f in self.fscore.items()})
        return out


def point_metrics(pred_pts: np.ndarray, pred_nrm: np.ndarray, gt_pts: np.ndarray, gt_nrm: np.ndarray,
                  thresholds: tuple[float, ...] = (0.005, 0.001)) -> ReconstructionMetrics:
    """Metrics between two oriented point sets.

    Chamfer = mean nearest distance pred→gt + mean gt→pred (L2, not squared);
    F-score(τ) = 2PR/(P+R) with P, R the fractions of pred / gt points within τ
    of the other set; normal consistency = mean |cos| between a point's normal
    and its nearest neighbour's, averaged over both directions.
    """
    d_pg, i_pg = cKDTree(gt_pts).query(pred_pts)
    d_gp, i_gp = cKDTree(pred_pts).query(gt_pts)
    fs = {}
    for t in thresholds:
        p, r = float((d_pg < t).mean()), float((d_gp < t).mean())
        fs[t] = 0.0 if p + r == 0 else 2 * p * r / (p + r)
    nc = 0.5 * (np.abs((pred_nrm * gt_nrm[i_pg]).sum(1)).mean() + np.abs((gt_nrm * pred_nrm[i_gp]).sum(1)).mean())
    return ReconstructionMetrics(float(d_pg.mean() + d_gp.mean()), fs, float(nc))


def mesh_metrics(pred: tuple[torch.Tensor, torch.Tensor], gt: tuple[torch.Tensor, torch.Tensor],
                 samples: int = 100_000, thresholds: tuple[float, ...] = (0.005, 0.001), seed: int = 0
                 ) -> ReconstructionMetrics:
    """Metrics between meshes ``pred`` and ``gt``, each (vertices, faces), on ``samples`` surface points each."""
    pp, pn = sample_surface(*pred, samples, seed)
    gp, gn = sample_surface(*gt, samples, seed + 1)
    return point_metrics(pp.numpy(), pn.numpy(), gp.numpy(), gn.numpy(), thresholds)
