"""process_one without Ray: rows, skipping by content hash, and failures as summary rows."""

import numpy as np
import pytest
import torch
import trimesh

from pipeline import config
from pipeline.preprocess import PreprocessConfig, process_one


def _cfg(**kw):
    return config.from_dict(PreprocessConfig, {"input": "in", "output": "out", "resolutions": "16,32",
                                               "views": 1, "view_size": 32, **kw})


def test_rows_skip_and_failures():
    data = trimesh.creation.icosphere(2).export(file_type="ply")
    cfg = _cfg()
    row, rows = process_one("/x/sphere.ply", data, cfg, set())
    assert row["status"] == "ok" and [r.resolution for r in rows] == [16, 32]
    for r in rows:
        assert r.coords.dtype == np.int32 and r.coords.shape[1] == 3 and len(r.sdf) == len(r.coords) > 0
        assert r.views and r.views[0].png.startswith(b"\x89PNG") and r.watertight
    assert row["voxels"] == sum(len(r.coords) for r in rows)
    done = {f"{rows[0].content_hash}:{cfg.row_config_hash()}:{r}" for r in (16, 32)}
    row2, rows2 = process_one("/x/sphere.ply", data, cfg, done)
    assert row2["status"] == "skipped" and rows2 == []
    partly = {f"{rows[0].content_hash}:{cfg.row_config_hash()}:16"}
    _, rows3 = process_one("/x/sphere.ply", data, cfg, partly)
    assert [r.resolution for r in rows3] == [32]
    bad, none = process_one("/x/broken.ply", data[: len(data) // 3], cfg, set())
    assert bad["status"] == "failed" and bad["stage"] == "load" and bad["error"] and none == []


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_gpu_task_without_gpu_is_a_named_failure():
    data = trimesh.creation.box().export(file_type="obj").encode()
    row, rows = process_one("/x/box.obj", data, _cfg(gpus_per_task=1), set())
    assert row["status"] == "failed" and "no CUDA device" in row["error"] and row["stage"].startswith("sdf@")
