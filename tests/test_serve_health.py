"""A model that does not load: `serve deploy` of a config naming a corrupt checkpoint, as a user runs it.

`serve deploy` itself exits 0 (it hands the config to the cluster and returns); `serve status` is the check:
the Generator's health check fails with the reason, `/healthz` answers 503 with it, and a request fails at
once with the same line instead of waiting for a replica that never comes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests
import yaml

from servers import free_port
from test_serve import FAST, png

pytestmark = pytest.mark.integration  # Serve tries the replica three times before it reports the app failed


def _serve(cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    exe = os.path.join(os.path.dirname(sys.executable), "serve")
    return subprocess.run([exe, *args, "--address", cluster.dashboard], env=cluster.env, capture_output=True,
                          text=True, timeout=timeout)


def test_corrupt_checkpoint_is_reported_by_serve_status_and_healthz(ray_cluster, tmp_path):
    ckpt = tmp_path / "run" / "checkpoint_000001"
    ckpt.mkdir(parents=True)
    (ckpt / "weights.pt").write_bytes(b"PK\x03\x04 not a checkpoint, cut short")
    (ckpt / "meta.json").write_text('{"step": 1}')
    port = free_port()
    config = tmp_path / "serve.yaml"
    config.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": port},
        "applications": [{"name": "s2bad", "route_prefix": "/", "import_path": "pipeline.serve.app:app_builder",
                          "args": {"generation": {**FAST, "structure_vae": str(tmp_path / "run" / "latest"),
                                                  "structure_dit": str(ckpt), "dit": str(ckpt)},
                                   "num_cpus": 1, "torch_threads": 1}}]}))
    _serve(ray_cluster, "shutdown", "-y")  # Serve keeps one HTTP address per cluster: start on ours
    try:
        deployed = _serve(ray_cluster, "deploy", str(config))
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr  # Ray's behaviour: the check is status
        status, deadline = "", time.monotonic() + 240
        while time.monotonic() < deadline:
            status = _serve(ray_cluster, "status").stdout
            if "model did not load" in status and "DEPLOY_FAILED" in status:
                break
            time.sleep(3)
        assert "model did not load" in status and str(ckpt) in status, status
        doc = yaml.safe_load(status)
        generator = doc["applications"]["s2bad"]["deployments"]["Generator"]
        assert generator["status"] in ("DEPLOY_FAILED", "UNHEALTHY"), generator

        t0 = time.monotonic()
        r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=60)
        assert r.status_code == 503, r.text
        body = r.json()
        assert body["status"] == "unhealthy" and body["error"].startswith("model did not load: "), body
        assert str(ckpt) in body["error"] and "\n" not in body["error"]
        r = requests.post(f"http://127.0.0.1:{port}/v1/generate", data=png(), headers={"Content-Type": "image/png"},
                          timeout=60)
        assert r.status_code == 503 and r.json()["error"] == body["error"], r.text
        assert time.monotonic() - t0 < 30  # answers, not a wait for a replica

        images = tmp_path / "images"  # a batch job against the failed app stops with the same line
        images.mkdir()
        (images / "a.png").write_bytes(png())
        s2 = os.path.join(os.path.dirname(sys.executable), "s2")
        out = subprocess.run([s2, "generate", "--images", str(images), "--output", str(tmp_path / "lib"),
                              "--app-name", "s2bad", "--no-progress"], capture_output=True, text=True, timeout=180,
                             env={**ray_cluster.env, "RAY_ADDRESS": ray_cluster.dashboard})
        lines = [line for line in out.stderr.splitlines() if line.startswith("s2 generate")]
        assert out.returncode == 2 and lines and body["error"] in lines[-1], out.stderr[-3000:]
        assert "Traceback" not in out.stderr

        doc = yaml.safe_load(config.read_text())  # s2 serve of such a config: one line, exit 2, no hang
        doc["applications"][0].update(name="s2bad2", route_prefix="/b2")
        config.write_text(yaml.safe_dump(doc))
        out = subprocess.run([s2, "serve", "--serve-config", str(config), "--name", "s2bad2", "--detach"],
                             capture_output=True, text=True, timeout=400,
                             env={**ray_cluster.env, "RAY_ADDRESS": ray_cluster.dashboard})
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr[-3000:]
        assert f"s2 serve: configuration error: Serve app 's2bad2': model did not load: " in out.stderr, out.stderr
    finally:
        _serve(ray_cluster, "shutdown", "-y")
