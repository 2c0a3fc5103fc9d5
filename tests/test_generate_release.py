"""`s2 generate` through Ray Serve on a converted release snapshot (synthetic, released key layout, CPU size)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

import release_snapshot
from servers import free_port
from test_serve import png

pytestmark = pytest.mark.integration


def test_s2_convert_then_generate_a_library(ray_cluster, tmp_path):
    snap, dino = release_snapshot.write(str(tmp_path), seed=4, small=True)
    s2 = os.path.join(os.path.dirname(sys.executable), "s2")
    converted = tmp_path / "converted"
    res = subprocess.run([s2, "convert", "official", snap, str(converted), "--sections",
                          "dense_vae,dense_dit,sparse_vae_512,sparse_dit_512"], capture_output=True, text=True,
                         timeout=600)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    images = tmp_path / "images"
    images.mkdir()
    for i in range(2):
        (images / f"photo_{i}.png").write_bytes(png(80 + 16 * i, 80))
    generation = {"pretrained": str(converted), "image_encoder": dino, "structure_steps": 2, "sparse_steps": 2,
                  "device": "cpu"}
    serve = tmp_path / "serve.yaml"
    serve.write_text(yaml.safe_dump({
        "http_options": {"host": "127.0.0.1", "port": free_port()},
        "applications": [{"name": "s2rel", "route_prefix": "/rel", "import_path": "pipeline.serve.app:app_builder",
                          "args": {"generation": generation, "num_cpus": 1, "max_batch_size": 2,
                                   "torch_threads": 1}}]}))
    out = tmp_path / "library"
    env = {**ray_cluster.env, "RAY_ADDRESS": ray_cluster.address}
    res = subprocess.run([s2, "generate", "--images", str(images), "--output", str(out), "--app-name", "s2rel",
                          "--serve-config", str(serve), "--no-progress"], env=env, capture_output=True, text=True,
                         timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    assert len(records) == 2 and all(r.get("error") in (None, "") for r in records.values()), records
    meshes = [p for p in out.rglob("*") if p.suffix in (".glb", ".obj", ".ply")]
    assert len(meshes) == 2 and all(p.stat().st_size > 0 for p in meshes)
