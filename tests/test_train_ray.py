"""Ray Train + DeepSpeed on the CPU: two gloo workers, ZeRO-2 and ZeRO-3, a killed worker, ray job submit."""
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from pipeline.shards import write_shard
from pipeline.train.config import TrainConfig
from pipeline.train.synthetic import synthetic_rows

RES = 64


@pytest.fixture(scope="module")
def train_shards(tmp_path_factory):
    """Shards of 8 analytic shapes plus one file that is not a shard (skipped and counted)."""
    root = tmp_path_factory.mktemp("train-data")
    write_shard(str(root), synthetic_rows(8, RES, seed=3))
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"mesh_id": ["x"], "oops": [1]}), root / "shards" / str(RES) / "part-bad.parquet")
    return str(root)


@pytest.fixture(scope="module")
def ray_driver(ray_cluster, tmp_path_factory):
    import ray

    ext = str(tmp_path_factory.mktemp("torch-ext"))  # DeepSpeed's JIT-built comm op goes here, not ~/.cache
    saved = {k: os.environ.get(k) for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "TORCH_EXTENSIONS_DIR",
                                            "RAY_DATA_DISABLE_PROGRESS_BARS")}
    os.environ.update({k: v for k, v in ray_cluster.env.items() if k.startswith("RAY_AUTH")})
    os.environ.update({"TORCH_EXTENSIONS_DIR": ext, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"})
    ray.init(address=ray_cluster.address)
    yield ray_cluster
    ray.shutdown()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _cfg(shards, tmp_path, **kw):
    base = dict(network="dit", shards=shards, resolution=RES, model="debug", num_workers=2, cpus_per_worker=0.5,
                token_budget=1500, lr=2e-3, ema_decay=0.9, storage=str(tmp_path / "runs"), name="run",
                cond_drop=0.1, seed=0)
    base.update(kw)
    return TrainConfig(**base)


def _history(result):
    return json.loads(Path(result.checkpoint.path, "history.json").read_text())


def test_zero2_two_workers_loss_falls_and_samples_beat_noise(ray_driver, train_shards, tmp_path):
    from pipeline.train import trainer

    cfg = _cfg(train_shards, tmp_path, zero_stage=2, steps=40, checkpoint_every=20)
    result = trainer.run(cfg)
    assert result.metrics["step"] == 40
    assert len(result.skipped_shards) == 1 and "part-bad.parquet" in result.skipped_shards[0]
    hist = _history(result)
    assert hist["step"] == list(range(1, 41))
    first, last = sum(hist["loss"][:5]) / 5, sum(hist["loss"][-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert Path(result.checkpoint.path, "loss_curve.png").stat().st_size > 1000

    # The trained network, sampled with the flow sampler, gives latents that decode nearer the shape than noise.
    from model import pooled_latent
    from model.condition import build_image_encoder, decode_image
    from model.dit import SparseDiT
    from model.flow import FlowEulerSampler
    from pipeline.shards import read_samples
    from pipeline.train.checkpoints import load_weights

    weights = load_weights(result.checkpoint.path, "dit")
    dit = SparseDiT(weights["model_config"]).eval()
    dit.load_state_dict({k.removeprefix("dit."): v for k, v in weights["state_dict"].items()})
    encoder = build_image_encoder("tiny")
    sampler = FlowEulerSampler(steps=20, shift=1.0, guidance=2.0)
    wins, gen = 0, torch.Generator().manual_seed(0)
    samples = list(read_samples(train_shards, RES, on_error="skip"))
    for s in samples:
        coords, _ = pooled_latent.encode(s.coords, s.values)
        cu = torch.tensor([0, len(coords)])
        cond = encoder(decode_image(s.views[0].png, encoder.image_size)[None])

        def velocity(x, t, c):
            return dit(x, coords, cu, t.reshape(1), c)

        noise = torch.randn(len(coords), pooled_latent.CHANNELS, generator=gen)
        x = sampler.sample(velocity, noise, cond, torch.zeros_like(cond))
        truth = -1 + (s.coords[s.values.abs() < 0.5].float() + 0.5) * 2 / RES
        d_model = pooled_latent.chamfer(pooled_latent.decode_points(coords, x, RES), truth)
        d_noise = pooled_latent.chamfer(pooled_latent.decode_points(coords, noise, RES), truth)
        wins += d_model < d_noise
    assert wins >= len(samples) - 1, f"sampled latents beat noise on {wins} of {len(samples)} shapes"


def test_zero3_runs_and_gathers_full_weights(ray_driver, train_shards, tmp_path):
    from model.dit import SparseDiT
    from pipeline.train import trainer
    from pipeline.train.checkpoints import load_weights

    result = trainer.run(_cfg(train_shards, tmp_path, zero_stage=3, steps=4, checkpoint_every=4))
    assert result.metrics["step"] == 4
    weights = load_weights(result.checkpoint.path, "dit")
    dit = SparseDiT(weights["model_config"])
    dit.load_state_dict({k.removeprefix("dit."): v for k, v in weights["state_dict"].items()})  # full shapes
    assert any(name.startswith("zero_pp_rank_1") for name in os.listdir(Path(result.checkpoint.path, "state")))


def test_killed_worker_resumes_from_last_checkpoint(ray_driver, train_shards, tmp_path):
    from pipeline.train import trainer

    cfg = _cfg(train_shards, tmp_path, zero_stage=2, steps=60, checkpoint_every=5, max_failures=2, name="killed")
    out = {}
    thread = threading.Thread(target=lambda: out.setdefault("result", trainer.run(cfg)))
    thread.start()
    run_dir = Path(cfg.storage, cfg.name)
    killed = None
    deadline = time.monotonic() + 300
    while thread.is_alive() and time.monotonic() < deadline and killed is None:
        if list(run_dir.glob("checkpoint_*/meta.json")):  # a checkpoint exists: kill a worker mid-run
            pids = ray_driver.worker_pids("RayTrainWorker")
            if pids:
                killed = pids[-1]
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    thread.join(timeout=400)
    assert killed is not None, "the run ended before a worker could be killed"
    result = out["result"]
    assert result.metrics["step"] == 60
    hist = _history(result)
    assert hist["step"] == list(range(1, 61)), "steps lost or repeated in the history"
    assert hist["restarted_from"] and all(s % 5 == 0 and s > 0 for s in hist["restarted_from"])


def test_same_job_spec_runs_through_ray_job_submit(ray_driver, train_shards, tmp_path):
    from pipeline.jobs import load_job_spec, with_overrides

    spec = with_overrides(load_job_spec(Path(__file__).parents[1] / "jobs" / "train_dit.yaml"), [
        f"shards={train_shards}", f"resolution={RES}", "model=debug", "steps=2", "num_workers=1", "use_gpu=false",
        "cpus_per_worker=0.5", "token_budget=1500", f"storage={tmp_path}/runs", "name=submitted", "curriculum="])
    assert spec.argv()[:3] == ["s2", "train", "dit"]
    ray = os.path.join(os.path.dirname(os.sys.executable), "ray")
    env = {**ray_driver.env, "TORCH_EXTENSIONS_DIR": os.environ["TORCH_EXTENSIONS_DIR"],
           "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    res = subprocess.run([ray, "job", "submit", "--address", ray_driver.dashboard, "--", *spec.argv()],
                         env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metas = list(Path(tmp_path, "runs", "submitted").glob("checkpoint_*/meta.json"))
    assert [json.loads(m.read_text())["step"] for m in metas] == [2]
