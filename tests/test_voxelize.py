"""The 1024 stage's latent voxels from a mesh, against a dense brute-force evaluation."""
import numpy as np
import torch
import trimesh

from kernels.distance import point_triangle_sqdist
from model.voxelize import normalize_vertices, surface_latent_index


def _dense_reference(vertices, faces, size, factor, threshold):
    tri = (torch.as_tensor(vertices).float() * 0.5)[torch.as_tensor(faces).long()]
    g = torch.arange(size).float() / (size - 1) - 0.5
    pts = torch.stack(torch.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    best = torch.full((len(pts),), float("inf"))
    for f in range(len(tri)):
        d2, _ = point_triangle_sqdist(pts, tri, torch.full((len(pts),), f), backend="torch")
        best = torch.minimum(best, d2)
    idx = torch.nonzero(best.reshape(size, size, size) < (threshold / size) ** 2)
    return torch.unique(idx // factor, dim=0)


def test_latent_index_equals_dense_evaluation():
    mesh = trimesh.creation.icosphere(subdivisions=1, radius=0.7)
    mesh.apply_translation([0.1, -0.05, 0.0])
    v = normalize_vertices(np.asarray(mesh.vertices))
    assert np.isclose(np.abs(v).max(), 0.95)
    f = np.asarray(mesh.faces)
    got = surface_latent_index(torch.from_numpy(v), torch.from_numpy(f), size=48, factor=4, threshold=2.0,
                               max_pairs=5000, backend="torch")
    want = _dense_reference(v, f, 48, 4, 2.0)
    assert len(got) > 0
    assert torch.equal(got.long(), want)  # same set, sorted by key (the reference's unique is lexicographic)
