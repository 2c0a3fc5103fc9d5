"""A job that sizes itself: memory planned before the band work, slabs when it would not fit, refusals
with a reason, and reruns that skip unchanged files without reading them."""

import multiprocessing as mp

import numpy as np
import pytest
import pyarrow as pa
import torch
import trimesh

from pipeline import config
from pipeline.geometry.budget import BudgetError, plan, sdf_in_pieces, surface_area
from pipeline.geometry.sdf import prepare_mesh, sdf_on_grid
from pipeline.preprocess import SUMMARY_SCHEMA, PreprocessConfig, _unchanged, process_one, progress_line


def _cfg(**kw):
    return config.from_dict(PreprocessConfig, {"input": "in", "output": "out", "resolutions": "64,256",
                                               "views": 0, **kw})


def test_plan_cuts_into_slabs_then_refuses():
    area, faces = 10.0, 50_000
    one = plan(area, faces, [1024], 2.0, 64 * 2**30)[0]
    assert one.pieces == 1
    tight = plan(area, faces, [1024], 2.0, 1.2 * 2**30)[0]
    assert tight.pieces > 1 and tight.peak_bytes <= 1.2 * 2**30
    with pytest.raises(BudgetError, match=r"at 1024\^3 .* over the task budget of 0.9 GiB"):
        plan(area, faces, [256, 1024], 2.0, 0.9 * 2**30)


def test_slabs_give_the_same_sdf():
    m = trimesh.creation.icosphere(3, radius=0.9)
    prep = prepare_mesh(np.asarray(m.vertices), np.asarray(m.faces))
    whole = sdf_on_grid(prep, 128)
    cut = sdf_in_pieces(prep, 128, 2.0, 5)
    assert torch.equal(whole.coords, cut.coords) and torch.equal(whole.values, cut.values)


def test_mesh_over_budget_is_refused_with_a_reason():
    data = trimesh.creation.icosphere(4, radius=5.0).export(file_type="ply")
    row, rows = process_one("/x/big.ply", data, _cfg(resolutions="64,1024", memory_per_task_gb=0.9), set())
    assert row["status"] == "failed" and row["stage"] == "memory" and rows == []
    assert "1024^3" in row["error"] and "memory_per_task_gb" in row["error"]


def _child(budget_gb, queue):
    torch.set_num_threads(1)
    data = trimesh.creation.icosphere(5, radius=5.0).export(file_type="ply")
    row, rows = process_one("/x/s.ply", data, _cfg(resolutions="512", memory_per_task_gb=budget_gb), set())
    # VmHWM: this process's own peak (ru_maxrss would carry the forking parent's over exec).
    hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
    queue.put((row, hwm * 1024, sum(len(r.coords) for r in rows)))


def test_a_mesh_cut_into_slabs_stays_within_its_budget():
    # A budget that forces slabs at 512^3; the process's measured peak must stay under it.
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child, args=(0.75, q))
    p.start()
    row, peak, voxels = q.get(timeout=300)
    p.join()
    assert row["status"] == "ok", row["error"]
    assert row["pieces"] > 1 and voxels > 1_000_000
    assert peak <= 0.75 * 2**30, f"peak RSS {peak / 2**30:.2f} GiB over the 0.75 GiB budget"
    assert row["estimated_gib"] <= 0.75


def test_rerun_skips_by_size_and_stamp_before_reading():
    cfg = _cfg()
    todo = [{"uri": f"/c/m{i}.obj", "size": 100 + i, "stamp": f"t{i}"} for i in range(4)]
    rows = [{**dict.fromkeys(SUMMARY_SCHEMA.names), "source_uri": t["uri"], "size": t["size"], "stamp": t["stamp"],
             "status": "ok", "config_hash": cfg.row_config_hash(), "resolutions": [64, 256]} for t in todo]
    rows[3]["status"], rows[3]["stage"], rows[3]["error"] = "failed", "load", "cannot parse as .obj: x"
    schema = SUMMARY_SCHEMA.append(pa.field("resolutions", pa.list_(pa.int64())))
    sources = pa.Table.from_pylist(rows, schema=schema)
    changed = [dict(todo[0], stamp="t0-new"), dict(todo[1], size=5), todo[2], todo[3]]
    keep, skipped = _unchanged(changed, sources, cfg)
    assert [k["uri"] for k in keep] == ["/c/m0.obj", "/c/m1.obj"]
    assert [s["status"] for s in skipped] == ["skipped", "skipped"] and skipped[1]["error"].startswith("cannot")
    keep, _ = _unchanged(todo, sources, _cfg(resolutions="64,256,512"))  # a new resolution: all again
    assert len(keep) == 4
    keep, _ = _unchanged(todo, sources, _cfg(band=3.0))  # other row settings: all again
    assert len(keep) == 4


def test_progress_line():
    line = progress_line(250, 1000, {"ok": 240, "skipped": 5, "failed": 5}, 100.0)
    assert line == ("preprocess: 250/1000 files (25%)  ok 240  skipped 5  failed 5  2.50 meshes/s  ETA 00:05:00")


def test_job_spec_packs_one_task_per_cpu():
    import re
    from pathlib import Path

    import yaml

    spec = yaml.safe_load(Path(__file__).parent.parent.joinpath("jobs/preprocess.yaml").read_text())
    entry = spec["spec"]["entrypoint"]
    per_task = float(re.search(r"--memory-per-task-gb (\S+)", entry).group(1))
    assert re.search(r"--cpus-per-task 1\b", entry)
    for group in spec["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        start = group["rayStartParams"]
        cpus = int(start["num-cpus"])
        task_memory = int(start["memory"]) / 2**30
        assert cpus * per_task <= task_memory, "fewer tasks than CPUs would fit"
        limit = group["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"]
        assert task_memory + int(start["object-store-memory"]) / 2**30 <= float(limit.rstrip("Gi"))
