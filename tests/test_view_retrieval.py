"""benchmarks/view_retrieval.py: a new view is matched to the stored view of its own mesh, and scored by the
surface-cell IoU of the matched mesh."""
import numpy as np
import torch

from benchmarks.view_retrieval import iou, score, surface_cells
from pipeline.geometry.render import render_views


def _box(sx, sy, sz):
    v = np.array([[x, y, z] for x in (-sx, sx) for y in (-sy, sy) for z in (-sz, sz)], dtype=np.float64)
    f = np.array([[0, 1, 3], [0, 3, 2], [4, 6, 7], [4, 7, 5], [0, 4, 5], [0, 5, 1],
                  [2, 3, 7], [2, 7, 6], [0, 2, 6], [0, 6, 4], [1, 5, 7], [1, 7, 3]], dtype=np.int64)
    return v, f


def test_new_views_find_their_own_mesh_and_score_its_cells():
    shapes = {"cube": _box(0.9, 0.9, 0.9), "slab": _box(0.9, 0.15, 0.9), "pillar": _box(0.15, 0.9, 0.15)}
    sets = {}
    for i, (name, (v, f)) in enumerate(shapes.items()):
        train = [(r.png(), r.azimuth) for r in render_views(v, f, n_views=8, size=64, seed=i)]
        new = [(r.png(), r.azimuth) for r in render_views(v, f, n_views=1, size=64, seed=100 + i)]
        sets[name] = (train, new, surface_cells(v, f, 8))
    r = score(sets, "silhouette")
    assert r["n_new"] == 3 and r["n_train"] == 24
    assert r["top1"] == 1.0 and r["iou"] == 1.0 and r["wrong"] == []
    assert 0.0 <= r["gap"] <= 180.0  # boxes look alike every quarter turn: any of those cameras may match
    only = score(sets, "silhouette", {"slab"})
    assert only["n_new"] == 1 and only["top1"] == 1.0


def test_surface_cells_and_iou():
    cube = surface_cells(*_box(0.9, 0.9, 0.9), 8)
    slab = surface_cells(*_box(0.9, 0.1, 0.9), 8)
    assert iou(cube, cube) == 1.0
    # the slab's cells are the cube's middle layers' inside: few shared cells with the cube's shell
    assert 0.0 < iou(cube, slab) < 0.5
    assert cube.dtype == torch.int64 and cube.numel() == 8 ** 3 - 6 ** 3
