import os
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from pipeline import shards


def _row(i, res, n, rng):
    coords = np.unique(rng.integers(0, res, (n, 3)), axis=0).astype(np.int32)
    return shards.ShardRow(
        mesh_id=f"m{i}", source_uri=f"/corpus/m{i}.obj", content_hash=f"{i:064x}", config_hash="cfg",
        resolution=res, band=2.0, coords=coords, sdf=rng.uniform(-1, 1, len(coords)).astype(np.float32),
        center=rng.normal(size=3), scale=float(rng.uniform(0.5, 2)), face_count=10 + i, vertex_count=5 + i,
        watertight=bool(i % 2),
        views=[shards.View(png=bytes([i, 1, 2]), intrinsics=rng.normal(size=(3, 3)).astype(np.float32),
                           extrinsics=rng.normal(size=(4, 4)).astype(np.float32), elevation=20.0 + i, azimuth=3.0)])


def test_roundtrip_zero_copy_and_index(tmp_path):
    rng = np.random.default_rng(0)
    rows = [_row(0, 64, 500, rng), _row(1, 64, 1, rng), _row(2, 128, 300, rng), _row(3, 64, 77, rng)]
    written = shards.write_shard(str(tmp_path), rows)
    assert len(written) == 2 and all(os.path.exists(u) for u, _ in written)
    assert not [p for p in tmp_path.rglob(".tmp-*")], "temporary files left behind"
    got = {s.mesh_id: s for s in shards.read_samples(str(tmp_path), 64)}
    assert set(got) == {"m0", "m1", "m3"}
    for r in rows:
        if r.resolution != 64:
            continue
        s = got[r.mesh_id]
        assert s.coords.dtype == torch.int32 and s.values.dtype == torch.float32
        np.testing.assert_array_equal(s.coords.numpy(), r.coords)
        np.testing.assert_array_equal(s.values.numpy(), r.sdf)
        np.testing.assert_allclose(s.center, r.center)
        assert s.scale == pytest.approx(r.scale) and s.face_count == r.face_count
        assert s.watertight == r.watertight and s.views[0].png == r.views[0].png
        np.testing.assert_allclose(s.views[0].extrinsics, r.views[0].extrinsics, rtol=1e-6)
    # Zero-copy: the tensors point into the Arrow buffers of the table they came from.
    table = pq.read_table(written[0][0]).combine_chunks()
    buf_c = table.column("coords").chunk(0).values.values.buffers()[1]
    buf_s = table.column("sdf").chunk(0).values.buffers()[1]
    from_table = shards.samples_from_table(table)
    assert len(from_table) == 3  # several rows in one table, as Ray Data batches hand them over
    for s in from_table:
        r = next(r for r in rows if r.mesh_id == s.mesh_id)
        np.testing.assert_array_equal(s.coords.numpy(), r.coords)
        np.testing.assert_array_equal(s.values.numpy(), r.sdf)
        assert buf_c.address <= s.coords.data_ptr() < buf_c.address + buf_c.size
        assert buf_s.address <= s.values.data_ptr() < buf_s.address + buf_s.size
    index = shards.read_index(str(tmp_path))
    assert sorted(index.column("mesh_id").to_pylist()) == ["m0", "m1", "m2", "m3"]


def test_shard_name_is_fixed_by_content(tmp_path):
    rng = np.random.default_rng(1)
    rows = [_row(0, 32, 50, rng), _row(1, 32, 60, rng)]
    a = shards.write_shard(str(tmp_path), rows)
    b = shards.write_shard(str(tmp_path), list(reversed(rows)))  # a retried task writes the same name
    assert [u for u, _ in a] == [u for u, _ in b]
    assert len(shards.list_shards(str(tmp_path))) == 1


def test_truncated_and_foreign_files_are_named(tmp_path):
    rng = np.random.default_rng(2)
    (uri, _), = shards.write_shard(str(tmp_path), [_row(0, 32, 50, rng)])
    bad = os.path.join(os.path.dirname(uri), "part-truncated.parquet")
    data = open(uri, "rb").read()
    open(bad, "wb").write(data[: len(data) // 2])
    with pytest.raises(shards.ShardError, match="part-truncated.parquet"):
        list(shards.read_samples(str(tmp_path), 32))
    errors = []
    ok = list(shards.read_samples(str(tmp_path), 32, on_error="skip", errors=errors))
    assert len(ok) == 1 and len(errors) == 1 and "part-truncated" in errors[0]
    os.remove(bad)
    pq.write_table(__import__("pyarrow").table({"x": [1]}), os.path.join(os.path.dirname(uri), "part-foreign.parquet"))
    with pytest.raises(shards.ShardError, match="missing columns"):
        list(shards.read_samples(str(tmp_path), 32))


def test_rows_to_table_rejects_bad_shapes():
    rng = np.random.default_rng(3)
    r = _row(0, 32, 10, rng)
    r.sdf = r.sdf[:-1]
    with pytest.raises(shards.ShardError, match="m0"):
        shards.rows_to_table([r])


def test_a_killed_writers_temporary_files_are_not_records_and_are_cleaned(tmp_path):
    """A driver killed between write and rename leaves a hidden temporary copy: the library never reads it as a
    record, and the next run removes it once it is an hour old (a fresher one may belong to a live writer)."""
    import json
    import time

    from pipeline import storage
    from pipeline.generate import Library

    lib = Library(str(tmp_path))
    lib.write("records/a-1.json", json.dumps({"asset_id": "a-1", "status": "ok"}).encode())
    rec = (tmp_path / "records" / "a-1.json").read_bytes()
    stale = Path(storage.temp_name(str(tmp_path / "records" / "b-2.json")))
    stale.write_bytes(rec.replace(b"a-1", b"b-2"))  # whole and parseable: still not a finished record
    fresh = Path(storage.temp_name(str(tmp_path / "meshes" / "a-1.glb")))
    fresh.parent.mkdir()
    fresh.write_bytes(b"partial")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    assert set(lib.records()) == {"a-1"}
    assert lib.remove_stale_temps() == 1
    assert not stale.exists() and fresh.exists() and (tmp_path / "records" / "a-1.json").exists()
