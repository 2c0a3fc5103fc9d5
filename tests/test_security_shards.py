"""Corrupt shards never train silently: page checksums, row checks, bad rows named and counted, a share limit."""
import dataclasses
import random

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import shards
from pipeline.train.data import Skipped, SkipGuard, TooManySkipped, iter_samples, shard_tables
from pipeline.train.synthetic import synthetic_rows

RES = 32


def _snapshot(samples):
    return [(s.mesh_id, s.coords.numpy().tobytes(), s.values.numpy().tobytes(), s.resolution, s.scale,
             s.center.tobytes(), [v.png for v in s.views]) for s in samples]


def test_single_bit_flips_never_read_back_altered(tmp_path):
    """60 random single-bit flips anywhere in a shard: each reads back identical or is a ShardError naming
    the file (before checksums, 32 of 60 read back altered without error)."""
    [(uri, size)] = shards.write_shard(str(tmp_path), synthetic_rows(3, RES, seed=2))
    original = open(uri, "rb").read()
    assert pq.ParquetFile(uri).metadata.row_group(0).column(0).num_values == 1
    reference = _snapshot(shards.read_samples(str(tmp_path), RES))
    rng = random.Random(0)
    outcome = {"identical": 0, "refused": 0, "altered": 0}
    for _ in range(60):
        data = bytearray(original)
        data[rng.randrange(size)] ^= 1 << rng.randrange(8)
        open(uri, "wb").write(data)
        try:
            got = _snapshot(shards.read_samples(str(tmp_path), RES))
        except shards.ShardError as e:
            assert uri in str(e)
            outcome["refused"] += 1
            continue
        outcome["identical" if got == reference else "altered"] += 1
    assert outcome["altered"] == 0, outcome
    assert outcome["refused"] > 30, outcome


def test_flipped_page_checksum_names_file_row_group_and_mesh(tmp_path):
    """A flip inside one row's SDF page: that row is refused by its CRC, the others read."""
    rows = synthetic_rows(3, RES, seed=2)
    [(uri, _)] = shards.write_shard(str(tmp_path), rows)
    meta = pq.ParquetFile(uri).metadata
    col = shards.SCHEMA.names.index("sdf")
    chunk = meta.row_group(1).column(col)
    data = bytearray(open(uri, "rb").read())
    end = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size
    data[(chunk.data_page_offset + end) // 2] ^= 0x10  # inside the data page
    open(uri, "wb").write(data)
    errors = []
    got = list(shards.read_samples(str(tmp_path), RES, on_error="skip", errors=errors))
    second = pq.ParquetFile(uri).read_row_group(1, columns=["mesh_id"]).column(0)[0].as_py()
    assert len(got) == 2 and second not in {s.mesh_id for s in got}
    assert len(errors) == 1 and f"{uri}: row group 1, mesh {second}: damaged" in errors[0], errors
    # The trainer's reader turns it into one error row that names the same, and keeps the others.
    tables = list(shard_tables(uri))
    assert [t.column("s2_error")[0].as_py() is None for t in tables] == [True, False, True]


def _bad_rows():
    """Rows that pass the schema but not the checks, each with the message part it must produce."""
    good = synthetic_rows(4, RES, seed=5)
    out = []
    r = good[0]
    coords = r.coords.copy()
    coords[0, 1] = RES  # one past the grid
    out.append((dataclasses.replace(r, coords=coords, mesh_id="out-of-range"), f"outside [0, {RES})"))
    r = good[1]
    sdf = r.sdf.copy()
    sdf[3] = np.nan
    out.append((dataclasses.replace(r, sdf=sdf, mesh_id="nan-sdf"), "1 non-finite SDF values"))
    r = good[2]
    out.append((dataclasses.replace(r, resolution=2 * RES, mesh_id="wrong-res"),
                f"resolution {2 * RES} in a folder of resolution {RES}"))
    negative = good[3].coords.copy()
    negative[2, 0] = -1
    out.append((dataclasses.replace(good[3], coords=negative, mesh_id="negative"), "coordinates span [-1,"))
    return out


def _write_rows(root, rows, name):
    """A shard file written as the preprocess stage would, whatever the rows hold."""
    table = shards.rows_to_table(rows)
    path = root / "shards" / str(RES) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, row_group_size=1, write_page_checksum=True)
    return str(path)


def _short_sdf_row(row):
    """coords of N voxels, sdf of N-5 values: rows_to_table refuses it, so the table is assembled by hand."""
    table = shards.rows_to_table([row])
    sdf = pa.LargeListArray.from_arrays(pa.array([0, len(row.sdf) - 5], pa.int64()), pa.array(row.sdf[:-5]))
    return table.set_column(table.schema.get_field_index("sdf"), "sdf", sdf)


def test_bad_rows_are_skipped_and_named(tmp_path):
    bad = _bad_rows()
    good = synthetic_rows(3, RES, seed=9)
    uri = _write_rows(tmp_path, [good[0], *[r for r, _ in bad], good[1]], "part-mixed.parquet")
    short = _short_sdf_row(dataclasses.replace(good[2], mesh_id="short-sdf"))
    pq.write_table(short, tmp_path / "shards" / str(RES) / "part-short.parquet", write_page_checksum=True)
    errors = []
    got = list(shards.read_samples(str(tmp_path), RES, on_error="skip", errors=errors))
    assert sorted(s.mesh_id for s in got) == sorted([good[0].mesh_id, good[1].mesh_id])
    assert len(errors) == len(bad) + 1
    for (row, msg), err in zip(bad, [e for e in errors if "part-mixed" in e]):
        assert err.startswith(f"{uri}: mesh {row.mesh_id}: ") and msg in err, err
    [short_err] = [e for e in errors if "part-short" in e]
    assert "mesh short-sdf:" in short_err and "coordinates" in short_err and "must be equal" in short_err
    with pytest.raises(shards.BadRow, match="out-of-range"):
        list(shards.read_samples(str(tmp_path), RES))  # on_error="raise": the first bad row stops the read

    # The training reader: same rows skipped, each named with its file, the others trained on.
    skipped, guard = Skipped(), SkipGuard(0.9, Skipped(), "data")
    samples = list(iter_samples(shard_tables(uri), skipped, RES, seen=guard))
    assert [s.mesh_id for s in samples] == [good[0].mesh_id, good[1].mesh_id]
    assert (guard.rows, guard.bad) == (6, 4)
    assert all(line.startswith(f"{uri}: mesh ") for line in skipped.shapes), skipped.shapes


def test_skip_share_over_the_limit_stops_with_one_line(tmp_path):
    bad = _bad_rows()
    uri = _write_rows(tmp_path, [*synthetic_rows(2, RES, seed=9), *[r for r, _ in bad]], "part-bad.parquet")
    skipped = Skipped()
    guard = SkipGuard(0.5, skipped, "s3://bucket/dataset")
    list(iter_samples(shard_tables(uri), skipped, RES, seen=guard))
    with pytest.raises(TooManySkipped) as e:
        guard.check()
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("s3://bucket/dataset: 4 of 6 rows read were bad (67% > "
                                              "max_skipped_share 50%); stopping. First: ") and uri in msg


def test_training_goes_on_past_bad_rows_and_stops_past_the_share(local_dist, tmp_path):
    """The loop without Ray: one bad row in nine is skipped and counted and the run finishes; with
    max_skipped_share 0.05 the same data stops the run with TooManySkipped."""
    from pipeline.train.config import TrainConfig
    from pipeline.train.loop import run_without_ray

    rows = [dataclasses.replace(r, views=[]) for r in synthetic_rows(8, RES, seed=4)]
    nan = rows[0].sdf.copy()
    nan[0] = np.inf
    uri = _write_rows(tmp_path / "data", [*rows, dataclasses.replace(rows[0], sdf=nan, mesh_id="inf-row")],
                      "part-a.parquet")
    cfg = TrainConfig(network="dit", shards=str(tmp_path / "data"), resolution=RES, steps=3, checkpoint_every=3,
                      token_budget=1500, storage=str(tmp_path / "runs"), max_skipped_share=0.2)
    out = run_without_ray(cfg)
    assert out["step"] == 3
    assert out["skipped_shapes"] == [f"{uri}: mesh inf-row: 1 non-finite SDF values"]
    with pytest.raises(TooManySkipped, match="1 of 9 rows read were bad"):
        run_without_ray(dataclasses.replace(cfg, name="strict", max_skipped_share=0.05))
