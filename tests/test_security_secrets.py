"""No secret in an entrypoint, Ray's job API, a log or a written file: a training job on a real Ray cluster
reads and writes a real S3 server with credentials from a shared credentials file (a mounted secret),
and a sentinel secret is searched for everywhere afterwards."""
import dataclasses
import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from servers import start_ray

S2 = os.path.join(os.path.dirname(sys.executable), "s2")
ROOT = Path(__file__).resolve().parents[1]
SENTINEL = "s2SENTINELx9Qv3b7c"
RES = 32


def _files_holding(root: Path, needle: bytes) -> list[str]:
    hits = []
    for p in root.rglob("*"):
        try:
            if p.is_file() and not p.is_symlink() and needle in p.read_bytes():
                hits.append(str(p))
        except OSError:
            continue
    return hits


@pytest.mark.integration
def test_sentinel_secret_appears_nowhere(s3_server, tmp_path):
    import s3fs

    from pipeline.shards import write_shard
    from pipeline.train.synthetic import synthetic_rows

    creds = tmp_path / "secret" / "credentials"  # what a Kubernetes secret mounted as a file looks like
    creds.parent.mkdir()
    creds.write_text(f"[default]\naws_access_key_id = AKIDS2TEST\naws_secret_access_key = {SENTINEL}\n")
    write_shard("s3://secret-test/dataset", [dataclasses.replace(r, views=[]) for r in synthetic_rows(4, RES)])
    # The cluster's own environment names the file; no credential variable is set anywhere on it.
    cluster = start_ray(num_cpus=2, extra_env={"AWS_SHARED_CREDENTIALS_FILE": str(creds)},
                        drop_env=("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"))
    try:
        assert "AWS_SECRET_ACCESS_KEY" not in cluster.env
        env = {**cluster.env, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
        overrides = ["shards=s3://secret-test/dataset", "storage=s3://secret-test/runs", "name=sentinel",
                     f"resolution={RES}", "model=debug", "attention=full", "steps=2", "checkpoint_every=2",
                     "num_workers=1", "use_gpu=false", "cpus_per_worker=1", "token_budget=1500", "curriculum=",
                     "image_encoder=tiny", "grad_checkpointing=false", "max_failures=0"]
        cmd = [S2, "submit", str(ROOT / "jobs" / "train_dit.yaml"), "--address", cluster.dashboard]
        for o in overrides:
            cmd += ["--set", o]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=ROOT)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
        fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
        written = fs.find("secret-test/runs")
        assert any(p.endswith("/weights.pt") for p in written), written

        # 1. the job API: entrypoint, runtime env, metadata of every job
        token = Path(cluster.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        req = urllib.request.Request(f"{cluster.dashboard}/api/jobs/", headers={"Authorization": f"Bearer {token}"})
        jobs_json = urllib.request.urlopen(req, timeout=30).read()
        assert b"s2 train dit" in jobs_json and SENTINEL.encode() not in jobs_json
        # 2. what the client printed (the job's streamed logs included)
        assert SENTINEL not in res.stdout + res.stderr
        # 3. every log and file of the cluster's session (driver, raylet, workers, dashboard, runtime env)
        assert _files_holding(Path(cluster.temp_dir), SENTINEL.encode()) == []
        # 4. every object the job wrote to S3, and the test's own files but the secret itself
        assert [p for p in written if SENTINEL.encode() in fs.cat(p)] == []
        assert _files_holding(tmp_path, SENTINEL.encode()) == [str(creds)]  # the search does find it there
    finally:
        cluster.stop()
