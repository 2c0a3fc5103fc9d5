"""Training data path and bad input, without Ray: token budget, bad shards, config keys, checkpoints."""
import subprocess
import sys
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from pipeline.config import ConfigError, from_dict
from pipeline.shards import rows_to_table, write_shard
from pipeline.train import checkpoints
from pipeline.train.config import TrainConfig
from pipeline.train.data import Skipped, iter_samples, readable_shards, token_batches
from pipeline.train.synthetic import synthetic_rows
from pipeline.train.tasks import build_task


def test_token_budget_batches_and_oversize_shape():
    items = [("a", 300), ("b", 500), ("huge", 5000), ("c", 400), ("d", 900), ("e", 100)]
    skipped = Skipped()
    batches = list(token_batches(items, 1000, lambda i: i[1], lambda i: i[0], skipped))
    assert [[n for n, _ in b] for b in batches] == [["a", "b"], ["c"], ["d", "e"]]
    assert all(sum(t for _, t in b) <= 1000 for b in batches)
    assert skipped.shapes == ["huge: 5000 tokens is more than token_budget 1000; skipped"]


def test_bad_shards_are_skipped_and_counted(tmp_path):
    write_shard(str(tmp_path), synthetic_rows(2, 32))
    d = tmp_path / "shards" / "32"
    pq.write_table(pa.table({"mesh_id": ["x"]}), d / "part-wrong-schema.parquet")
    (d / "part-truncated.parquet").write_bytes(b"PAR1 not really")
    good, bad = readable_shards(str(tmp_path), 32)
    assert len(good) == 1 and len(bad) == 2
    assert any("part-wrong-schema.parquet: not a shard of this project (missing columns" in b for b in bad)
    assert any("part-truncated.parquet: not a readable Parquet file" in b for b in bad)


def test_unreadable_rows_are_counted():
    good = rows_to_table(synthetic_rows(1, 32))
    skipped = Skipped()
    out = list(iter_samples([good, pa.table({"mesh_id": ["x"]})], skipped))
    assert len(out) == 1 and len(skipped.shapes) == 1


def test_config_errors_name_the_key():
    with pytest.raises(ConfigError, match="unknown key.*stepz"):
        from_dict(TrainConfig, {"stepz": 3})
    with pytest.raises(ConfigError, match="zero_stage"):
        from_dict(TrainConfig, {"zero_stage": 4})
    with pytest.raises(ConfigError, match="structure_vae"):
        from_dict(TrainConfig, {"network": "structure_dit"})
    s2 = os.path.join(os.path.dirname(sys.executable), "s2")
    res = subprocess.run([s2, "train", "dit", "--network", "vae"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "contradicts" in res.stderr


def _one_step(task, samples):
    items = [task.prepare(s) for s in samples]
    batch = task.collate(items, torch.device("cpu"), torch.float32)
    opt = torch.optim.AdamW(task.module.parameters(), lr=1e-3)
    loss, parts = task.module(**batch)
    loss.backward()
    opt.step()
    return float(loss.detach()), items


# The SS-VAE step takes ~45 s on a CPU (its sparse convolutions in PyTorch); it runs with -m slow.
@pytest.mark.parametrize("network", ["dit", "structure_vae", "structure_dit", pytest.param("vae", marks=pytest.mark.slow)])
def test_each_network_takes_a_training_step(network, tmp_path):
    # 32³ for the SS-VAE: its sparse convolutions run in PyTorch on a CPU.
    samples = list(iter_samples([rows_to_table(synthetic_rows(2, 32 if network == "vae" else 64))], Skipped()))
    frozen = None
    if network == "structure_dit":
        from model.structure import StructureVAE, StructureVAEConfig

        vae_cfg = StructureVAEConfig.named("debug")
        frozen = {"model_config": repr(vae_cfg), "state_dict": {f"vae.{k}": v for k, v in StructureVAE(vae_cfg).state_dict().items()}}
    cfg = TrainConfig(network=network, structure_vae="x" if network == "structure_dit" else None)
    task = build_task(cfg, seed=0, frozen_weights=frozen)
    # One shape for the 64³ structure networks (dense 3D convolutions are slow on a CPU).
    loss, items = _one_step(task, samples if network == "dit" else samples[:1])
    assert loss == loss and loss > 0
    assert all(i.tokens > 0 for i in items)


def test_structure_dit_encodes_each_shape_once():
    """The frozen structure VAE encodes an item on its first batch only; later batches reuse its latent,
    and the batch equals encoding the occupancy afresh."""
    from model.structure import StructureVAE, StructureVAEConfig, occupancy_grid

    samples = list(iter_samples([rows_to_table(synthetic_rows(2, 64))], Skipped()))
    vae_cfg = StructureVAEConfig.named("debug")
    frozen = {"model_config": repr(vae_cfg), "state_dict": {f"vae.{k}": v for k, v in StructureVAE(vae_cfg).state_dict().items()}}
    task = build_task(TrainConfig(network="structure_dit", structure_vae="x"), seed=0, frozen_weights=frozen)
    items = [task.prepare(s) for s in samples]
    calls = []
    encode = task.vae.encode
    task.vae.encode = lambda occ, *a, **k: calls.append(occ.shape[0]) or encode(occ, *a, **k)
    first = task.collate(items[:1], "cpu", torch.float32)
    second = task.collate(items, "cpu", torch.float32)
    assert calls == [1, 1]  # item 0 encoded once, item 1 on its first batch
    with torch.no_grad():
        occ = torch.stack([occupancy_grid(s.coords, s.resolution) for s in samples])[:, None].float()
        want = task.vae.scale(encode(occ)[0])
    # batched and single encodes agree to float rounding; a latent from the wrong item would be far off
    assert torch.allclose(second["x0"], want, atol=1e-5)
    assert torch.equal(first["x0"], second["x0"][: len(first["x0"])])  # item 0's kept latent, reused
    assert all("occupancy" not in i.data for i in items)


def test_checkpoint_from_another_model_is_refused(tmp_path):
    from model.dit import DiTConfig

    meta = {**checkpoints.describe("structure_vae", "cfgA"), "step": 3}
    with pytest.raises(checkpoints.CheckpointMismatch, match="checkpoint is for network 'structure_vae'"):
        checkpoints.check_compatible(meta, "dit", DiTConfig.named("debug"), "ckpt")
    meta = {**checkpoints.describe("dit", DiTConfig.named("small")), "step": 3}
    with pytest.raises(checkpoints.CheckpointMismatch, match="model_config"):
        checkpoints.check_compatible(meta, "dit", DiTConfig.named("debug"), "ckpt")
    torch.save({"network": "dit", "state_dict": {}}, tmp_path / "weights.pt")
    with pytest.raises(checkpoints.CheckpointMismatch, match="expected 'structure_vae'"):
        checkpoints.load_weights(str(tmp_path), "structure_vae")
    with pytest.raises(checkpoints.CheckpointMismatch, match="no weights.pt"):
        checkpoints.load_weights(str(tmp_path / "nothing"))


def test_loss_curve_png(tmp_path):
    from PIL import Image

    from pipeline.train.plot import loss_curve_png

    loss_curve_png(list(range(1, 51)), [1.0 / s for s in range(1, 51)], str(tmp_path / "c.png"))
    img = Image.open(tmp_path / "c.png")
    assert img.size == (640, 360) and len(set(img.getdata())) > 3


def test_curriculum_stages_chain_by_name():
    from pipeline.train.trainer import curriculum_configs

    stages = curriculum_configs(TrainConfig(name="ss", curriculum="256,512,1024", steps=10))
    assert [(s.resolution, s.name, s.curriculum) for s in stages] == [
        (256, "ss-256", ""), (512, "ss-512", ""), (1024, "ss-1024", "")]


def test_bad_curriculum_and_keep_checkpoints_and_config_file_key(tmp_path):
    with pytest.raises(ConfigError, match="curriculum: expected comma-separated resolutions.*'256,big'"):
        from_dict(TrainConfig, {"curriculum": "256,big"})
    with pytest.raises(ConfigError, match="keep_checkpoints: must be >= 1"):
        from_dict(TrainConfig, {"keep_checkpoints": 0})
    spec = tmp_path / "train.yaml"
    spec.write_text("steps: 3\nresolutoin: 512\n")
    s2 = os.path.join(os.path.dirname(sys.executable), "s2")
    res = subprocess.run([s2, "train", "dit", "--config", str(spec)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "unknown key(s) resolutoin" in res.stderr, res.stderr[-2000:]


def _fake_checkpoint(folder, step, *, resolution=32, world_size=2, network="dit", weights=True):
    import json

    folder.mkdir(parents=True)
    meta = {"network": network, "model_config": "cfg", "resolution": resolution, "step": step, "world_size": world_size}
    (folder / "meta.json").write_text(json.dumps(meta))
    if weights:
        torch.save({**meta, "state_dict": {"w": torch.full((2,), float(step))}}, folder / "weights.pt")


def test_run_folder_resolves_to_its_newest_complete_checkpoint(tmp_path):
    run = tmp_path / "stage-256"
    _fake_checkpoint(run / "checkpoint_2026-01-01_10-00-00.000001", 20)
    _fake_checkpoint(run / "checkpoint_2026-01-01_09-00-00.000001", 30)  # names by time, order by step
    _fake_checkpoint(run / "checkpoint_2026-01-01_11-00-00.000001", 40, weights=False)  # incomplete upload
    newest = str(run / "checkpoint_2026-01-01_09-00-00.000001")
    assert checkpoints.resolve(str(run)) == newest
    assert checkpoints.resolve(newest) == newest
    w = checkpoints.load_weights(str(run), "dit")
    assert w["source"] == newest and w["step"] == 30 and w["resolution"] == 32
    with pytest.raises(checkpoints.CheckpointMismatch, match="not a checkpoint of this trainer nor a run folder"):
        checkpoints.resolve(str(tmp_path / "empty"))


def test_run_folder_on_s3_resolves(s3_server, tmp_path):
    import s3fs

    _fake_checkpoint(tmp_path / "r" / "checkpoint_00000004", 4)
    _fake_checkpoint(tmp_path / "r" / "checkpoint_00000008", 8)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_server.endpoint})
    fs.mkdir("resolve-test")
    fs.put(str(tmp_path / "r"), "resolve-test/runs/", recursive=True)
    w = checkpoints.load_weights("s3://resolve-test/runs/r", "dit")
    assert w["source"] == "s3://resolve-test/runs/r/checkpoint_00000008" and w["step"] == 8


def test_rerun_that_cannot_resume_is_refused_before_training(tmp_path):
    from pipeline.train.trainer import check_rerun

    _fake_checkpoint(tmp_path / "runs" / "ss" / "checkpoint_00000010", 10, resolution=256, world_size=2)
    base = TrainConfig(storage=str(tmp_path / "runs"), name="ss", resolution=256, num_workers=2)
    assert check_rerun(base).endswith("checkpoint_00000010")
    assert check_rerun(TrainConfig(storage=str(tmp_path / "runs"), name="new")) is None
    for change, message in [({"resolution": 512}, "trained at resolution 256, this run trains at 512"),
                            ({"num_workers": 4}, "written by 2 workers, this run has 4"),
                            ({"network": "structure_vae"}, "checkpoint is for network 'dit'")]:
        with pytest.raises(checkpoints.CheckpointMismatch, match=message):
            check_rerun(TrainConfig(**{**base.__dict__, **change}))


def test_weights_digest_names_the_exact_weights():
    a = {"x": torch.arange(4.0), "y": torch.ones(2, 2)}
    assert checkpoints.weights_digest(a) == checkpoints.weights_digest({k: v.clone() for k, v in a.items()})
    assert checkpoints.weights_digest(a) != checkpoints.weights_digest({**a, "x": torch.arange(4.0) + 1e-6})
    assert checkpoints.weights_digest(a) != checkpoints.weights_digest({"x": a["x"], "y": a["y"].reshape(4)})


def test_job_spec_sequence_from_docs_parses(tmp_path):
    """docs/train.md runs jobs/train_dit.yaml once per resolution, each from the previous run's folder."""
    from pathlib import Path

    from pipeline.jobs import load_job_spec, with_overrides

    spec = load_job_spec(Path(__file__).parents[1] / "jobs" / "train_dit.yaml")
    stage = with_overrides(spec, ["curriculum=", "resolution=512", "name=ss-dit-512",
                                  "init_from=s3://s2-data/runs/ss-dit-256"])
    argv = stage.argv()
    assert argv[:3] == ["s2", "train", "dit"]
    import argparse

    from pipeline import config

    parser = argparse.ArgumentParser()
    config.add_arguments(parser, TrainConfig)
    cfg = config.from_args(TrainConfig, parser.parse_args(argv[3:]))
    assert (cfg.curriculum, cfg.resolution, cfg.name, cfg.init_from, cfg.storage) == (
        "", 512, "ss-dit-512", "s3://s2-data/runs/ss-dit-256", "s3://s2-data/runs")


def test_local_paths_become_absolute_for_the_workers(tmp_path, monkeypatch):
    from pipeline.train.trainer import absolute_paths

    monkeypatch.chdir(tmp_path)
    cfg = absolute_paths(TrainConfig(storage="runs", shards="data", init_from="runs/stage-256", latent="pooled",
                                     structure_vae="s3://b/vae"))
    assert (cfg.storage, cfg.shards, cfg.init_from) == (str(tmp_path / "runs"), str(tmp_path / "data"),
                                                        str(tmp_path / "runs" / "stage-256"))
    assert (cfg.latent, cfg.structure_vae) == ("pooled", "s3://b/vae")
    assert absolute_paths(TrainConfig()).shards == "synthetic"
