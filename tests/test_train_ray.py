"""Ray Train + DeepSpeed on the CPU: two gloo workers, ZeRO-2 and ZeRO-3, a killed worker, ray job submit."""
import json
import sys
import os
import signal
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch

from pipeline.shards import write_shard
from pipeline.train.synthetic import synthetic_rows

# multi-worker Ray Train runs (minutes each): the end-to-end phase after the default suite (.ci/run)
pytestmark = pytest.mark.integration

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
def ray_env(ray_cluster, tmp_path_factory):
    """Environment of a driver on the test cluster (a private extensions folder: nothing is JIT-built there)."""
    ext = tmp_path_factory.getbasetemp() / "torch-ext"
    ext.mkdir(exist_ok=True)
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address, "RAY_DATA_DISABLE_PROGRESS_BARS": "1",
           "TORCH_EXTENSIONS_DIR": str(ext)}
    return env


def _flags(shards=None, storage=None, **kw):
    base = dict(shards=shards, resolution=RES, model="debug", num_workers=2, cpus_per_worker=0.5,
                token_budget=1500, lr=2e-3, ema_decay=0.9, storage=str(storage), name="run", cond_drop=0.1, seed=0)
    base.update(kw)
    return [x for k, v in base.items() for x in ("--" + k.replace("_", "-"), str(v))]


def _s2(env, args, **popen):
    s2 = os.path.join(os.path.dirname(sys.executable), "s2")
    return subprocess.Popen([s2, "train", "dit", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, **popen)


def _final_checkpoint(run_dir: Path) -> Path:
    metas = sorted(run_dir.glob("checkpoint_*/meta.json"), key=lambda m: json.loads(m.read_text())["step"])
    assert metas, f"no checkpoint under {run_dir}"
    return metas[-1].parent


def _history(ckpt: Path):
    return json.loads(Path(ckpt, "history.json").read_text())


def test_zero2_two_workers_loss_falls_and_samples_beat_noise(ray_env, train_shards, tmp_path):
    proc = _s2(ray_env, _flags(train_shards, tmp_path, zero_stage=2, steps=40, checkpoint_every=20, report_every=10))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out[-4000:]
    assert "part-bad.parquet: not a shard of this project" in out
    ckpt = _final_checkpoint(tmp_path / "run")
    hist = _history(ckpt)
    assert hist["step"] == list(range(1, 41))
    first, last = sum(hist["loss"][:5]) / 5, sum(hist["loss"][-5:]) / 5
    assert last < 0.8 * first, (first, last)
    assert Path(ckpt, "loss_curve.png").stat().st_size > 1000

    # weights.pt names its network, model config and grid resolution: the generation cascade refuses the
    # network at another resolution.
    from model.cascade import Cascade, GenerationConfig, load_network, random_network
    from model.condition import build_image_encoder

    dit = load_network(str(ckpt), "dit")
    assert dit.meta == {"step": 40, "resolution": RES, "latent_space": "pooled"}
    enc = build_image_encoder("tiny")
    others = dict(structure_vae=random_network("structure_vae"), structure_dit=random_network("structure_dit",
                                                                                              cond_dim=enc.dim))
    Cascade(GenerationConfig(resolution=RES), enc, dit=dit, **others)
    with pytest.raises(ValueError, match=f"trained at resolution {RES}, resolution is {2 * RES}"):
        Cascade(GenerationConfig(resolution=2 * RES), enc, dit=dit, **others)

    # The trained network, sampled with the flow sampler, gives latents that decode nearer the shape than noise.
    from model import pooled_latent
    from model.condition import build_image_encoder, decode_image
    from model.dit import DiTConfig, SparseDiT
    from model.flow import FlowEulerSampler
    from model.sparse import SparseTensor
    from pipeline.shards import read_samples
    from pipeline.train.checkpoints import load_weights, model_config_of

    weights = load_weights(str(ckpt), "dit")
    dit = SparseDiT(model_config_of(weights, DiTConfig)).eval()
    dit.load_state_dict({k.removeprefix("dit."): v for k, v in weights["state_dict"].items()})
    encoder = build_image_encoder("tiny")
    sampler = FlowEulerSampler(steps=10, shift=1.0, guidance=1.0)
    gen = torch.Generator().manual_seed(0)
    d_model, d_noise = [], []
    for s in list(read_samples(train_shards, RES, on_error="skip"))[:4]:
        coords, _ = pooled_latent.encode(s.coords, s.values)
        cond = encoder(decode_image(s.views[0].png, encoder.image_size)[None])
        noise = torch.randn(len(coords), pooled_latent.CHANNELS, generator=gen)
        tokens = SparseTensor.packed(coords, noise, torch.tensor([0, len(coords)]))

        def velocity(x, t, c):
            return dit(tokens.replace(x), t.reshape(1), c).feats

        x = sampler.sample(velocity, noise, cond)
        truth = -1 + (s.coords[s.values.abs() < 0.5].float() + 0.5) * 2 / RES
        d_model.append(pooled_latent.chamfer(pooled_latent.decode_points(coords, x, RES), truth))
        d_noise.append(pooled_latent.chamfer(pooled_latent.decode_points(coords, noise, RES), truth))
    assert sum(d_model) < sum(d_noise), (d_model, d_noise)
    assert sum(a < b for a, b in zip(d_model, d_noise)) >= 3, (d_model, d_noise)


STEPS = 150


def test_killed_worker_resumes_from_last_checkpoint(ray_cluster, ray_env, train_shards, tmp_path):
    # Enough steps that a quiet machine is still mid-run when the second checkpoint lands (a debug step takes ~30 ms).
    proc = _s2(ray_env, _flags(train_shards, tmp_path, zero_stage=2, steps=STEPS, checkpoint_every=5, max_failures=2, report_every=5,
                               name="killed"))
    started = time.time()
    run_dir = tmp_path / "killed"
    killed, deadline = None, time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline and killed is None:
        # Kill once four checkpoints are on disk: Ray Train registers reported checkpoints asynchronously,
        # so the newest on disk may not be registered yet, but the earlier ones are.
        if len(list(run_dir.glob("checkpoint_*/meta.json"))) >= 4:
            # Only this run's workers: earlier tests' workers may still be shutting down.
            pids = [p for p in ray_cluster.worker_pids("RayTrainWorker") if psutil.Process(p).create_time() >= started]
            if pids:
                # Ray may keep an idle actor process around too: the one that trains has used the most CPU.
                killed = max(pids, key=lambda p: sum(psutil.Process(p).cpu_times()[:2]))
                os.kill(killed, signal.SIGKILL)
        time.sleep(0.1)
    out, _ = proc.communicate(timeout=600)
    assert killed is not None, "the run ended before a worker could be killed:\n" + out[-3000:]
    assert proc.returncode == 0, out[-4000:]
    ckpt = _final_checkpoint(run_dir)
    hist = _history(ckpt)
    assert hist["step"] == list(range(1, STEPS + 1)), "steps lost or repeated in the history"
    assert hist["restarted_from"], f"worker {killed} was killed but no restart was recorded:\n" + out[-3000:]
    assert all(s % 5 == 0 and s > 0 for s in hist["restarted_from"])


def test_job_spec_through_ray_job_submit_with_zero3(ray_cluster, ray_env, train_shards, tmp_path):
    """The entrypoint of jobs/train_dit.yaml, scaled down by overrides, runs as a Ray job with ZeRO-3."""
    from model.dit import DiTConfig, SparseDiT
    from pipeline.jobs import load_job_spec, with_overrides
    from pipeline.train.checkpoints import load_weights, model_config_of

    spec = with_overrides(load_job_spec(Path(__file__).parents[1] / "jobs" / "train_dit.yaml"), [
        f"shards={train_shards}", f"resolution={RES}", "model=debug", "attention=full", "steps=3", "num_workers=2",
        "use_gpu=false", "cpus_per_worker=0.5", "token_budget=1500", f"storage={tmp_path}/runs", "name=submitted",
        "curriculum=", "zero_stage=3", "checkpoint_every=3", "image_encoder=tiny", "grad_checkpointing=false"])
    assert spec.argv()[:3] == ["s2", "train", "dit"]
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    res = subprocess.run([ray, "job", "submit", "--address", ray_cluster.dashboard, "--", *spec.argv()],
                         env=ray_env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    ckpt = _final_checkpoint(tmp_path / "runs" / "submitted")
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 3
    # ZeRO-3 keeps one optimizer partition per rank; weights.pt holds the gathered full tensors.
    assert sorted(n for n in os.listdir(ckpt / "state") if n.endswith("optim_states.pt")) == [
        "zero_pp_rank_0_mp_rank_00_optim_states.pt", "zero_pp_rank_1_mp_rank_00_optim_states.pt"]
    weights = load_weights(str(ckpt), "dit")
    SparseDiT(model_config_of(weights, DiTConfig)).load_state_dict(
        {k.removeprefix("dit."): v for k, v in weights["state_dict"].items()})


def _run(env, args, timeout=300):
    proc = _s2(env, args)
    out, _ = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, out[-4000:]
    return out


def _s3(s3_server):
    """A client of the test's S3 server; the runs create their buckets themselves."""
    import s3fs

    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})


# One worker and analytic shapes keep these short; two ranks writing one checkpoint is covered above.
ONE_WORKER = dict(num_workers=1, cpus_per_worker=1, shards="synthetic", synthetic_shapes=4)


def test_s3_checkpoints_and_rerun_resumes_from_newest(s3_server, ray_env):
    """Checkpoints of a Ray Train run go to an S3 store with a custom endpoint; a rerun continues from there."""
    fs = _s3(s3_server)
    flags = dict(ONE_WORKER, checkpoint_every=1, report_every=1, name="s3run")
    out1 = _run(ray_env, _flags(storage="s3://train-runs/exp", steps=1, **flags))
    run = "train-runs/exp/s3run"
    first = _s3_final_checkpoint(fs, run)
    assert first["meta"]["step"] == 1 and first["meta"]["resolution"] == RES
    assert {"meta.json", "weights.pt", "history.json", "state/zero_pp_rank_0_mp_rank_00_optim_states.pt"} <= set(
        first["files"])
    assert "dit-debug step 1/1" in out1

    out2 = _run(ray_env, _flags(storage="s3://train-runs/exp", steps=2, **flags))
    second = _s3_final_checkpoint(fs, run)
    assert second["meta"]["step"] == 2
    assert second["history"]["step"] == [1, 2]
    assert second["history"]["restarted_from"] == [1]
    assert second["history"]["loss"][:1] == first["history"]["loss"]  # step 1 kept, not redone
    assert "dit-debug step 2/2" in out2 and "step 1/2" not in out2
    with fs.open(f"{second['meta']['path']}/weights.pt", "rb") as f:
        weights = torch.load(f, weights_only=True)
    assert (weights["network"], weights["resolution"], weights["step"]) == ("dit", RES, 2)


def _s3_final_checkpoint(fs, run: str) -> dict:
    metas = [json.loads(fs.cat(m)) | {"path": m.rsplit("/", 1)[0]} for m in fs.glob(f"{run}/checkpoint_*/meta.json")]
    assert metas, f"no checkpoint under s3://{run}"
    last = max(metas, key=lambda m: m["step"])
    files = [f.removeprefix(last["path"] + "/") for f in fs.find(last["path"])]
    return {"meta": last, "files": files, "history": json.loads(fs.cat(f"{last['path']}/history.json"))}


def test_curriculum_each_stage_starts_from_previous_ema_and_records_resolution(s3_server, ray_env):
    """--curriculum 32,64 on S3: the 64 stage's workers load the 32 stage's final EMA weights (checked by digest)."""
    from pipeline.train.checkpoints import load_weights, weights_digest

    fs = _s3(s3_server)
    # Two checkpoints per stage: the next stage must pick the newest of its predecessor's run folder.
    _run(ray_env, _flags(storage="s3://curriculum/runs", steps=2, checkpoint_every=1, ema_decay=0.99, name="cur",
                         curriculum="32,64", **ONE_WORKER))
    s32, s64 = (_s3_final_checkpoint(fs, f"curriculum/runs/cur-{r}")["meta"] for r in (32, 64))
    assert (s32["resolution"], s32["step"], s32["started_from"]) == (32, 2, None)
    assert (s64["resolution"], s64["step"]) == (64, 2)
    w32, w64 = (load_weights(f"s3://{m['path']}", "dit") for m in (s32, s64))
    assert (w32["resolution"], w64["resolution"]) == (32, 64)
    start = s64["started_from"]
    assert (start["checkpoint"], start["step"], start["resolution"]) == (f"s3://{s32['path']}", 2, 32)
    # The weights the 64 stage put into its network before its first step are stage 32's saved EMA weights.
    assert start["weights_sha256"] == weights_digest(w32["state_dict"])
    # Its EMA began there too: two steps at decay 0.99 move it by far less than a fresh initialization would.
    drift = max((w64["state_dict"][k] - v).abs().max().item() for k, v in w32["state_dict"].items())
    assert 0 < drift < 1e-3, drift


@pytest.mark.integration
def test_damaged_and_bad_rows_are_named_on_ray_and_a_bad_share_stops(ray_env, tmp_path):
    """Through Ray Data and Ray Train: a row whose page fails its checksum and a row with an infinite SDF
    are skipped, each named with its file and mesh, and the run finishes; past max_skipped_share it stops
    with one line."""
    import dataclasses

    import pyarrow.parquet as pq

    from pipeline.shards import SCHEMA

    rows = [dataclasses.replace(r, views=[]) for r in synthetic_rows(8, RES, seed=3)]
    sdf = rows[0].sdf.copy()
    sdf[0] = float("inf")
    [(uri, _)] = write_shard(str(tmp_path / "data"), [*rows, dataclasses.replace(rows[0], sdf=sdf, mesh_id="inf-row")])
    pf = pq.ParquetFile(uri)
    damaged = pf.read_row_group(2, columns=["mesh_id"]).column(0)[0].as_py()
    chunk = pf.metadata.row_group(2).column(SCHEMA.names.index("sdf"))
    data = bytearray(open(uri, "rb").read())
    end = (chunk.dictionary_page_offset or chunk.data_page_offset) + chunk.total_compressed_size
    data[(chunk.data_page_offset + end) // 2] ^= 0x10  # inside the data page
    open(uri, "wb").write(data)
    flags = dict(steps=2, checkpoint_every=2, num_workers=1, cpus_per_worker=1, max_failures=0)
    out = _run(ray_env, _flags(str(tmp_path / "data"), tmp_path, name="badrows", max_skipped_share=0.5, **flags))
    assert f"{uri}: mesh inf-row: 1 non-finite SDF values" in out
    assert f"{uri}: row group 2, mesh {damaged}: damaged" in out
    proc = _s2(ray_env, _flags(str(tmp_path / "data"), tmp_path, name="strict", max_skipped_share=0.1, **flags))
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 1, out[-3000:]
    want = f"s2 train: TooManySkipped: {tmp_path / 'data'}: 2 of 9 rows read were bad (22% > max_skipped_share 10%)"
    assert any(line.startswith(want) for line in out.splitlines()), out[-3000:]
