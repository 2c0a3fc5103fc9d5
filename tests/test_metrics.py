"""Reconstruction metrics on shapes whose distances are known."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import trimesh

from model.metrics import mesh_metrics, point_triangle_distance, sample_surface


def _sphere(radius: float, subdivisions: int = 5):
    m = trimesh.creation.icosphere(subdivisions=subdivisions, radius=radius)
    return torch.from_numpy(m.vertices), torch.from_numpy(m.faces)


def test_identical_meshes_score_perfectly():
    m = mesh_metrics(_sphere(0.5), _sphere(0.5), samples=4000)
    assert m.chamfer < 1e-9 and m.fscore[0.001] == 1.0 and m.normal_consistency > 0.9999


def test_offset_sphere_distances():
    # concentric spheres 0.003 apart: every point is ~0.003 from the other surface
    m = mesh_metrics(_sphere(0.5), _sphere(0.503), samples=4000)
    assert m.chamfer == pytest.approx(0.006, rel=0.05)
    assert m.fscore[0.005] == 1.0 and m.fscore[0.001] == 0.0


def test_point_triangle_distance_cases():
    tri = np.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0]])
    pts = np.array([[0.2, 0.2, 0.5], [2.0, 0, 0], [-1.0, -1, 0], [0.5, -1, 0]])
    d = point_triangle_distance(pts, np.broadcast_to(tri, (4, 3, 3)))
    np.testing.assert_allclose(d, [0.5, 1.0, 2 ** 0.5, 1.0])


def test_samples_lie_on_the_surface():
    v, f = _sphere(0.7, 3)
    pts, nrm, _ = sample_surface(v, f, 2000)
    r = pts.norm(dim=1)
    assert (r <= 0.7 + 1e-9).all() and (r > 0.69).all()
    assert ((nrm * pts).sum(1) > 0).all()  # icosphere faces wind outwards
    with pytest.raises(ValueError, match="no faces"):
        sample_surface(v, f[:0], 10)
