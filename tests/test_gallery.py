"""The gallery page: per asset the input, the preview from the input's camera and a rotatable 3D view.

The library is made by the batch job's own item code (``Job.run_item``) with a stand-in for the Serve app;
the browser test opens the page in headless Chromium and checks a screenshot of it.
"""
from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from model.postprocess import mesh_bytes
from pipeline.generate import GenerateConfig, Item, Job
from pipeline.geometry.mesh import normalize
from pipeline.geometry.render import render_views

CHROMIUM = next((shutil.which(b) for b in ("chromium", "chromium-headless-shell", "chromium-browser",
                                           "google-chrome") if shutil.which(b)), None)
ARTEFACTS = Path(os.environ.get("S2_TEST_ARTEFACTS", Path(__file__).resolve().parents[1] / "build" / "artefacts"))


class Handle:
    """Stands in for the Serve app's DeploymentHandle: answers each name with a fixed mesh or error."""

    def __init__(self, answers: dict):
        self.answers, self.generate = answers, self

    def remote(self, request: dict):
        self.request = request
        return self

    def result(self, timeout_s=None):
        mesh = self.answers[self.request["name"]]
        if isinstance(mesh, str):
            return {"error": mesh, "timings": {"load": 0.01}}
        v, f = mesh
        return {"error": None, "mesh": mesh_bytes(v, f, "glb"), "faces": len(f), "vertices": len(v),
                "timings": {"structure": 0.5, "sparse": 1.0}, "batch_size": 1}


def _photo() -> bytes:
    """An image with no camera: a red disc on white, as a user's photo would be."""
    yy, xx = np.mgrid[:96, :128]
    img = np.full((96, 128, 3), 255, np.uint8)
    img[(yy - 48) ** 2 + (xx - 64) ** 2 < 30 ** 2] = (200, 40, 40)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def library(tmp_path_factory):
    """Two meshes made in code: a view of a chair-like shape with its camera, and a photo (no camera);
    plus an item the generator failed."""
    root = tmp_path_factory.mktemp("library")
    seat = trimesh.creation.box((1.0, 0.15, 1.0)).apply_translation((0, 0.1, 0))
    back = trimesh.creation.box((1.0, 1.0, 0.15)).apply_translation((0, 0.65, -0.45))
    legs = [trimesh.creation.box((0.12, 0.8, 0.12)).apply_translation((x, -0.4, z))
            for x in (-0.42, 0.42) for z in (-0.42, 0.42)]
    chair = normalize(*(lambda m: (m.vertices, m.faces))(trimesh.util.concatenate([seat, back, *legs])))
    torus = trimesh.creation.torus(0.6, 0.25, major_sections=48, minor_sections=24)
    view = render_views(chair.vertices, chair.faces, n_views=1, size=192, seed=7, supersample=2)[0]
    blank = io.BytesIO()
    Image.new("RGB", (64, 64), (90, 140, 200)).save(blank, format="PNG")
    inputs = {"chair": view.png(camera=True), "photo": _photo(), "blank": blank.getvalue()}
    answers = {"chair": (chair.vertices, chair.faces), "photo": (torus.vertices, torus.faces),
               "blank": "blank: no foreground (a single flat colour)"}
    job = Job(GenerateConfig(images="unused", output=str(root), preview_size=192), Handle(answers), {"net": 1})
    records = {}
    for name, data in inputs.items():
        rec = job.run_item(Item(f"s3://bucket/{name}.png", name, 0), data)
        records[rec["asset_id"]] = rec
    job.lib.write_index(records, "test library")
    return root, records, view


def _by_name(records):
    return {r["name"]: r for r in records.values()}


def test_records_carry_input_camera_and_facts(library):
    root, records, view = library
    recs = _by_name(records)
    chair, photo, blank = recs["chair"], recs["photo"], recs["blank"]
    assert chair["camera"]["source"] == "image" and chair["camera"]["azimuth"] == pytest.approx(view.azimuth)
    assert photo["camera"] == {"elevation": 0.0, "azimuth": 0.0, "fov_deg": 40.0, "radius": None, "source": "front"}
    assert chair["components"] == 6 and chair["watertight"] is True  # seat, back and four legs: closed boxes
    assert photo["components"] == 1 and photo["watertight"] is True
    assert blank["status"] == "error" and blank["input"]  # a failed item still shows its input
    for r in (chair, photo):
        assert (root / r["input"]).read_bytes()[:4] == b"\x89PNG"
        assert (root / r["preview"]).read_bytes()[:4] == b"\x89PNG"


def test_viewer_script_holds_the_mesh(library):
    root, records, _ = library
    chair = _by_name(records)["chair"]
    text = (root / chair["viewer"]).read_text()
    m = re.fullmatch(r'S2Viewer\.mesh\((".*?"), (\{.*?\}), "([A-Za-z0-9+/=]+)"\);\n', text)
    assert m and json.loads(m.group(1)) == chair["asset_id"]
    meta, data = json.loads(m.group(2)), base64.b64decode(m.group(3))
    n, pos_bytes = meta["vertices"], meta["vertices"] * 6
    pos = np.frombuffer(data[:pos_bytes], "<u2").reshape(-1, 3) / 65535 * meta["scale"] + meta["lo"]
    idx = np.frombuffer(data[pos_bytes + (-pos_bytes) % 4:], "<u2" if meta["index"] == "u16" else "<u4")
    mesh = trimesh.load(root / chair["mesh"], force="mesh", process=False)
    assert n == len(mesh.vertices) and np.abs(pos - mesh.vertices).max() < 1e-4  # 16-bit positions
    assert np.array_equal(idx.reshape(-1, 3), mesh.faces)


def test_gallery_markup(library):
    root, records, _ = library
    page = (root / "gallery.html").read_text()
    assert sorted(re.findall(r'<div class="asset [^"]+" data-asset="([^"]+)"', page)) == sorted(records)
    assert "untextured" in page and "[-1, 1]<sup>3</sup>" in page
    recs = _by_name(records)
    assert "preview from the input&#x27;s camera" in page or "preview from the input's camera" in page
    assert "preview from the front camera (the input has none)" in page
    for src in re.findall(r'<img class="(?:input|preview)" src="([^"]+)"', page):
        assert (root / src).exists()
    assert len(re.findall(r'<canvas class="view"', page)) == 2
    assert "http://" not in page and "https://" not in page  # nothing from outside
    assert recs["blank"]["error"] in page


def test_names_and_errors_are_escaped(tmp_path):
    from pipeline.gallery import gallery_html

    row = {"asset_id": "bad<script>", "name": "bad<b>", "source": "x.png", "seed": 0, "status": "error",
           "error": "bad: unreadable image <b>", "input": None}
    page = gallery_html([row])
    assert "bad<script>" not in page and "bad&lt;script&gt;" in page and "image &lt;b&gt;" in page


def _chromium(page: Path | str, profile: Path, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``page`` (a file or a URL), WebGL through SwiftShader."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader",
           "--enable-unsafe-swiftshader", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,900",
           "--hide-scrollbars", "--virtual-time-budget=8000", *args,
           page if isinstance(page, str) else page.as_uri()]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120)


def _region(img: np.ndarray, box) -> np.ndarray:
    x, y, w, h = (int(round(v)) for v in box)
    return img[y + 2:y + h - 2, x + 2:x + w - 2]


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (or chromium-headless-shell)")
def test_gallery_in_headless_chromium(library, tmp_path):
    root, records, _ = library
    page = root / "gallery.html"
    dom = _chromium(page, tmp_path / "profile-dom", "--dump-dom").stdout
    body = re.search(r"<body[^>]*>", dom).group(0)
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', body))
    assert attrs.get("data-previews-loaded") == "2" and attrs.get("data-views-drawn") == "2", body
    assert attrs.get("data-images-loaded") == "5", body  # 2 previews, 3 inputs (the failed item's too)
    boxes = json.loads(attrs["data-first-card"].replace("&quot;", '"'))

    shot = tmp_path / "gallery.png"
    for attempt in range(3):  # on a busy machine a screenshot can come before the view's first frame is shown
        res = _chromium(page, tmp_path / f"profile-shot{attempt}", f"--screenshot={shot}")
        assert shot.exists(), res.stderr[-2000:]
        img = np.asarray(Image.open(shot).convert("RGB")).astype(np.float64)
        view, preview, inp = (_region(img, boxes[k]) for k in ("view", "preview", "input"))
        if (view.mean(-1) < 235).mean() > 0.05:
            break
    ARTEFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copy(shot, ARTEFACTS / "test_gallery.png")
    assert img.shape[:2] == (900, 1280)
    # the 3D view drew the grey mesh: many pixels darker than the white background, and not flat
    assert (view.mean(-1) < 235).mean() > 0.05 and view.std() > 20, (view.mean(), view.std())
    assert (preview.mean(-1) < 235).mean() > 0.05 and preview.std() > 20
    assert (inp.mean(-1) < 235).mean() > 0.05 and inp.std() > 20
    # the view shows the same grey clay as the preview, seen from elsewhere: similar tones, other pixels
    grey = lambda r: r[r.mean(-1) < 235].mean()  # noqa: E731
    assert abs(grey(view) - grey(preview)) < 40


def test_coarsen_keeps_the_shape_within_the_face_budget():
    from pipeline.gallery import coarsen, viewer_script

    ball = trimesh.creation.icosphere(5, radius=0.9)  # 20,480 faces
    v, f = coarsen(ball.vertices, ball.faces, 2000)
    assert 500 < len(f) <= 2000 and f.max() < len(v)
    assert len(np.unique(np.sort(f, axis=1), axis=0)) == len(f)  # no face twice
    assert np.abs(np.linalg.norm(v, axis=1) - 0.9).max() < 0.1  # on the sphere, within about a cell
    meta = json.loads(re.search(rb"(\{.*?\})", viewer_script("ball", ball.vertices, ball.faces, 2000)).group(1))
    assert meta["faces"] == len(f) and meta["index"] == "u16"


# Drives the first 3D view as a person would, once its mesh is drawn: drag, wheel, double-click; writes what
# changed into <body data-*> (a fraction of pixels, the covered share before and after zooming out).
INTERACT = """<script>
(function () {
  function pixels(c) { return c.getContext("2d").getImageData(0, 0, c.width, c.height).data; }
  function changed(a, b) { var n = 0; for (var i = 0; i < a.length; i += 4) if (a[i] !== b[i]) n++; return n / (a.length / 4); }
  function covered(a) { var n = 0; for (var i = 0; i < a.length; i += 4) if (a[i] < 250) n++; return n / (a.length / 4); }
  function fire(c, type, x, y) {
    var r = c.getBoundingClientRect();
    c.dispatchEvent(new PointerEvent(type, {clientX: r.left + x, clientY: r.top + y, pointerId: 7, bubbles: true}));
  }
  var timer = setInterval(function () {
    var c = document.querySelector("canvas.view[data-drawn]");
    if (!c) return;
    clearInterval(timer);
    var first = pixels(c), b = document.body;
    fire(c, "pointerdown", 100, 100); fire(c, "pointermove", 160, 120); fire(c, "pointerup", 160, 120);
    var dragged = pixels(c);
    b.setAttribute("data-drag-changed", changed(first, dragged).toFixed(4));
    c.dispatchEvent(new WheelEvent("wheel", {deltaY: 600, bubbles: true, cancelable: true}));
    b.setAttribute("data-zoom-covered", covered(dragged).toFixed(4) + " " + covered(pixels(c)).toFixed(4));
    c.dispatchEvent(new MouseEvent("dblclick", {bubbles: true}));
    b.setAttribute("data-reset-changed", changed(first, pixels(c)).toFixed(4));
  }, 100);
})();
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (or chromium-headless-shell)")
def test_the_3d_view_orbits_zooms_and_resets(library, tmp_path):
    root, _, _ = library
    page = root / "gallery_interact.html"
    page.write_text((root / "gallery.html").read_text().replace("</body>", INTERACT + "</body>"))
    dom = _chromium(page, tmp_path / "profile", "--dump-dom").stdout
    attrs = dict(re.findall(r'([\w-]+)="([^"]*)"', re.search(r"<body[^>]*>", dom).group(0)))
    assert float(attrs["data-drag-changed"]) > 0.02, attrs  # the drag turned the mesh
    before, after = map(float, attrs["data-zoom-covered"].split())
    assert after < 0.8 * before, attrs  # wheel down moves the camera away: the mesh covers less
    assert float(attrs["data-reset-changed"]) == 0.0, attrs  # double-click: back to the first view exactly


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium: apt-get install chromium (or chromium-headless-shell)")
def test_gallery_served_over_http(library, tmp_path):
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root, _, _ = library
    quiet = type("Quiet", (SimpleHTTPRequestHandler,), {"log_message": lambda *a: None})
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(quiet, directory=str(root)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/gallery.html"
        dom = _chromium(url, tmp_path / "profile", "--dump-dom").stdout
    finally:
        server.shutdown()
    body = re.search(r"<body[^>]*>", dom).group(0)
    assert 'data-previews-loaded="2"' in body and 'data-views-drawn="2"' in body, body


def test_a_mesh_the_viewer_cannot_read_keeps_its_card(tmp_path):
    from pipeline.gallery import gallery_html, write_asset_view
    from pipeline.generate import Library

    lib = Library(str(tmp_path))
    fields = write_asset_view(lib, "odd", b"not a mesh", "glb")
    assert fields["viewer"] is None and fields["viewer_error"] and not (tmp_path / "viewer").exists()
    row = {"asset_id": "odd", "name": "odd", "source": "x.png", "seed": 0, "status": "ok", "error": None,
           "preview": "previews/odd.png", "mesh": "meshes/odd.glb", "faces": 12, "seconds": 1.0, **fields}
    page = gallery_html([row])
    assert "no 3D view" in page and '<canvas class="view"' not in page and 'data-status="ok"' in page
