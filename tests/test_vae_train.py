"""The SS-VAE on the one training loop (``python -m pipeline.train vae``'s local session): held-out shapes
measured before and after, and ``s2 eval-vae`` on the checkpoint it writes."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.shards import rows_to_table, samples_from_table, write_shard
from pipeline.train.config import TrainConfig
from pipeline.train.holdout import is_held_out
from pipeline.train.synthetic import synthetic_rows

RES = 24  # the SS-VAE's sparse convolutions run in PyTorch on a CPU
SHARE = 0.3  # of the 6 shapes below, one is held out


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae-data")
    write_shard(str(root), [dataclasses.replace(r, views=[]) for r in synthetic_rows(6, RES, seed=0)])
    return str(root)


def _parser():
    from pipeline.commands import vae

    p = argparse.ArgumentParser()
    vae.register(p.add_subparsers(dest="cmd"))
    return p


def test_vae_trains_on_the_loop_and_measures_its_held_out_shapes(local_dist, shards, tmp_path, capsys):
    from pipeline.commands.vae import load_vae, samples
    from pipeline.train.loop import run_without_ray
    from pipeline.vae_eval import evaluate

    cfg = TrainConfig(network="vae", shards=shards, resolution=RES, model="debug", steps=3, checkpoint_every=3,
                      token_budget=100_000, storage=str(tmp_path), name="vae", holdout=SHARE, eval_points=2000)
    out = run_without_ray(cfg)
    assert out["step"] == 3 and out["skipped_shapes"] == []
    all_shapes = samples(shards, RES, 0, 0)
    held = sorted(s.mesh_id for s in all_shapes if is_held_out(s.mesh_id, SHARE))
    assert len(held) == 1
    ckpt = next(Path(tmp_path, "vae").glob("checkpoint_*"))
    report = json.loads((ckpt / "eval.json").read_text())
    assert report["shapes"] == held
    for key in ("chamfer", "f1@0.005", "f1@0.001", "normal_consistency"):
        assert key in report["before"] and key in report["after"]

    # the held-out shape was never trained on: each step (one batch) holds the other five shapes
    reports = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"step"')]
    assert reports[-1]["step"] == 3 and reports[-1]["shapes"] == 5
    assert reports[-1]["tokens"] == sum(s.num_voxels for s in all_shapes if s.mesh_id not in held)
    assert reports[-1]["heldout_chamfer"] == report["after"]["chamfer"]

    # the checkpoint's EMA weights, loaded as `s2 eval-vae` does, give the evaluation the loop wrote
    model, meta = load_vae(str(Path(tmp_path, "vae")), "cpu")
    assert meta["step"] == 3
    again = evaluate(model, [s for s in all_shapes if s.mesh_id in held], 2000)
    assert [r["decoded_voxels"] for r in again["rows"]] == [r["decoded_voxels"] for r in report["after"]["rows"]]
    assert again["chamfer"] == pytest.approx(report["after"]["chamfer"])

    args = _parser().parse_args(["eval-vae", "--checkpoint", str(Path(tmp_path, "vae")), "--resolution", str(RES),
                                 "--limit", "1", "--points", "1000", "--device", "cpu"])
    assert args.func(args) == 0
    assert "f1@0.001" in capsys.readouterr().out


def test_holdout_is_a_share_of_ids_and_bad_settings_are_named():
    ids = [f"shape-{i}" for i in range(2000)]
    share = sum(is_held_out(i, 0.1) for i in ids) / len(ids)
    assert 0.07 < share < 0.13
    assert not any(is_held_out(i, 0.0) for i in ids)
    with pytest.raises(ConfigError, match="holdout"):
        TrainConfig(network="vae", holdout=1.5).validate()
    with pytest.raises(ConfigError, match="only network=vae"):
        TrainConfig(network="dit", holdout=0.1).validate()


def test_vae_batches_from_shard_samples_and_nan_is_named():
    from pipeline.train.tasks import build_task
    from pipeline.vae_eval import reconstruct

    shapes = samples_from_table(rows_to_table(synthetic_rows(2, 16, seed=1)))
    task = build_task(TrainConfig(network="vae", model="debug", resolution=16), seed=0)
    batch = task.collate([task.prepare(s) for s in shapes], torch.device("cpu"), torch.float32)
    x = batch["x"]
    assert x.batch_size == 2 and len(x) == sum(s.num_voxels for s in shapes) and x.num_channels == 1
    assert torch.equal(x.feats[x.layout[1], 0].sort().values, shapes[1].values.float().sort().values)
    loss, parts = task.module(**batch)
    assert torch.isfinite(loss) and set(parts) >= {"input", "extra", "sharp", "kl"}

    bad = dataclasses.replace(shapes[0], values=shapes[0].values.clone())
    bad.values[3] = float("nan")
    with pytest.raises(ValueError, match=bad.mesh_id):
        reconstruct(task.module.vae, bad)


def test_conv_autotune_switch(monkeypatch):
    from kernels.sparse_conv.triton_conv import autotune_enabled

    monkeypatch.delenv("S2_CONV_AUTOTUNE", raising=False)
    assert autotune_enabled()
    monkeypatch.setenv("S2_CONV_AUTOTUNE", "0")
    assert not autotune_enabled()
