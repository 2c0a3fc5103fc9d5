"""Training curves: rank 0 writes TensorBoard event files at each report, under the run's storage folder."""
import dataclasses
import logging
import sys

import pytest

from pipeline.shards import write_shard
from pipeline.train.config import TrainConfig
from pipeline.train.plot import CurveLog
from pipeline.train.synthetic import synthetic_rows

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

RES = 32


def _scalars(logdir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_short_run_writes_the_loss_curve(local_dist, tmp_path):
    from pipeline.train.loop import run_without_ray

    data = tmp_path / "data"
    write_shard(str(data), [dataclasses.replace(r, views=[]) for r in synthetic_rows(6, RES, seed=3)])
    cfg = TrainConfig(network="dit", shards=str(data), resolution=RES, model="debug", token_budget=1500,
                      storage=str(tmp_path / "runs"), name="tb", steps=6, report_every=2, checkpoint_every=3, seed=0)
    out = run_without_ray(cfg)
    logdir = tmp_path / "runs" / "tb" / "tensorboard"
    assert list(logdir.glob("events.out.tfevents.*"))
    got = _scalars(logdir)
    # reports: every report_every steps and at each checkpoint
    assert [s for s, _ in got["train/loss"]] == [2, 3, 4, 6]
    loss = dict(zip(out["history"]["step"], out["history"]["loss"]))
    for step, value in got["train/loss"]:
        assert value == pytest.approx(loss[step], rel=1e-6)
    assert {"train/lr", "train/tokens_per_s_per_worker", "train/step_time_s"} <= set(got)
    assert (tmp_path / "runs" / "tb" / "checkpoint_00000006" / "loss_curve.png").exists()  # the PNG stays

    # resumed to 8 steps from the step-6 checkpoint: the curve goes on and has no doubled steps
    run_without_ray(dataclasses.replace(cfg, steps=8))
    steps = [s for s, _ in _scalars(logdir)["train/loss"]]
    assert steps == sorted(set(steps)) and steps[-1] == 8 and 6 in steps


def test_curve_log_is_readable_after_each_write(tmp_path):
    """Flushed at each report: a TensorBoard reading the folder mid-run sees every step written so far."""
    curves = CurveLog(str(tmp_path / "run"), "run", {"lr": 1e-3})
    for step in (1, 2):
        curves.write({"step": step, "loss": 1.0 / step, "flag": True, "note": "text"})
        got = _scalars(tmp_path / "run" / "tensorboard")
        assert [s for s, _ in got["train/loss"]] == list(range(1, step + 1))
        assert set(got) == {"train/loss"}  # only numbers become curves
    curves.close()


def test_other_ranks_and_missing_tensorboard_write_nothing(tmp_path, monkeypatch, caplog):
    CurveLog(str(tmp_path / "a"), "a", {}, enabled=False).write({"step": 1, "loss": 1.0})
    assert not (tmp_path / "a").exists()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails as if not installed
    with caplog.at_level(logging.WARNING):
        curves = CurveLog(str(tmp_path / "b"), "b", {})
        curves.write({"step": 1, "loss": 1.0})
        curves.close()
    assert "tensorboard is not installed" in caplog.text and not (tmp_path / "b" / "tensorboard").exists()


def test_remote_storage_gets_the_event_files(tmp_path, monkeypatch):
    """On remote storage the events are written locally and copied to <run>/tensorboard after each report."""
    import fsspec

    fs = fsspec.filesystem("memory")
    monkeypatch.setattr("pipeline.storage.is_remote", lambda uri: uri.startswith("memory://"))
    monkeypatch.setattr("pipeline.storage.filesystem", lambda uri, opts=None: (fs, uri.split("://", 1)[1]))
    curves = CurveLog("memory://bucket/run", "run", {})
    curves.write({"step": 1, "loss": 0.5})
    assert [p for p in fs.ls("/bucket/run/tensorboard", detail=False) if "tfevents" in p]
    curves.close()


def test_mlflow_gets_the_same_metrics_when_installed(tmp_path, monkeypatch):
    """A stand-in ``mlflow`` module records the calls: params once, each report's scalars at its step."""
    import types

    calls = []
    fake = types.ModuleType("mlflow")
    for name in ("set_tracking_uri", "start_run", "log_params", "log_metrics", "end_run"):
        setattr(fake, name, lambda *a, _n=name, **kw: calls.append((_n, a, kw)))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    curves = CurveLog(str(tmp_path / "run"), "run", {"lr": 1e-3, "name": "run"})
    curves.write({"step": 4, "loss": 0.25, "lr": 1e-3})
    curves.close()
    names = [c[0] for c in calls]
    assert names == ["set_tracking_uri", "start_run", "log_params", "log_metrics", "end_run"]
    assert calls[0][1][0] == (tmp_path / "run" / "mlruns").as_uri()
    assert calls[3][1][0] == {"loss": 0.25, "lr": 1e-3} and calls[3][2] == {"step": 4}
