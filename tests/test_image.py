"""`s2 image`: one setting names the image of every manifest in cluster/ and jobs/; set patches them all."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.commands.image import images, manifests, named_images, read_setting

ROOT = Path(__file__).resolve().parents[1]
S2 = str(Path(sys.executable).parent / "s2")


def _all_images(doc) -> list[str]:
    if isinstance(doc, dict):
        return [v for k, v in doc.items() if k == "image" and isinstance(v, str)] + [
            i for v in doc.values() for i in _all_images(v)]
    if isinstance(doc, list):
        return [i for v in doc for i in _all_images(v)]
    return []


def test_every_manifest_names_the_setting_image():
    want = set(images(read_setting(ROOT)).values())
    seen = {}
    for path in manifests(ROOT):
        for doc in yaml.safe_load_all(path.read_text()):
            for image in _all_images(doc):
                seen.setdefault(image, []).append(path.name)
    assert seen and set(seen) <= want, seen  # every image field, as YAML reads it, is one of the setting's
    assert set(named_images(ROOT)) == set(seen)  # and the patcher sees exactly those fields
    assert subprocess.run([S2, "image", "check"], cwd=ROOT, capture_output=True, text=True).returncode == 0


def test_set_patches_every_manifest_and_nothing_else(tmp_path):
    for d in ("cluster", "jobs"):
        shutil.copytree(ROOT / d, tmp_path / d)
    before = {p: p.read_text() for p in manifests(tmp_path)}
    out = subprocess.run([S2, "image", "set", "--repository", "registry.example/me/s2", "--tag", "9.9",
                          "--root", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert read_setting(tmp_path) == {"repository": "registry.example/me/s2", "tag": "9.9"}
    for path, old in before.items():
        new = path.read_text()
        changed = [(a, b) for a, b in zip(old.splitlines(), new.splitlines()) if a != b]
        assert len(old.splitlines()) == len(new.splitlines())
        for a, b in changed:  # only image fields changed, comments and layout kept
            assert "image:" in a and b.replace("registry.example/me/s2:9.9", "ghcr.io/s2ray/s2ray:0.1.0") == a
        for doc in yaml.safe_load_all(new):
            assert set(_all_images(doc)) <= {"registry.example/me/s2:9.9-cpu", "registry.example/me/s2:9.9-gpu"}
    assert subprocess.run([S2, "image", "check", "--root", str(tmp_path)], capture_output=True).returncode == 0
    job = tmp_path / "jobs" / "preprocess.yaml"
    job.write_text(job.read_text().replace("registry.example/me/s2:9.9-cpu", "other/image:1-cpu", 1))
    out = subprocess.run([S2, "image", "check", "--root", str(tmp_path)], capture_output=True, text=True)
    assert out.returncode == 1 and "jobs/preprocess.yaml name other/image:1-cpu" in out.stderr, out.stderr


def test_build_tags_both_flavours_from_one_dockerfile(tmp_path):
    out = subprocess.run([S2, "image", "build", "--dry-run", "--push", "--tag", "2.0"], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("+ docker")]
    assert [line.split()[2] for line in lines] == ["build", "push", "build", "push"]
    assert "-t ghcr.io/s2ray/s2ray:2.0-cpu" in lines[0] and "py311-gpu" in lines[2] and "cluster/Dockerfile" in lines[2]
    assert read_setting(ROOT)["tag"] == "0.1.0"  # a dry run changes nothing
