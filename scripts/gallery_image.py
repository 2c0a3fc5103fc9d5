"""Make docs/img/gallery.png: a library of sample-corpus views, opened in headless Chromium.

The inputs are what `s2 demo` feeds the generator (one view of a corpus mesh, its camera in the PNG); the
meshes are each source's own 64^3 sparse SDF marched by model/mesh_extract.py, not a generator's output,
so the image shows the page, not the quality of a model.

    .venv/bin/python scripts/gallery_image.py [--out docs/img/gallery.png] [--library /tmp/gallery-demo]
"""
from __future__ import annotations

import argparse
import io
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from PIL import Image

MESHES = ("multi_part/robot_arm.glb", "boolean/mug.ply", "multi_part/snowman.glb")


def build(corpus: Path, root: Path, resolution: int = 64) -> None:
    from model.mesh_extract import extract_mesh
    from model.postprocess import mesh_bytes
    from pipeline.gallery import save_input, write_asset_view
    from pipeline.generate import Library, render_preview
    from pipeline.geometry.mesh import load_mesh, normalize
    from pipeline.geometry.render import read_camera, render_views
    from pipeline.geometry.sdf import sparse_sdf

    lib, records = Library(str(root)), {}
    for i, rel in enumerate(MESHES):
        path = corpus / rel
        name = path.stem
        src = normalize(*load_mesh(path.read_bytes(), path.suffix.lstrip(".")))
        image = render_views(src.vertices, src.faces, n_views=1, size=256, seed=1000 + i, supersample=2)[0]
        data = image.png(camera=True)
        t0 = time.perf_counter()
        sdf = sparse_sdf(src.vertices, src.faces, resolution)
        v, f = extract_mesh(sdf.coords, sdf.values, resolution)
        mesh = mesh_bytes(v.numpy(), f.numpy(), "glb")
        seconds = time.perf_counter() - t0
        camera = read_camera(data)
        aid = f"{name}-{i:02d}"
        lib.write(f"meshes/{aid}.glb", mesh)
        lib.write(f"previews/{aid}.png", render_preview(mesh, "glb", 256, camera))
        records[aid] = {"asset_id": aid, "name": name, "source": f"held-out-views/{name}.png", "seed": 0,
                        "status": "ok", "error": None, "mesh": f"meshes/{aid}.glb", "preview": f"previews/{aid}.png",
                        "format": "glb", "seconds": seconds, "timings": {}, "camera": camera.as_dict(),
                        "input": save_input(lib, aid, data), **write_asset_view(lib, aid, mesh, "glb")}
    lib.write_index(records, f"sample corpus views, their {resolution}³ sparse SDF marched")


def screenshot(page: Path, out: Path, chromium: str) -> None:
    with tempfile.TemporaryDirectory() as profile:
        shot = Path(profile) / "shot.png"
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--use-angle=swiftshader",
                        "--enable-unsafe-swiftshader", "--disable-background-networking", "--disable-component-update",
                        "--disable-sync", "--no-first-run", f"--user-data-dir={profile}", "--hide-scrollbars",
                        "--window-size=1280,900", "--virtual-time-budget=8000", f"--screenshot={shot}",
                        page.as_uri()], check=True, capture_output=True, timeout=180)
        img = Image.open(shot).convert("RGB")
    buf = io.BytesIO()
    img.quantize(colors=128, method=Image.Quantize.MEDIANCUT).save(buf, format="PNG", optimize=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(buf.getvalue())
    print(f"{out}: {len(buf.getvalue()) / 1024:.0f} kB")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--corpus", default="data/corpus", help="the sample corpus (s2 corpus)")
    p.add_argument("--library", default="", help="where to write the library (default: a temporary folder)")
    p.add_argument("--out", default="docs/img/gallery.png")
    args = p.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-headless-shell")
    if chromium is None:
        raise SystemExit("needs Chromium: apt-get install chromium")
    root = Path(args.library or tempfile.mkdtemp(prefix="gallery-"))
    build(Path(args.corpus), root)
    screenshot(root / "gallery.html", Path(args.out), chromium)
    print(f"library: {root}")


if __name__ == "__main__":
    main()
