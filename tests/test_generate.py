"""The batch job on a local Ray cluster: a library from a folder, interrupted and re-run, bad items recorded."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from servers import free_port
from test_serve import FAST, png

GOOD = 6


def _serve_yaml(path: Path, port: int) -> Path:
    doc = {"http_options": {"host": "127.0.0.1", "port": port},
           "applications": [{"name": "s2gen", "route_prefix": "/gen", "import_path": "pipeline.serve.app:app_builder",
                             "args": {"generation": FAST, "random_weights": "debug", "num_cpus": 1,
                                      "max_batch_size": 4, "batch_wait_timeout_s": 0.2, "torch_threads": 1}}]}
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("images")
    for i in range(GOOD):
        (d / f"concept_{i:02d}.png").write_bytes(png(64 + 8 * i, 64 + 4 * i))
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (d / "blank.png").write_bytes(png(box=False))
    (d / "notes.txt").write_text("not an image, not listed")
    return d


def _generate(cluster, images, out, serve_cfg, *extra, wait=True):
    env = {**cluster.env, "RAY_ADDRESS": cluster.address}
    cmd = [os.path.join(os.path.dirname(sys.executable), "s2"), "generate", "--images", str(images), "--output",
           str(out), "--app-name", "s2gen", "--serve-config", str(serve_cfg), "--concurrency", "4",
           "--no-progress", *extra]
    if not wait:
        return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def _records(out: Path) -> dict:
    """The finished records (a driver killed mid-write leaves a temporary copy, whose name never matches)."""
    return {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}


class Cards(HTMLParser):
    def __init__(self):
        super().__init__()
        self.cards, self.imgs = [], []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "div" and "data-asset" in a:
            self.cards.append((a["data-asset"], a["data-status"]))
        if tag == "img" and a.get("class") == "preview":
            self.imgs.append(a["src"])


def test_interrupted_job_resumes_without_redoing_or_losing_items(ray_cluster, images, tmp_path):
    out = tmp_path / "library"
    serve_cfg = _serve_yaml(tmp_path / "serve.yaml", free_port())
    proc = _generate(ray_cluster, images, out, serve_cfg, "--concurrency", "1", wait=False)
    deadline = time.monotonic() + 400
    while time.monotonic() < deadline and len(list((out / "records").glob("*.json"))) < 2 and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)  # the driver dies mid-run; the app keeps serving
    proc.wait()
    first = _records(out)
    assert 2 <= len(first) < GOOD + 2, f"kill came too late: {len(first)} records"

    _generate(ray_cluster, images, out, serve_cfg)
    recs = _records(out)
    assert len(recs) == GOOD + 2  # every image once: 6 meshes, 2 recorded failures
    for aid, rec in first.items():  # nothing finished in the first run was redone
        assert recs[aid]["finished_at"] == rec["finished_at"] or rec["status"] == "error"
    ok = {a: r for a, r in recs.items() if r["status"] == "ok"}
    assert len(ok) == GOOD
    for r in ok.values():
        assert (out / r["mesh"]).stat().st_size > 0 and (out / r["preview"]).read_bytes()[:4] == b"\x89PNG"
        assert r["faces"] > 0 and r["timings"]["structure"] > 0
    errors = {r["name"]: r["error"] for r in recs.values() if r["status"] == "error"}
    assert "unreadable image" in errors["broken"] and "no foreground" in errors["blank"]

    index = pq.read_table(out / "index.parquet").to_pylist()
    assert len(index) == GOOD + 2 and {r["status"] for r in index} == {"ok", "error"}
    assert all(r["t_structure"] is not None for r in index if r["status"] == "ok")
    assert "testing" not in (out / "index.parquet").read_bytes().decode("latin-1")  # no S3 secret in the index

    third = _generate(ray_cluster, images, out, serve_cfg, "--retry-failed", "false")
    assert _records(out) == recs  # a finished library: nothing redone
    assert "failed: " not in third

    page = Cards()
    page.feed((out / "gallery.html").read_text())
    assert sorted(a for a, _ in page.cards) == sorted(recs)
    assert len(page.imgs) == GOOD and all((out / src).exists() for src in page.imgs)


def test_manifest_with_seeds_and_a_missing_file(ray_cluster, images, tmp_path):
    out = tmp_path / "lib"
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("image,seed,name\n"
                        f"{images}/concept_00.png,1,chair_a\n{images}/concept_00.png,2,chair_b\n"
                        f"{images}/missing.png,3,ghost\n")
    serve_cfg = _serve_yaml(tmp_path / "serve.yaml", free_port())
    _generate(ray_cluster, manifest, out, serve_cfg)
    recs = {r["name"]: r for r in _records(out).values()}
    assert recs["chair_a"]["status"] == recs["chair_b"]["status"] == "ok"
    assert recs["chair_a"]["seed"] == 1 and recs["chair_a"]["key"] != recs["chair_b"]["key"]
    assert recs["ghost"]["status"] == "error" and "unreadable source" in recs["ghost"]["error"]
