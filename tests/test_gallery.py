"""The gallery page: every asset card present, previews load (headless Chromium, and an HTML parser)."""
from __future__ import annotations

import re
import shutil
import subprocess
import time

import pytest
import trimesh

from model.postprocess import mesh_bytes
from pipeline.generate import Library, render_preview

CHROMIUM = next((shutil.which(b) for b in ("chromium-headless-shell", "chromium", "chromium-browser",
                                           "google-chrome") if shutil.which(b)), None)


@pytest.fixture
def library(tmp_path):
    lib = Library(str(tmp_path))
    shapes = {"box": trimesh.creation.box((1.2, 0.8, 0.6)), "ball": trimesh.creation.icosphere(2),
              "tube": trimesh.creation.cylinder(0.5, 1.5, sections=24)}
    records = {}
    for i, (name, m) in enumerate(shapes.items()):
        data = mesh_bytes(m.vertices, m.faces, "glb")
        lib.write(f"meshes/{name}.glb", data)
        lib.write(f"previews/{name}.png", render_preview(data, "glb", 96))
        records[name] = {"asset_id": name, "name": name, "source": f"s3://bucket/{name}.png", "seed": i,
                         "status": "ok", "error": None, "mesh": f"meshes/{name}.glb", "preview": f"previews/{name}.png",
                         "faces": len(m.faces), "seconds": 1.5, "timings": {"structure": 1.0}}
    records["bad<script>"] = {"asset_id": "bad<script>", "name": "bad", "source": "x.png", "seed": 0,
                              "status": "error", "error": "bad: unreadable image <b>", "mesh": None,
                              "preview": None, "faces": 0, "seconds": 0.0, "timings": {}}
    lib.write_index(records, "test library")
    return tmp_path, records


def test_gallery_markup_lists_every_card(library):
    root, records = library
    html = (root / "gallery.html").read_text()
    assert sorted(re.findall(r'data-asset="([^"]+)"', html)) == sorted(
        r["asset_id"].replace("<", "&lt;").replace(">", "&gt;") for r in records.values())
    assert "bad<script>" not in html and "bad&lt;script&gt;" in html  # names and errors are escaped
    for src in re.findall(r'<img class="preview" src="([^"]+)"', html):
        assert (root / src).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium (apt-get install chromium-headless-shell)")
def test_gallery_in_headless_chromium(library):
    root, records = library
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--allow-file-access-from-files",
           "--virtual-time-budget=10000", "--dump-dom", (root / "gallery.html").as_uri()]
    for attempt in range(2):  # the first start of a fresh profile can be slow on a busy machine
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if "data-previews-loaded" in res.stdout:
            break
        time.sleep(1)
    dom = res.stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-previews-loaded="3"' in body and 'data-previews-total="3"' in body, body
    assert len(re.findall(r'class="card ok"', dom)) == 3 and len(re.findall(r'class="card error"', dom)) == 1
    # a broken preview link is counted as not loaded
    (root / "previews" / "box.png").write_bytes(b"not a png")
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    assert 'data-previews-loaded="2"' in re.search(r"<body[^>]*>", dom).group(0)
