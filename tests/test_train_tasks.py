"""The SS-VAE task against the token budget: a shape over it is skipped and named, or trained alone when asked."""
from types import SimpleNamespace

import pytest
import torch

from model.sdf_shapes import AnalyticShape, narrow_band
from pipeline.config import ConfigError
from pipeline.train.config import TrainConfig
from pipeline.train.data import Skipped, token_batches
from pipeline.train.tasks import SparseVAETask


def _dataset():
    """Two small spheres around one large torus, each at 32³; the budget sits between their band sizes."""
    small = narrow_band(AnalyticShape("sphere", (0.3,)), 32)
    large = narrow_band(AnalyticShape("torus", (0.6, 0.25)), 32)
    shapes = {"small-a": small, "large": large, "small-b": small}
    budget = 2 * len(small[0]) + 1
    assert len(large[0]) > budget
    return [SimpleNamespace(mesh_id=k, coords=c, values=v, resolution=32, num_voxels=len(c))
            for k, (c, v) in shapes.items()], budget


def _batches(oversize: str):
    samples, budget = _dataset()
    task = SparseVAETask(TrainConfig(network="vae", model="debug", token_budget=budget, oversize=oversize), 0)
    skipped = Skipped()
    batches = list(token_batches((task.prepare(s) for s in samples), budget, lambda i: i.tokens, lambda i: i.name,
                                 skipped))
    return task, batches, skipped, budget


def test_a_shape_over_the_budget_is_skipped_and_named_by_default():
    assert TrainConfig().oversize == "skip"
    _, batches, skipped, budget = _batches("skip")
    assert [[i.name for i in b] for b in batches] == [["small-a", "small-b"]]
    assert len(skipped.shapes) == 1 and skipped.shapes[0].startswith("large: ")
    assert skipped.shapes[0].endswith(f"is more than token_budget {budget}; skipped")


def test_oversize_alone_trains_the_large_shape_in_a_batch_of_its_own():
    task, batches, skipped, _ = _batches("alone")
    assert [[i.name for i in b] for b in batches] == [["small-a"], ["large"], ["small-b"]] and not skipped.shapes
    batch = task.collate(batches[1], "cpu", torch.float32)
    loss, _ = task.module(**batch)
    loss.backward()
    assert torch.isfinite(loss) and any(p.grad is not None and p.grad.abs().sum() > 0
                                        for p in task.module.parameters())


def test_oversize_takes_skip_or_alone_only():
    with pytest.raises(ConfigError, match="oversize"):
        TrainConfig(network="vae", oversize="split").validate()
    with pytest.raises(ConfigError, match="lr_schedule: 'cosin' is not one of constant, cosine"):
        TrainConfig(network="vae", lr_schedule="cosin").validate()


def _png(shade: int, side: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[16:16 + side, 20:44] = (shade, 255 - shade, 128, 255)
    buf = io.BytesIO()
    Image.fromarray(rgba, mode="RGBA").save(buf, format="PNG")
    return buf.getvalue()


def test_every_step_draws_one_of_all_the_views_of_a_cached_item():
    """The epoch cache replays prepared items: the view must be drawn when a batch is built, not when the
    item is prepared, or each shape trains on one of its views for the whole run."""
    from pipeline.train.tasks import SparseDiTTask

    c, v = narrow_band(AnalyticShape("sphere", (0.5,)), 32)
    views = [SimpleNamespace(png=_png(40 * k, 16 + 8 * k)) for k in range(4)]
    task = SparseDiTTask(TrainConfig(network="dit", model="debug", cond_drop=0.0), 0)
    item = task.prepare(SimpleNamespace(mesh_id="s", coords=c, values=v, resolution=32, views=views))
    conds = [task.collate([item], "cpu", torch.float32)["cond"][0] for _ in range(24)]
    distinct = []
    for cond in conds:
        if not any(torch.equal(cond, d) for d in distinct):
            distinct.append(cond)
    assert len(distinct) == 4
    bare = task.prepare(SimpleNamespace(mesh_id="b", coords=c, values=v, resolution=32, views=[]))
    assert task.missing_views == 1 and not task.collate([bare], "cpu", torch.float32)["cond"].any()


def test_cosine_learning_rate_warms_up_then_decays_to_a_twentieth():
    from pipeline.train.config import TrainConfig
    from pipeline.train.engine import lr_factor

    cfg = TrainConfig(steps=600, warmup_steps=10, lr_schedule="cosine")
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == pytest.approx(1.0, abs=1e-3)
    assert lr_factor(300, cfg) == pytest.approx(0.525) and lr_factor(600, cfg) == pytest.approx(0.05)
    flat = TrainConfig(steps=600, warmup_steps=10)
    assert [lr_factor(s, flat) for s in (9, 300, 599)] == [1.0, 1.0, 1.0]


def test_the_ss_vae_kl_weight_goes_from_the_flag_through_the_job_config_into_the_loss():
    import argparse
    import dataclasses

    from pipeline import config
    from pipeline.commands.train import _arguments

    parser = argparse.ArgumentParser()
    _arguments(parser, "vae")
    cfg = config.from_args(TrainConfig, parser.parse_args(["--kl-weight", "1e-5"]))
    again = config.from_dict(TrainConfig, dataclasses.asdict(cfg))  # what Ray Train hands each worker
    assert again.kl_weight == 1e-5 and SparseVAETask(again, 0).module.weights.kl == 1e-5
    # unset, the task keeps the release's weight (model/vae_loss.py), as the paper config does
    assert TrainConfig().kl_weight is None and SparseVAETask(TrainConfig(network="vae"), 0).module.weights.kl == 1e-3
    with pytest.raises(ConfigError, match="kl_weight: must be >= 0"):
        TrainConfig(network="vae", kl_weight=-1.0).validate()
    dit = argparse.ArgumentParser()
    _arguments(dit, "dit")  # only the SS-VAE reads it
    with pytest.raises(SystemExit):
        dit.parse_args(["--kl-weight", "1e-5"])
