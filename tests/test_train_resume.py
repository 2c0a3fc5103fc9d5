"""Resume restores everything a step depends on, bit for bit; loss falls without Ray (CPU, one process)."""
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pipeline.shards import write_shard
from pipeline.train import checkpoints
from pipeline.train.config import TrainConfig
from pipeline.train.synthetic import synthetic_rows

RES = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """8 analytic shapes without views (the zero condition): the DiT trains in ~30 ms a step."""
    root = tmp_path_factory.mktemp("resume-data")
    write_shard(str(root), [dataclasses.replace(r, views=[]) for r in synthetic_rows(8, RES, seed=3)])
    return str(root)


def _cfg(shards, storage, **kw):
    base = dict(network="dit", shards=shards, resolution=RES, model="debug", token_budget=1500, lr=2e-3,
                ema_decay=0.9, storage=str(storage), name="run", cond_drop=0.3, keep_checkpoints=10, seed=0)
    return TrainConfig(**{**base, **kw})


def _train(cfg):
    from pipeline.train.loop import run_without_ray

    return run_without_ray(cfg)


def _files(ckpt: Path) -> dict:
    """Every tensor file of a checkpoint, loaded the safe way."""
    return {p.relative_to(ckpt).as_posix(): checkpoints.safe_load(p, str(p)) for p in sorted(ckpt.rglob("*.pt"))}


def _assert_same(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), (where, set(a) ^ set(b))
        for k in a:
            _assert_same(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    elif hasattr(a, "__dict__") and not isinstance(a, type):  # DeepSpeed's LossScaler record
        assert type(a) is type(b), where
        _assert_same(vars(a), vars(b), where)
    else:
        assert a == b or (a != a and b != b), (where, a, b)


def test_loss_falls_without_ray(local_dist, shards, tmp_path):
    out = _train(_cfg(shards, tmp_path, steps=40, checkpoint_every=40, cond_drop=0.1))
    loss = out["history"]["loss"]
    assert len(loss) == 40 and out["skipped_shapes"] == []
    assert sum(loss[-5:]) / 5 < 0.8 * sum(loss[:5]) / 5, loss


@pytest.mark.parametrize("zero_stage,split,epoch", [(2, 5, 0), (3, 7, 1)])
def test_resumed_run_is_the_uninterrupted_run_bit_for_bit(local_dist, shards, tmp_path, zero_stage, split, epoch):
    """Weights, optimizer moments, LR schedule, EMA, data position and random generators all come back:
    a run stopped at ``split`` and resumed gives the losses and the final checkpoint of one that never stopped.

    8 shapes of 8-64 latent tokens in batches of 70 tokens: 5 steps in epoch 0, so the runs cross into the
    cached, shuffled epochs; split 5 resumes at the end of epoch 0, split 7 inside epoch 1."""
    steps = 11
    cfg = dict(steps=steps, checkpoint_every=steps, zero_stage=zero_stage, token_budget=70)
    whole = _train(_cfg(shards, tmp_path, name="whole", **cfg))
    _train(_cfg(shards, tmp_path, name="split", **{**cfg, "steps": split, "checkpoint_every": split}))
    saved = _files(tmp_path / "split" / f"checkpoint_{split:08d}")
    assert (saved["loop-rank0.pt"]["epoch"], saved["loop-rank0.pt"]["consumed"] > 0) == (epoch, True)

    resumed = _train(_cfg(shards, tmp_path, name="split", **cfg))
    assert resumed["history"]["restarted_from"] == [split]
    assert resumed["history"]["step"] == list(range(1, steps + 1))
    assert resumed["history"]["loss"] == whole["history"]["loss"]  # exact floats, every step
    a, b = (_files(tmp_path / name / f"checkpoint_{steps:08d}") for name in ("whole", "split"))
    _assert_same(a, b)  # EMA weights, DeepSpeed's weights, Adam moments, scheduler, loop state


def test_restore_gives_back_the_saved_state(local_dist, shards, tmp_path):
    """Restoring into a fresh engine (other random weights) yields exactly the tensors the files hold."""
    from pipeline.train.engine import EMA, make_engine
    from pipeline.train.tasks import build_task

    _train(_cfg(shards, tmp_path, steps=2, checkpoint_every=2, zero_stage=2))
    ckpt = tmp_path / "run" / "checkpoint_00000002"
    cfg = _cfg(shards, tmp_path, seed=5)
    torch.manual_seed(5)
    task = build_task(cfg, seed=11)
    engine, opt, sched = make_engine(task.module, cfg)
    ema = EMA(engine.module, 0.9)
    step = checkpoints.restore(str(ckpt), engine, ema, network="dit", model_config=task.model_config,
                               resolution=RES, world_size=1)
    position = checkpoints.restore_loop_state(str(ckpt), 0, task, torch.device("cpu"))
    files = _files(ckpt)
    model, optim = files["state/mp_rank_00_model_states.pt"], files["state/zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    loop, weights = files["loop-rank0.pt"], files["weights.pt"]
    assert step == 2 and (position["epoch"], position["consumed"]) == (loop["epoch"], loop["consumed"])
    _assert_same({k: v for k, v in engine.module.state_dict().items()}, model["module"])
    saved_opt = optim["optimizer_state_dict"]
    _assert_same(opt.optimizer.state_dict()["state"], saved_opt["base_optimizer_state"]["state"])
    _assert_same(list(opt.single_partition_of_fp32_groups), saved_opt["single_partition_of_fp32_groups"])
    _assert_same(sched.state_dict(), model["lr_scheduler"])
    _assert_same(ema.full_state_dict(), weights["state_dict"])
    _assert_same(task.gen.get_state(), loop["condition_rng"])
    _assert_same(torch.get_rng_state(), loop["torch_rng"])
    assert list(task.rng.getstate()[1]) == loop["python_rng"]
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 2


def test_no_op_is_built_and_no_lock_is_touched(local_dist, shards, tmp_path, monkeypatch):
    """A run compiles nothing and leaves a build folder alone: a lock another run holds stays (a second
    run used to delete every lock and killed the first run's rank)."""
    ext = tmp_path / "torch-ext"
    held = ext / "deepspeed_shm_comm" / "lock"
    held.parent.mkdir(parents=True)
    held.write_text("")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(ext))
    _train(_cfg(shards, tmp_path, steps=1, checkpoint_every=1))
    assert held.exists()
    assert sorted(p.relative_to(ext).as_posix() for p in ext.rglob("*")) == ["deepspeed_shm_comm",
                                                                             "deepspeed_shm_comm/lock"]


def test_exported_folder_holds_the_buffers(tmp_path):
    """A network with a persistent buffer (the structure DiT's position table) exports a folder that loads:
    the EMA covers parameters only, so the buffers are added from the module."""
    from model.cascade import random_network
    from model.checkpoint import from_pretrained

    bundle = random_network("structure_dit", "debug", cond_dim=64)
    task = torch.nn.Module()
    task.dit = bundle.module
    ema = {n: p.detach().clone() for n, p in task.named_parameters()}
    assert "dit.pos_emb" in checkpoints.persistent_buffers(task) and "dit.pos_emb" not in ema
    folder = checkpoints.export_folder(str(tmp_path / "model"), "structure_dit", bundle.config,
                                       {**checkpoints.persistent_buffers(task), **ema}, {"step": 1})
    loaded = from_pretrained(folder, "dense_dit")
    torch.testing.assert_close(loaded.module.pos_emb, bundle.module.pos_emb, rtol=0, atol=0)


class _LaggingSession:
    """A session like Ray Train's when its controller lags behind the run folder: the workers are handed the
    checkpoint ``handed`` (a folder; None: none at all) while the folder holds newer finished ones."""

    def __new__(cls, cfg, handed=None):
        import contextlib

        from pipeline.train.loop import LocalSession

        class Session(LocalSession):
            def checkpoint_dir(self):
                return contextlib.nullcontext(str(handed)) if handed else None

            def checkpoint_step(self):
                return json.loads(Path(handed, "meta.json").read_text())["step"] if handed else None

        return Session(cfg)


def _as_ray_names(run: Path) -> None:
    for i, ckpt in enumerate(sorted(run.glob("checkpoint_*"))):
        ckpt.rename(run / f"checkpoint_2026-01-01_00-00-{10 + i:02d}.000000")


def _train_handed(cfg, handed=None):
    from pipeline.train import loop

    return loop.run_loop(cfg, _LaggingSession(cfg, handed))


def test_workers_handed_no_checkpoint_resume_from_the_newest_every_rank_finished(local_dist, shards, tmp_path,
                                                                                 caplog):
    """Ray Train may hand a restarted worker group no checkpoint although the run folder holds finished ones
    (a worker lost before its controller recorded them): the run continues from the newest finished one,
    bit for bit the run that never stopped, instead of training from step 0 again."""
    steps = 9
    cfg = dict(steps=steps, checkpoint_every=3, zero_stage=2, token_budget=70)
    whole = _train(_cfg(shards, tmp_path, name="whole", **cfg))
    _train(_cfg(shards, tmp_path, name="lost", **{**cfg, "steps": 6}))
    run = tmp_path / "lost"
    manifest = json.loads((run / "checkpoint_00000006" / "files-rank0.json").read_text())
    assert manifest["step"] == 6 and {"meta.json", "weights.pt", "loop-rank0.pt", "history.json",
                                      "state/mp_rank_00_model_states.pt"} <= set(manifest["files"])
    _as_ray_names(run)
    with caplog.at_level("WARNING", logger="pipeline.train.loop"):
        resumed = _train_handed(_cfg(shards, tmp_path, name="lost", **cfg))
    assert "handed the workers no checkpoint; resuming from" in caplog.text
    assert "checkpoint_2026-01-01_00-00-11" in caplog.text
    assert resumed["history"]["restarted_from"] == [6]
    assert resumed["history"]["step"] == list(range(1, steps + 1))
    assert resumed["history"]["loss"] == whole["history"]["loss"]


def test_workers_handed_an_older_checkpoint_resume_from_the_newest_every_rank_finished(local_dist, shards,
                                                                                     tmp_path, caplog):
    """Ray Train's controller may record checkpoints late (one run lost a worker at step 30 and was handed
    step 10): the workers continue from the newest finished checkpoint instead of redoing the steps."""
    steps = 9
    cfg = dict(steps=steps, checkpoint_every=3, zero_stage=2, token_budget=70)
    whole = _train(_cfg(shards, tmp_path, name="whole", **cfg))
    _train(_cfg(shards, tmp_path, name="late", **{**cfg, "steps": 6}))
    _as_ray_names(tmp_path / "late")
    older = tmp_path / "late" / "checkpoint_2026-01-01_00-00-10.000000"
    with caplog.at_level("WARNING", logger="pipeline.train.loop"):
        resumed = _train_handed(_cfg(shards, tmp_path, name="late", **cfg), handed=older)
    assert "handed the workers the checkpoint of step 3; resuming from" in caplog.text
    assert resumed["history"]["restarted_from"] == [6]
    assert resumed["history"]["loss"] == whole["history"]["loss"]


def test_a_checkpoint_a_rank_did_not_finish_is_never_resumed(local_dist, shards, tmp_path, caplog):
    """A file cut short, a manifest missing, another model config: such checkpoints are passed over for an
    older finished one; with none left the run starts from step 0 and the log names what it found."""
    from pipeline.train.loop import newest_finished
    from pipeline.train.tasks import build_task

    cfg = _cfg(shards, tmp_path, steps=6, checkpoint_every=2, token_budget=70)
    _train(cfg)
    run = tmp_path / "run"
    model_config = build_task(cfg, seed=0).model_config
    uri, step, found = newest_finished(cfg, model_config)
    assert (Path(uri).name, step, len(found)) == ("checkpoint_00000006", 6, 3)
    loop_file = run / "checkpoint_00000006" / "loop-rank0.pt"
    loop_file.write_bytes(loop_file.read_bytes()[:-1])  # an upload cut short
    assert Path(newest_finished(cfg, model_config)[0]).name == "checkpoint_00000004"
    (run / "checkpoint_00000004" / "files-rank0.json").unlink()  # a rank that never finished
    assert Path(newest_finished(cfg, model_config)[0]).name == "checkpoint_00000002"
    other = dataclasses.replace(model_config, depth=model_config.depth + 1)
    with caplog.at_level("WARNING", logger="pipeline.train.loop"):
        assert newest_finished(cfg, other) == (None, None, found)
    assert "not resuming checkpoint_00000002" in caplog.text
    caplog.clear()
    (run / "checkpoint_00000002" / "weights.pt").unlink()
    with caplog.at_level("WARNING", logger="pipeline.train.loop"):
        out = _train_handed(_cfg(shards, tmp_path, steps=2, checkpoint_every=2, token_budget=70))
    assert out["history"]["restarted_from"] == [] and out["history"]["step"] == [1, 2]
    assert "none of the 3 in its folder finished" in caplog.text and "step 0" in caplog.text


def test_listing_checkpoints_never_stops_the_run(tmp_path, monkeypatch, caplog):
    from pipeline.train import loop

    def unreachable(*a, **k):
        raise OSError("storage unreachable")

    monkeypatch.setattr(loop.storage, "filesystem", unreachable)
    with caplog.at_level("WARNING", logger="pipeline.train.loop"):
        assert loop.newest_finished(_cfg("unused", tmp_path), None) == (None, None, [])
    assert "storage unreachable" in caplog.text


def test_the_step_ray_train_hands_is_read_from_its_meta(tmp_path, caplog):
    """RaySession.checkpoint_step reads the handed checkpoint's step through its own filesystem; an unreadable
    meta.json counts as older than any finished checkpoint (-1), and none handed is None."""
    from types import SimpleNamespace

    import pyarrow.fs

    from pipeline.train.loop import RaySession

    good, bad = tmp_path / "good", tmp_path / "bad"
    good.mkdir()
    bad.mkdir()
    (good / "meta.json").write_text(json.dumps({"step": 30}))
    (bad / "meta.json").write_text("{not json")
    session = object.__new__(RaySession)
    for handed, want in ((good, 30), (bad, -1), (tmp_path / "missing", -1), (None, None)):
        ckpt = SimpleNamespace(filesystem=pyarrow.fs.LocalFileSystem(), path=str(handed)) if handed else None
        session.train = SimpleNamespace(get_checkpoint=lambda c=ckpt: c)
        with caplog.at_level("WARNING", logger="pipeline.train.loop"):
            assert session.checkpoint_step() == want, handed
    assert "no readable step" in caplog.text and "bad" in caplog.text


def test_threads_file_sets_the_workers_threads_between_steps(local_dist, shards, tmp_path, caplog):
    """A run given ``threads_file`` follows the number in it; a bad number is named and changes nothing. The
    run's ``cpu_conv_precision`` reaches the process's CPU convolutions the same way (set at the loop's start)."""
    from kernels.sparse_conv import gather_gemm
    from pipeline.train.loop import ThreadsFile

    before = torch.get_num_threads()
    path = tmp_path / "threads"
    try:
        path.write_text("2\n")
        _train(_cfg(shards, tmp_path / "runs", steps=2, threads_file=str(path), cpu_conv_precision="bf16"))
        assert torch.get_num_threads() == 2 and gather_gemm.GEMM_DTYPE is torch.bfloat16

        watch = ThreadsFile(str(path))
        assert watch.poll() is None  # 2 already
        path.write_text("1\n")
        assert watch.poll() == 1 and torch.get_num_threads() == 1
        assert watch.poll() is None  # unchanged file: not read again
        path.write_text("many\n")
        with caplog.at_level("WARNING"):
            assert watch.poll() is None
        assert torch.get_num_threads() == 1 and "expected a positive integer, got 'many'" in caplog.text
        path.unlink()
        assert watch.poll() is None and ThreadsFile("").poll() is None
    finally:
        torch.set_num_threads(before)
        gather_gemm.GEMM_DTYPE = None


def test_structure_vae_convolutions_follow_cpu_conv_precision(local_dist, tmp_path, monkeypatch):
    """``cpu_conv_precision`` bf16 runs the structure VAE's dense 3D convolutions on bfloat16 operands (CPU
    autocast) while its loss stays float32 and finite; fp32 keeps every convolution in float32."""
    import math

    from kernels.sparse_conv import gather_gemm

    shards = tmp_path / "shards"  # the structure grid is 64³
    write_shard(str(shards), [dataclasses.replace(r, views=[]) for r in synthetic_rows(2, 64, seed=3)])
    seen: list[torch.dtype] = []
    conv = torch.nn.Conv3d.forward

    def spy(self, x):
        out = conv(self, x)
        seen.append(out.dtype)
        return out

    monkeypatch.setattr(torch.nn.Conv3d, "forward", spy)
    try:
        for precision, want in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
            seen.clear()
            result = _train(_cfg(str(shards), tmp_path / precision, network="structure_vae", steps=2, resolution=64, token_budget=4096,
                                 cpu_conv_precision=precision))
            assert seen and set(seen) == {want}, (precision, set(seen))
            assert len(result["history"]["loss"]) == 2 and all(math.isfinite(x) for x in result["history"]["loss"])
    finally:
        gather_gemm.GEMM_DTYPE = None


@pytest.mark.parametrize("zero_stage", [2, 3])
def test_engine_takes_the_one_kernel_adamw_and_it_updates_as_the_default(local_dist, zero_stage):
    """On the CPU the engine's AdamW is torch's fused one (one pass over each tensor a step; the default is a
    loop of per-tensor ops) except under ZeRO-3, where resharding must stay bit for bit; its weights after three
    steps equal the default path's."""
    import torch.distributed as dist

    from pipeline.train.engine import full_weights, fused_adamw_ok, make_engine

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = torch.nn.Linear(6, 16), torch.nn.Linear(16, 1)

        def forward(self, x, y):
            return ((self.b(torch.tanh(self.a(x))) - y) ** 2).mean()

    if not dist.is_initialized():  # the world of one that a run in this module would make
        dist.init_process_group("gloo")
    x, y = torch.randn(32, 6, generator=torch.Generator().manual_seed(1)), torch.randn(32, 1)
    cfg = TrainConfig(zero_stage=zero_stage, lr=1e-2, warmup_steps=1, weight_decay=0.01)
    weights = {}
    assert fused_adamw_ok(list(Net().parameters()), zero_stage) is (zero_stage != 3)
    for fused in (True, False):
        torch.manual_seed(0)
        engine, opt, _ = make_engine(Net(), cfg, fused=fused)
        assert opt.optimizer.defaults["fused"] is fused
        start = {n: w.clone() for n, w in full_weights(engine.module).items()}
        for _ in range(3):
            engine.backward(engine(x, y))
            engine.step()
        weights[fused] = full_weights(engine.module)
        assert all((weights[fused][n] - start[n]).abs().max() > 1e-3 for n in start)  # three real updates
    for n, w in weights[True].items():
        torch.testing.assert_close(w, weights[False][n], rtol=1e-5, atol=1e-6)
