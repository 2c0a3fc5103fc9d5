"""Training that continues on another number of workers: ZeRO-1/2 state resharded from the per-rank files,
and the data position regrouped so that no shape of the current epoch is trained twice or left out."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pipeline.train import checkpoints

ROOT = Path(__file__).resolve().parents[1]


class _Task:
    def __init__(self):
        self.rng, self.gen = random.Random(0), torch.Generator().manual_seed(0)


def _write_loop(folder: Path, rank: int, epoch: int, names: list[str], clauses=()) -> None:
    task = _Task()
    task.rng.seed(100 + rank)
    checkpoints.save_loop_state(str(folder), rank, {"epoch": epoch, "consumed": len(names), "names": names,
                                                    "clauses": list(clauses)}, task, torch.device("cpu"))


def _share(names: list[str], rank: int, world: int) -> list[str]:
    return [n for n in names if checkpoints.owner(n, world) == rank]


def test_regroup_marks_each_shape_once(tmp_path):
    shapes = [f"mesh-{i:03d}" for i in range(300)]
    # Three workers: ranks 0 and 1 part-way through epoch 4, rank 2 already in epoch 5 (its share of 4 done).
    trained = {0: _share(shapes, 0, 3)[:30], 1: _share(shapes, 1, 3)[:12]}
    _write_loop(tmp_path, 0, 4, trained[0])
    _write_loop(tmp_path, 1, 4, trained[1])
    _write_loop(tmp_path, 2, 5, _share(shapes, 2, 3)[:5])
    done_before = set(trained[0]) | set(trained[1]) | set(_share(shapes, 2, 3))

    positions = [checkpoints.regroup_loop_state(str(tmp_path), 3, r, 2, _Task(), torch.device("cpu"))
                 for r in range(2)]
    assert all(p["epoch"] == 4 and p["consumed"] == 0 for p in positions)
    for r, p in enumerate(positions):  # each new worker keeps the record of its own new share
        assert all(checkpoints.owner(n, 2) == r for n in p["names"])
    marked = {n for r, p in enumerate(positions) for n in _share(shapes, r, 2)
              if checkpoints.is_done(n, set(p["names"]), p["clauses"])}
    assert marked == done_before

    # A second change within the same epoch (two workers -> four) keeps everything done so far.
    more = {r: [n for n in _share(shapes, r, 2) if not checkpoints.is_done(n, set(p["names"]), p["clauses"])][:7]
            for r, p in enumerate(positions)}
    folder = tmp_path / "second"
    folder.mkdir()
    for r, p in enumerate(positions):
        _write_loop(folder, r, 4, p["names"] + more[r], p["clauses"])
    again = [checkpoints.regroup_loop_state(str(folder), 2, r, 4, _Task(), torch.device("cpu")) for r in range(4)]
    marked = {n for r, p in enumerate(again) for n in _share(shapes, r, 4)
              if checkpoints.is_done(n, set(p["names"]), p["clauses"])}
    assert marked == done_before | set(more[0]) | set(more[1])

    # A worker's file missing: no regrouping (the caller starts the epoch over).
    os.remove(folder / "loop-rank1.pt")
    assert checkpoints.regroup_loop_state(str(folder), 2, 0, 1, _Task(), torch.device("cpu")) is None


def test_resumable_across_worker_counts_by_zero_stage(tmp_path):
    meta = {"network": "dit", "resolution": 64, "world_size": 2}
    for stage in (0, 1, 2):
        checkpoints.check_resumable({**meta, "zero_stage": stage}, "ckpt", network="dit", resolution=64, world_size=3)
    with pytest.raises(checkpoints.CheckpointMismatch, match="ZeRO stage 3 resumes only on the same number"):
        checkpoints.check_resumable({**meta, "zero_stage": 3}, "ckpt", network="dit", resolution=64, world_size=1)
    with pytest.raises(checkpoints.CheckpointMismatch, match="earlier version"):
        checkpoints.check_resumable(meta, "ckpt", network="dit", resolution=64, world_size=1)


def test_elastic_config_checks():
    from pipeline.config import ConfigError
    from pipeline.train.config import TrainConfig

    assert TrainConfig(num_workers=4, min_workers=2).elastic and not TrainConfig(num_workers=4).elastic
    with pytest.raises(ConfigError, match="ZeRO-3"):
        TrainConfig(num_workers=4, min_workers=2, zero_stage=3).validate()
    with pytest.raises(ConfigError, match="min_workers"):
        TrainConfig(num_workers=2, min_workers=3).validate()


def _torchrun(n: int, args: list[str], tmp_path: Path, port: int) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={n}", f"--master_port={port}", *args]
    out = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, (out.stdout + out.stderr)[-5000:]
    return out.stdout


@pytest.mark.integration
@pytest.mark.parametrize("stage", [1, 2])
def test_zero_state_resharded_equals_its_saved_state(tmp_path, stage):
    """Saved by two ranks, loaded by one and by three: the fp32 master weights and Adam's moments are the
    saved ones, so three more steps give what the two ranks' own three more steps gave."""
    from servers import free_port

    script = [str(ROOT / "tests" / "reshard_worker.py"), str(tmp_path), str(stage)]
    _torchrun(2, [*script, "save"], tmp_path, free_port())
    _torchrun(1, [*script, "load"], tmp_path, free_port())
    _torchrun(3, [*script, "load"], tmp_path, free_port())
    ref, one, three = (torch.load(tmp_path / f"{m}.pt") for m in ("save-2", "load-1", "load-3"))
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        for a, b, c in zip(ref[key], one[key], three[key]):
            assert torch.equal(a, b), key  # one rank: the same sums in the same order
            torch.testing.assert_close(c, a, rtol=1e-5, atol=1e-7)  # three: another all-reduce order
    assert ref["lr"] == one["lr"] == three["lr"]


@pytest.mark.integration
def test_run_continues_on_fewer_workers(tmp_path):
    """``python -m pipeline.train`` on two ranks, resumed on one: the steps go on from the checkpoint, the
    history names the worker count of every step, and no shape of the epoch is trained twice."""
    from servers import free_port

    flags = ["-m", "pipeline.train", "dit", "--shards", "synthetic", "--synthetic-shapes", "120", "--resolution", "64",
             "--model", "debug", "--token-budget", "450", "--storage", str(tmp_path / "runs"), "--name", "el",
             "--checkpoint-every", "3", "--report-every", "3", "--lr", "1e-3", "--cache-gb", "0"]
    _torchrun(2, [*flags, "--steps", "6"], tmp_path, free_port())
    first = tmp_path / "runs" / "el" / "checkpoint_00000006"
    inherited = set()
    for r in range(2):
        inherited |= set(checkpoints.safe_load(first / f"loop-rank{r}.pt", "loop")["names"])
    out = _torchrun(1, [*flags, "--steps", "9"], tmp_path, free_port())
    final = tmp_path / "runs" / "el" / "checkpoint_00000009"
    hist = json.loads((final / "history.json").read_text())
    assert hist["step"] == list(range(1, 10)) and hist["workers"] == [2] * 6 + [1] * 3, hist
    assert hist["restarted_from"] == [6]
    state = checkpoints.safe_load(final / "loop-rank0.pt", "loop")
    assert state["epoch"] == 0, "the test expects the epoch still running"
    names = state["names"]
    assert len(names) == len(set(names)), "a shape trained twice in one epoch"
    assert inherited < set(names), (sorted(inherited - set(names)), out[-2000:])
    assert json.loads((final / "meta.json").read_text())["world_size"] == 1
