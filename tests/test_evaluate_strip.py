"""The demo's strip of previews: each library item's input above its preview, in the table's order."""
from __future__ import annotations

import json

from PIL import Image

from pipeline.evaluate import HELD_OUT, NEW_VIEW, preview_strip


def _library(root, names):
    for sub in ("records", "inputs", "previews"):
        (root / sub).mkdir(parents=True)
    for i, name in enumerate(names):
        Image.new("RGBA", (64, 48), (200, 10 * i, 0, 255)).save(root / "inputs" / f"{name}.png")
        Image.new("RGB", (256, 256), (0, 0, 200)).save(root / "previews" / f"{name}.png")
        rec = {"name": name, "status": "ok", "input": f"inputs/{name}.png", "preview": f"previews/{name}.png"}
        (root / "records" / f"{name}.json").write_text(json.dumps(rec))
    rec = {"name": "broken", "status": "error", "input": None, "preview": None}
    (root / "records" / "broken.json").write_text(json.dumps(rec))


def test_strip_puts_each_input_above_its_preview(tmp_path):
    _library(tmp_path / "lib", ["torus", "chair"])
    rows = [{"name": "torus", "set": NEW_VIEW, "trained": 0.04}, {"name": "chair", "set": HELD_OUT, "trained": 0.2},
            {"name": "broken", "set": HELD_OUT}]
    out = preview_strip(tmp_path / "lib", rows, tmp_path / "strip.png", side=100)
    with Image.open(out) as im:
        assert im.size == (200, 230)  # two items shown (the failed one is left out), input + preview + label
        assert im.getpixel((50, 50))[0] == 200  # the torus's input, centred in its tile
        assert im.getpixel((150, 150)) == (0, 0, 200)  # the chair's preview below its input
        assert im.getpixel((50, 2)) == (255, 255, 255)  # letterboxed input: white above it
