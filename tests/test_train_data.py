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
