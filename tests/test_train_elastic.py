"""Training that continues on another number of workers: ZeRO-1/2/3 state resharded from the per-rank files
(two ranks to one and three, three to two), a checkpoint that does not fit refused by name, and the data
position regrouped so that no shape of the current epoch is trained twice or left out."""

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
    for stage in (0, 1, 2, 3):
        checkpoints.check_resumable({**meta, "zero_stage": stage}, "ckpt", network="dit", resolution=64, world_size=3)
    with pytest.raises(checkpoints.CheckpointMismatch, match="earlier version"):
        checkpoints.check_resumable(meta, "ckpt", network="dit", resolution=64, world_size=1)


def test_elastic_config_checks():
    from pipeline.config import ConfigError
    from pipeline.train.config import TrainConfig

    assert TrainConfig(num_workers=4, min_workers=2).elastic and not TrainConfig(num_workers=4).elastic
    TrainConfig(num_workers=4, min_workers=2, zero_stage=3).validate()  # ZeRO-3 state reshards too
    with pytest.raises(ConfigError, match="min_workers"):
        TrainConfig(num_workers=2, min_workers=3).validate()


def _ranks(n: int, args: list[str], cwd: Path, timeout: float = 300) -> str:
    """``n`` gloo ranks of ``python args`` started directly (no launcher): rank 0's output."""
    from servers import free_port

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(n),
           "LOCAL_WORLD_SIZE": str(n)}
    procs = [subprocess.Popen([sys.executable, *args], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, cwd=cwd,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for r in range(n)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for r, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {r} of {n}:\n" + out[-5000:]
    return outs[0]


def _reshard(tmp_path: Path, stage: int, mode: str, n: int, *extra: str) -> dict:
    _ranks(n, [str(ROOT / "tests" / "reshard_worker.py"), str(tmp_path), str(stage), mode, *extra], tmp_path)
    return torch.load(tmp_path / f"{mode}-{n}.pt")


def _same_state(ref: dict, other: dict, exact: bool) -> None:
    for key in ("fp32", "exp_avg", "exp_avg_sq"):
        for i, (a, b) in enumerate(zip(ref[key], other[key], strict=True)):
            if exact:  # the same sums in the same order
                assert torch.equal(a, b), (key, i)
            else:  # another all-reduce order
                torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7, msg=f"{key} of parameter {i}")
    assert ref["lr"] == other["lr"]


@pytest.mark.integration
@pytest.mark.parametrize("stage,sub_group", [(1, None), (2, None), (3, None), (3, "50")])
def test_zero_state_resharded_equals_its_saved_state(tmp_path, stage, sub_group):
    """Saved by two ranks, loaded by one and by three: the fp32 master weights and Adam's moments are the
    saved ones, so three more steps give what the two ranks' own three more steps gave. ZeRO-3 with
    sub-groups of 50 values: the parameters fall into other sub-groups on 1, 2 and 3 ranks."""
    extra = [sub_group] if sub_group else []
    ref = _reshard(tmp_path, stage, "save", 2, *extra)
    one, three = _reshard(tmp_path, stage, "load", 1, *extra), _reshard(tmp_path, stage, "load", 3, *extra)
    _same_state(ref, one, exact=True)
    _same_state(ref, three, exact=False)
    if sub_group:
        assert (ref["sub_groups"], one["sub_groups"], three["sub_groups"]) == (2, 3, 2)


@pytest.fixture(scope="module")
def zero3_of_three(tmp_path_factory):
    """A ZeRO-3 checkpoint written by three ranks, with the state it holds and the three ranks' next steps."""
    folder = tmp_path_factory.mktemp("zero3-of-3")
    return folder, _reshard(folder, 3, "save", 3)


@pytest.mark.integration
def test_zero3_of_three_ranks_continues_on_two(zero3_of_three, tmp_path):
    """More than two workers: three ZeRO-3 ranks checkpoint, two continue, equal within rounding."""
    import shutil

    folder, ref = zero3_of_three
    shutil.copytree(folder / "state", tmp_path / "state")
    _same_state(ref, _reshard(tmp_path, 3, "load", 2), exact=False)


def _tiny_engine(stage: int, hidden: int = 13):
    import torch.distributed as dist

    from pipeline.train.config import TrainConfig
    from pipeline.train.engine import make_engine

    if not dist.is_initialized():
        dist.init_process_group("gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(7, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 5),
                                torch.nn.Linear(5, 3))
    return make_engine(model, TrainConfig(zero_stage=stage, lr=1e-2, warmup_steps=4))[0]


@pytest.mark.integration
def test_zero3_checkpoint_that_does_not_fit_is_a_reshard_error(zero3_of_three, tmp_path, local_dist):
    """Each file checked before anything changes: a missing rank, a short partition, a moment left out, a
    wrong rank count, another model or another ZeRO stage is one ReshardError naming the file; the whole
    checkpoint then loads on one rank with the saved weights and moments bit for bit."""
    import shutil

    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from pipeline.train.reshard import ReshardError, load_resharded

    folder, _ = zero3_of_three
    saved = torch.load(folder / "saved-3.pt")
    engine = _tiny_engine(3)
    optim = "zero_pp_rank_{}_mp_rank_00_optim_states.pt"
    states = "zero_pp_rank_{}_mp_rank_00_model_states.pt"

    def broken(name: str, edit) -> Path:
        case = tmp_path / name
        shutil.copytree(folder / "state", case / "state")
        edit(case / "state")
        return case

    def rewrite(path: Path, change) -> None:
        blob = checkpoints.safe_load(path, str(path))
        change(blob)
        torch.save(blob, path)

    def short(blob):
        flats = blob["optimizer_state_dict"]["fp32_flat_groups"]
        flats[0] = flats[0][:-1]

    cases = {
        "no-rank-0": (lambda d: os.remove(d / optim.format(0)), r"optim_states.pt files of ranks \[1, 2\]"),
        "short": (lambda d: rewrite(d / optim.format(1), short), "sub-group 0 fp32 weights holds"),
        "no-moment": (lambda d: rewrite(d / optim.format(2), lambda b: b["optimizer_state_dict"][
            "optimizer_state_dict"]["state"][0].pop("exp_avg_sq")), "has no exp_avg_sq"),
        "ranks": (lambda d: rewrite(d / states.format(1), lambda b: b.update(dp_world_size=2)),
                  "written by 2 ranks"),
    }
    for name, (edit, message) in cases.items():
        with pytest.raises(ReshardError, match=message):
            load_resharded(engine, str(broken(name, edit)), "state")
    with pytest.raises(ReshardError, match=r"has shape \(13, 7\) in the checkpoint, \(12, 7\) here"):
        load_resharded(_tiny_engine(3, hidden=12), str(folder), "state")
    with pytest.raises(ReshardError, match="written by ZeRO stage 3; this run uses stage 2"):
        load_resharded(_tiny_engine(2), str(folder), "state")

    assert load_resharded(engine, str(folder), "state")["step"] == 3
    params = list(engine.module.parameters())
    loaded = {"fp32": [safe_get_full_fp32_param(p) for p in params],
              "exp_avg": [safe_get_full_optimizer_state(p, "exp_avg") for p in params],
              "exp_avg_sq": [safe_get_full_optimizer_state(p, "exp_avg_sq") for p in params], "lr": engine.get_lr()}
    _same_state(saved, loaded, exact=True)


@pytest.mark.integration
def test_run_continues_on_fewer_workers(tmp_path):
    """``python -m pipeline.train`` on two ranks, resumed on one: the steps go on from the checkpoint, the
    history names the worker count of every step, and no shape of the epoch is trained twice."""
    flags = ["-m", "pipeline.train", "dit", "--shards", "synthetic", "--synthetic-shapes", "120", "--resolution", "64",
             "--model", "debug", "--token-budget", "450", "--storage", str(tmp_path / "runs"), "--name", "el",
             "--checkpoint-every", "3", "--report-every", "3", "--lr", "1e-3", "--cache-gb", "0"]
    _ranks(2, [*flags, "--steps", "6"], tmp_path)
    first = tmp_path / "runs" / "el" / "checkpoint_00000006"
    inherited = set()
    for r in range(2):
        inherited |= set(checkpoints.safe_load(first / f"loop-rank{r}.pt", "loop")["names"])
    out = _ranks(1, [*flags, "--steps", "9"], tmp_path)
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
