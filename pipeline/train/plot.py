"""Training curves: live TensorBoard event files (and MLflow when installed) and a loss PNG at the end.

``CurveLog`` writes rank 0's metrics at each report to ``<storage>/<name>/tensorboard`` (``tensorboard
--logdir <storage>`` shows every run, while it trains). The PNG needs Pillow only.
"""
from __future__ import annotations

import logging
import math
import os
import posixpath
import tempfile
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from pipeline import storage

log = logging.getLogger(__name__)


def loss_curve_png(steps: list[int], losses: list[float], path: str, title: str = "loss",
                   size: tuple[int, int] = (640, 360)) -> None:
    """Raw loss (light) and its running mean (dark) against step; log scale when the range spans 10x."""
    w, h = size
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    pts = [(s, l) for s, l in zip(steps, losses) if math.isfinite(l) and l > 0]
    left, right, top, bottom = 60, w - 20, 30, h - 40
    d.rectangle([left, top, right, bottom], outline="black")
    d.text((left, 8), f"{title}  ({len(pts)} steps)", fill="black")
    if pts:
        lo, hi = min(l for _, l in pts), max(l for _, l in pts)
        use_log = hi > 10 * lo
        f = (math.log10 if use_log else (lambda v: v))
        ylo, yhi = f(lo), f(hi) if f(hi) > f(lo) else f(lo) + 1e-9
        s0, s1 = pts[0][0], max(pts[-1][0], pts[0][0] + 1)

        def xy(s, l):
            return (left + (s - s0) / (s1 - s0) * (right - left), bottom - (f(l) - ylo) / (yhi - ylo) * (bottom - top))

        d.line([xy(s, l) for s, l in pts], fill=(170, 190, 230), width=1)
        k = max(1, len(pts) // 20)
        smooth = [(pts[i][0], sum(l for _, l in pts[max(0, i - k + 1):i + 1]) / len(pts[max(0, i - k + 1):i + 1]))
                  for i in range(len(pts))]
        d.line([xy(s, l) for s, l in smooth], fill=(20, 60, 160), width=2)
        d.text((4, top), f"{hi:.3g}", fill="black")
        d.text((4, bottom - 10), f"{lo:.3g}" + (" log" if use_log else ""), fill="black")
        d.text((left, bottom + 8), str(s0), fill="black")
        d.text((right - 40, bottom + 8), str(s1), fill="black")
    img.save(path)


class CurveLog:
    """Scalars of each report as curves: TensorBoard event files in ``<run>/tensorboard``, MLflow when installed.

    Only rank 0 writes (``enabled=False`` elsewhere). On remote storage the event files are written to a local
    folder and copied to the run folder after each report. A resumed run purges the steps after its checkpoint
    so the curves do not double back. MLflow logs to ``MLFLOW_TRACKING_URI`` when set, else ``<run>/mlruns`` on
    local storage. A writer that fails is reported once and switched off; training goes on.
    """

    def __init__(self, run_uri: str, run_name: str, params: dict[str, Any], *, first_step: int = 1,
                 enabled: bool = True):
        self.run_uri, self.tb, self.mlflow, self._tmp = run_uri, None, None, None
        self.logdir = storage.join(run_uri, "tensorboard")
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: no live curves (pip install tensorboard); "
                        "the loss curve PNG is still written with the last checkpoint")
        else:
            if storage.is_remote(run_uri):
                self._tmp = tempfile.TemporaryDirectory(prefix="s2tb-")
                local = self._tmp.name
            else:
                local = self.logdir
                os.makedirs(local, exist_ok=True)
            self.tb = SummaryWriter(local, purge_step=first_step if first_step > 1 else None)
            log.info("TensorBoard curves: tensorboard --logdir %s", self.logdir)
        self._start_mlflow(run_name, params)

    def _start_mlflow(self, run_name: str, params: dict[str, Any]) -> None:
        try:
            import mlflow
        except ImportError:
            return
        try:
            if not os.environ.get("MLFLOW_TRACKING_URI"):
                if storage.is_remote(self.run_uri):
                    log.info("MLflow: set MLFLOW_TRACKING_URI to track runs on remote storage; not logging")
                    return
                mlflow.set_tracking_uri(Path(self.run_uri, "mlruns").resolve().as_uri())
            mlflow.start_run(run_name=run_name)
            mlflow.log_params({k: str(v)[:250] for k, v in params.items()})
            self.mlflow = mlflow
        except Exception as exc:  # noqa: BLE001 - tracking is optional: report it, go on training
            log.warning("MLflow logging is off: %s", exc)

    @staticmethod
    def scalars(metrics: dict[str, Any]) -> dict[str, float]:
        return {k: float(v) for k, v in metrics.items()
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}

    def write(self, metrics: dict[str, Any]) -> None:
        step, values = int(metrics["step"]), self.scalars(metrics)
        if self.tb is not None:
            try:
                for key, value in values.items():
                    self.tb.add_scalar(f"train/{key}", value, step)
                self.tb.flush()  # readable at once, by a TensorBoard that is watching the folder
                if self._tmp is not None:
                    self._upload()
            except Exception as exc:  # noqa: BLE001 - a full disk or a storage error must not end training
                log.warning("TensorBoard curves are off: %s", exc)
                self.tb = None
        if self.mlflow is not None:
            try:
                self.mlflow.log_metrics(values, step=step)
            except Exception as exc:  # noqa: BLE001
                log.warning("MLflow logging is off: %s", exc)
                self.mlflow = None

    def _upload(self) -> None:
        fs, path = storage.filesystem(self.logdir)
        for f in sorted(Path(self._tmp.name).iterdir()):
            fs.put_file(str(f), posixpath.join(path, f.name))

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()
            if self._tmp is not None:
                self._upload()
        if self.mlflow is not None:
            self.mlflow.end_run()
        if self._tmp is not None:
            self._tmp.cleanup()
