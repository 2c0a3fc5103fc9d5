"""Single-process VAE training entry, checkpoints and the train-vae-local / eval-vae commands."""

from __future__ import annotations

import argparse

import pytest
import torch

from pipeline.config import ConfigError
from pipeline.vae_train import (
    VAETrainConfig,
    load_checkpoint,
    load_samples,
    make_batch,
    prepare_batch,
    save_checkpoint,
    train_step,
    train_vae,
)


def _parser():
    from pipeline.commands import vae

    p = argparse.ArgumentParser()
    vae.register(p.add_subparsers(dest="cmd"))
    return p


def test_train_vae_tiny_end_to_end(tmp_path, capsys):
    cfg = VAETrainConfig(resolution=32, steps=3, synthetic_count=3, holdout=1, batch_size=2, eval_points=2000,
                         out_dir=str(tmp_path), threads=1)
    result = train_vae(cfg, progress=False)
    assert result["steps"] == 3 and result["train_samples"] == 2 and result["heldout_samples"] == 1
    for key in ("chamfer", "f1@0.005", "f1@0.001", "normal_consistency"):
        assert key in result["before"] and key in result["after"]
    model, meta = load_checkpoint(result["checkpoint"])
    assert meta["step"] == 3 and meta["train_config"]["resolution"] == 32
    args = _parser().parse_args(["eval-vae", "--checkpoint", result["checkpoint"], "--resolution", "32",
                                 "--limit", "1", "--points", "1000", "--device", "cpu"])
    assert args.func(args) == 0
    assert "f1@0.001" in capsys.readouterr().out


def test_checkpoint_round_trip_and_train_step(tmp_path):
    cfg = VAETrainConfig(resolution=32, synthetic_count=2)
    samples = load_samples(cfg)
    from model.vae import SparseSDFVAE, VAEConfig

    torch.manual_seed(0)
    model = SparseSDFVAE(VAEConfig.named("tiny"))
    x, targets = prepare_batch(samples, 8)
    from model.vae_loss import stack_targets

    stacked = stack_targets([prepare_batch([s], 8)[1] for s in samples])  # how train_vae caches targets
    assert torch.equal(stacked.coords, targets.coords) and torch.equal(stacked.values, targets.values)
    assert torch.equal(stacked.is_input, targets.is_input) and torch.equal(stacked.is_sharp, targets.is_sharp)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    terms = train_step(model, opt, x, targets, cfg.loss_weights())
    assert set(terms) >= {"total", "input", "extra", "sharp", "kl", "grad_norm"}
    save_checkpoint(tmp_path / "v.pt", model, cfg, 1)
    loaded, _ = load_checkpoint(tmp_path / "v.pt")
    model.eval(), loaded.eval()
    with torch.no_grad():
        a = model.decode(model.encode(x, sample=False)[0])
        b = loaded.decode(loaded.encode(x, sample=False)[0])
    assert torch.equal(a.feats, b.feats)


def test_bad_settings_and_inputs_named(tmp_path):
    with pytest.raises(ValueError, match="unknown size"):
        VAETrainConfig(size="huge").validate()
    with pytest.raises(ValueError, match="multiple of 8"):
        VAETrainConfig(resolution=60).validate()
    args = _parser().parse_args(["train-vae-local", "--resolution", "abc"])
    with pytest.raises(ConfigError, match="resolution"):
        args.check(args)
    samples = load_samples(VAETrainConfig(resolution=32, synthetic_count=1))
    samples[0].values[3] = float("nan")
    with pytest.raises(ValueError, match=samples[0].name):
        make_batch(samples)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="junk.pt"):
        load_checkpoint(tmp_path / "junk.pt")


def test_stage_from_another_resolution_and_time_schedule(tmp_path):
    """--init-from starts from the saved weights (same held-out meshes at each resolution); metrics.json."""
    import json

    from model.vae import VAEConfig
    from pipeline.vae_eval import evaluate
    from pipeline.vae_train import lr_factor

    first = train_vae(VAETrainConfig(resolution=32, steps=2, synthetic_count=4, holdout=2, eval_points=2000,
                                     out_dir=str(tmp_path / "a"), threads=1), progress=False)
    second_cfg = VAETrainConfig(resolution=40, steps=1, synthetic_count=4, holdout=2, eval_points=2000,
                                init_from=first["checkpoint"], out_dir=str(tmp_path / "b"), threads=1)
    second = train_vae(second_cfg, progress=False)
    assert second["heldout_names"] == first["heldout_names"]
    # "before" of the second stage is the first stage's weights evaluated at the new resolution
    model, _ = load_checkpoint(first["checkpoint"])
    held = {s.name: s for s in load_samples(second_cfg)}
    again = evaluate(model, [held[n] for n in second["heldout_names"]], 2000)
    assert again["chamfer"] == pytest.approx(second["before"]["chamfer"])
    saved = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert saved["init_from"] == first["checkpoint"] and saved["steps"] == 1 and saved["resolution"] == 40
    assert VAEConfig.from_dict(saved["vae_config"]) == model.config  # the checkpoint's network, not --size's

    cfg = VAETrainConfig(steps=1000, warmup_steps=10, time_limit_s=100.0)
    assert lr_factor(cfg, 0, 0.0) == pytest.approx(0.1)
    assert lr_factor(cfg, 20, 50.0) == pytest.approx(0.5, abs=1e-6)  # half the time gone: half the cosine
    assert lr_factor(cfg, 20, 100.0) == pytest.approx(0.0, abs=1e-9)
    assert lr_factor(VAETrainConfig(steps=100, warmup_steps=1), 50, 1e6) == pytest.approx(0.5)  # no limit: steps


def test_conv_autotune_switch(monkeypatch):
    from kernels.sparse_conv.triton_conv import autotune_enabled

    monkeypatch.delenv("S2_CONV_AUTOTUNE", raising=False)
    assert autotune_enabled()
    monkeypatch.setenv("S2_CONV_AUTOTUNE", "0")
    assert not autotune_enabled()
