"""`python -m pipeline.train` under torchrun, without Ray: checkpoints on S3, a rerun resumes, bad input."""
import json
import os
import subprocess
import sys

import pytest
import torch

from servers import free_port

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def launcher_env(s3_server, tmp_path_factory):
    # Nothing is JIT-built (engine.skip_shm_op); a private extensions folder keeps it that way if it ever is.
    ext = tmp_path_factory.getbasetemp() / "torch-ext"
    ext.mkdir(exist_ok=True)
    return {**os.environ, **s3_server.env, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(ext),
            "PATH": BIN + os.pathsep + os.environ.get("PATH", "")}


def _torchrun(env, nproc, *flags, timeout=300):
    """torchrun on a free port; once more on another if a parallel test took the port first (EADDRINUSE before
    any rank started: the run did nothing)."""
    for attempt in range(2):
        cmd = [os.path.join(BIN, "torchrun"), "--nproc_per_node", str(nproc), "--master_port", str(free_port()),
               "-m", "pipeline.train", "dit", *flags]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        if "EADDRINUSE" not in res.stderr or attempt:
            return res


def test_two_ranks_checkpoint_to_s3_and_rerun_resumes(s3_server, launcher_env):
    import s3fs

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})  # the run creates the bucket
    flags = ["--shards", "synthetic", "--synthetic-shapes", "4", "--resolution", "32", "--token-budget", "1500",
             "--checkpoint-every", "2", "--keep-checkpoints", "1", "--storage", "s3://launcher-runs/exp", "--name", "a"]
    res = _torchrun(launcher_env, 2, *flags, "--steps", "2")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = "launcher-runs/exp/a/checkpoint_00000002"
    # Every rank's ZeRO partition in one checkpoint, meta.json written after all of them.
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.glob(f"{ckpt}/state/*optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    meta = json.loads(fs.cat(f"{ckpt}/meta.json"))
    assert (meta["step"], meta["resolution"], meta["world_size"]) == (2, 32, 2)
    first_losses = json.loads(fs.cat(f"{ckpt}/history.json"))["loss"]

    res = _torchrun(launcher_env, 2, *flags, "--steps", "3")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads(res.stdout.strip().splitlines()[-1])["step"] == 3
    steps_run = [json.loads(line)["step"] for line in res.stdout.splitlines() if line.startswith('{"step"')][:-1]
    assert steps_run == [3], res.stdout[-2000:]  # only the missing step ran
    # --keep-checkpoints 1: the older checkpoint went once the newer one was complete.
    assert [p.rsplit("/", 1)[-1] for p in fs.glob("launcher-runs/exp/a/checkpoint_*")] == ["checkpoint_00000003"]
    hist = json.loads(fs.cat("launcher-runs/exp/a/checkpoint_00000003/history.json"))
    assert hist["step"] == [1, 2, 3] and hist["restarted_from"] == [2] and hist["loss"][:2] == first_losses
    with fs.open("launcher-runs/exp/a/checkpoint_00000003/weights.pt", "rb") as f:
        weights = torch.load(f, weights_only=True)
    assert (weights["network"], weights["resolution"], weights["step"]) == ("dit", 32, 3)


def test_bad_shard_counted_and_oversize_shapes_named(launcher_env, tmp_path):
    """A file that is not a shard is skipped with its reason; shapes over the token budget are named, and a
    worker left with none fails with one line that says so."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipeline.shards import write_shard
    from pipeline.train.synthetic import synthetic_rows

    write_shard(str(tmp_path), synthetic_rows(2, 32))
    pq.write_table(pa.table({"mesh_id": ["x"]}), tmp_path / "shards" / "32" / "part-wrong.parquet")
    res = _torchrun(launcher_env, 1, "--shards", str(tmp_path), "--resolution", "32", "--token-budget", "8",
                    "--steps", "1", "--storage", str(tmp_path / "runs"))
    assert res.returncode != 0
    assert "part-wrong.parquet: not a shard of this project (missing columns" in res.stderr
    lines = res.stderr.splitlines()
    oversize = [line for line in lines if line.endswith("tokens is more than token_budget 8; skipped")]
    assert sorted(line.split("-")[0] for line in oversize) == ["box", "sphere"], res.stderr[-3000:]
    assert any(line.startswith("error: ") and "got no trainable shapes (2 skipped" in line for line in lines)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").rglob("meta.json"))


def test_plain_python_runs_one_process(launcher_env, tmp_path):
    """`python -m pipeline.train` with no launcher is a world of one: it trains and writes its checkpoint."""
    env = {k: v for k, v in launcher_env.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    cmd = [sys.executable, "-m", "pipeline.train", "structure_vae", "--shards", "synthetic", "--resolution", "64",
           "--steps", "2", "--checkpoint-every", "2", "--storage", str(tmp_path / "runs"), "--name", "one"]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    meta = json.loads((tmp_path / "runs" / "one" / "checkpoint_00000002" / "meta.json").read_text())
    assert meta["world_size"] == 1
