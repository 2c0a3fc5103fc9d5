"""The preprocess job on a real local Ray cluster: submitted from jobs/preprocess.yaml through
`s2 submit` and `ray job submit`, against local folders and an S3 server, with a worker killed
mid-job, broken files in the corpus, and a re-run that does no work twice."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import pyarrow.parquet as pq
import pytest

from pipeline import shards

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = os.path.join(ROOT, "jobs", "preprocess.yaml")
# Small settings so the whole corpus runs in well under a minute on two CPUs.
SMALL = ["resolutions=32,64", "views=2", "view_size=64", "meshes_per_task=3", "memory_per_task_gb=none"]

# the job on a real local Ray cluster (minutes): the end-to-end phase after the default suite (.ci/run)
pytestmark = [pytest.mark.timeout(900), pytest.mark.integration]


def _s2(cluster, *args, timeout=600):
    cmd = [os.path.join(os.path.dirname(sys.executable), "s2"), *args]
    return subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _submit(cluster, inp, out, *extra, no_wait=False):
    sets = []
    for kv in [f"input={inp}", f"output={out}", *SMALL, *extra]:
        sets += ["--set", kv]
    args = ["submit", SPEC, "--address", cluster.dashboard, *sets]
    if no_wait:
        args.append("--no-wait")
    return _s2(cluster, *args)


def _valid(report):
    return [e for e in report.entries if e.valid]


def _broken(report):
    return [e for e in report.entries if not e.valid]


def _key(path):
    """A corpus file's identity across copies: its last two path parts (kind/name.ext)."""
    return "/".join(path.replace("\\", "/").split("/")[-2:])


def _check_output(out, report, resolutions=(32, 64), subset=None):
    valid = [e for e in _valid(report) if subset is None or _key(e.path) in subset]
    index = shards.read_index(out)
    # Every valid mesh once per resolution, counted over the shard files themselves (not de-duplicated).
    names = Counter((_key(u), r) for u, r in zip(index.column("source_uri").to_pylist(),
                                                index.column("resolution").to_pylist()))
    for e in valid:
        for r in resolutions:
            assert names[(_key(e.path), r)] == 1, f"{e.path} at {r}: {names[(_key(e.path), r)]} rows"
    assert sum(names.values()) == len(valid) * len(resolutions)
    return index


@pytest.fixture(scope="module")
def first_run(ray_cluster, sample_corpus, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("dataset"))
    t0 = time.time()
    res = _submit(ray_cluster, sample_corpus.out_dir, out)
    return res, out, time.time() - t0


def test_s2_submit_writes_shards_that_read_back(first_run, sample_corpus):
    res, out, seconds = first_run
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    assert "SUCCEEDED" in res.stderr
    assert "preprocess summary" in res.stdout
    index = _check_output(out, sample_corpus)
    samples = list(shards.read_samples(out, 64))
    assert len(samples) == len(_valid(sample_corpus))
    for s in samples:
        assert s.coords.shape[0] == s.values.shape[0] > 0
        assert int(s.coords.min()) >= 0 and int(s.coords.max()) < 64
        assert float(s.values.abs().max()) <= 1.0
        assert len(s.views) == 2 and s.views[0].png[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = pq.read_table(os.path.join(out, "manifest.parquet"))
    assert manifest.num_rows == index.num_rows


def test_broken_files_land_in_errors_with_reasons(first_run, sample_corpus):
    _, out, _ = first_run
    errors = pq.read_table(os.path.join(out, "errors.parquet")).to_pylist()
    by_name = {_key(e["source_uri"]): e for e in errors}
    for e in _broken(sample_corpus):
        name = _key(e.path)
        assert name in by_name, f"{name} missing from errors.parquet"
        assert by_name[name]["error"], f"{name}: no reason recorded"
    assert len(errors) == len(_broken(sample_corpus))


def test_rerun_does_no_work_twice(first_run, ray_cluster, sample_corpus):
    _, out, _ = first_run
    before = {u: os.path.getmtime(u) for u in shards.list_shards(out)}
    res = _submit(ray_cluster, sample_corpus.out_dir, out)
    assert res.returncode == 0, res.stderr[-3000:]
    after = {u: os.path.getmtime(u) for u in shards.list_shards(out)}
    assert before == after, "a re-run rewrote or added shards"
    # Every mesh file is skipped before it is read: its size and mtime match sources.parquet.
    listed = re.search(r"preprocess: (\d+) mesh files listed, (\d+) unchanged", res.stdout)
    assert listed and listed.group(1) == listed.group(2), res.stdout[-2000:]
    assert int(listed.group(1)) >= len(_valid(sample_corpus))
    stats = pq.read_table(os.path.join(out, "stats.parquet"))
    assert {"seconds", "voxels", "faces", "bytes"} <= set(stats.column_names)
    assert stats.num_rows >= len(_valid(sample_corpus))
    errors = pq.read_table(os.path.join(out, "errors.parquet"))
    assert errors.num_rows == len(_broken(sample_corpus)), "skipped failures keep their reasons"


def test_ray_job_submit_runs_the_same_entrypoint(ray_cluster, sample_corpus, tmp_path):
    from pipeline.jobs import load_job_spec, with_overrides

    inp = tmp_path / "in"
    picked = _valid(sample_corpus)[:4]
    for e in picked:
        (inp / _key(e.path)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(sample_corpus.out_dir, e.path), inp / _key(e.path))
    out = str(tmp_path / "out")
    spec = with_overrides(load_job_spec(SPEC), [f"input={inp}", f"output={out}", *SMALL])
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    res = subprocess.run([ray, "job", "submit", "--address", ray_cluster.dashboard, "--", *spec.argv()],
                         env=ray_cluster.env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _check_output(out, sample_corpus, subset={_key(e.path) for e in picked})


def test_s3_input_and_output(ray_cluster, s3_server, sample_corpus):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.mkdir("meshes")
    fs.mkdir("datasets")
    picked = _valid(sample_corpus)[:5] + _broken(sample_corpus)[:2]
    for e in picked:
        fs.put(os.path.join(sample_corpus.out_dir, e.path), f"meshes/corpus/{_key(e.path)}")
    res = _submit(ray_cluster, "s3://meshes/corpus", "s3://datasets/run1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    names = {_key(e.path) for e in picked}
    index = _check_output("s3://datasets/run1", sample_corpus, subset=names)
    assert all(u.startswith("s3://meshes/corpus/") for u in index.column("source_uri").to_pylist())
    samples = list(shards.read_samples("s3://datasets/run1", 32))
    assert len(samples) == 5 and all(s.num_voxels > 0 for s in samples)
    with fs.open("datasets/run1/errors.parquet", "rb") as fh:
        assert pq.read_table(fh).num_rows == 2


def test_worker_killed_mid_job_still_does_every_mesh_once(ray_cluster, sample_corpus, tmp_path):
    out = str(tmp_path / "out")
    res = _submit(ray_cluster, sample_corpus.out_dir, out, "meshes_per_task=2", no_wait=True)
    assert res.returncode == 0, res.stderr[-3000:]
    job_id = res.stderr.split(" as ")[1].split()[0]
    killed = None
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and killed is None:
        pids = ray_cluster.worker_pids("process_meshes")
        if pids and shards.list_shards(out):  # some work is done and some is in flight
            killed = pids[0]
            os.kill(killed, signal.SIGKILL)
        time.sleep(0.2)
    assert killed is not None, "never saw a running process_meshes task to kill"
    # Ask the cluster through the CLI, in the cluster's environment (its auth token).
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    while True:
        st = subprocess.run([ray, "job", "status", "--address", ray_cluster.dashboard, job_id],
                            env=ray_cluster.env, capture_output=True, text=True, timeout=60).stdout
        if any(s in st.lower() for s in ("succeeded", "failed", "stopped")):
            break
        assert time.monotonic() < deadline + 300, st
        time.sleep(1)
    logs = subprocess.run([ray, "job", "logs", "--address", ray_cluster.dashboard, job_id],
                          env=ray_cluster.env, capture_output=True, text=True, timeout=60).stdout
    assert "succeeded" in st.lower(), logs[-4000:]
    _check_output(out, sample_corpus)
