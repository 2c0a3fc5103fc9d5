"""The HTTP API of the Serve app with real requests on loopback, on a local Ray cluster."""
from __future__ import annotations

import io
import os
import threading

import numpy as np
import pytest
import requests
from PIL import Image

from servers import free_port

KEY = "test-key-0123456789"
FAST = {"resolution": 64, "structure_steps": 2, "sparse_steps": 2, "guidance": 1.0, "device": "cpu"}


def png(w=96, h=96, box=True) -> bytes:
    img = np.full((h, w, 4), (255, 255, 255, 0), np.uint8)  # transparent background, the object opaque
    if box:
        img[h // 4: 3 * h // 4, w // 5: 4 * w // 5] = (180, 70, 40, 255)
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def app(ray_cluster, tmp_path_factory):
    os.environ.update({k: v for k, v in ray_cluster.env.items() if k.startswith("RAY_AUTH")})
    import ray
    from ray import serve

    from pipeline.serve.app import start
    from pipeline.serve.config import ServeConfig

    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(KEY + "\n")
    ray.init(address=ray_cluster.address, ignore_reinit_error=True, log_to_driver=False)
    # Serve keeps one HTTP proxy per cluster; one left by another test would keep its own port.
    serve.shutdown()
    cfg = ServeConfig(name="s2test", port=free_port(), generation=FAST, random_weights="debug", num_cpus=1,
                      max_batch_size=4, batch_wait_timeout_s=1.0, max_upload_mb=0.25, max_image_side=1024,
                      max_image_pixels=500_000,
                      api_key_file=str(key_file), torch_threads=1)
    start(cfg)
    yield f"http://127.0.0.1:{cfg.port}", cfg
    serve.delete(cfg.name)
    serve.shutdown()
    ray.shutdown()


def post(url, data, ctype="image/png", key=KEY, **params):
    headers = {"Content-Type": ctype}
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return requests.post(f"{url}/v1/generate", data=data, headers=headers, params=params, timeout=300)


def test_health_and_model_info(app):
    url, cfg = app
    assert requests.get(f"{url}/healthz", timeout=30).json() == {"status": "ok"}
    info = requests.get(f"{url}/v1/model", headers={"X-API-Key": KEY}, timeout=60).json()
    assert info.get("resolution") == 64, info
    assert info["api_key_required"] is True
    assert set(info["networks"]) >= {"structure_vae", "structure_dit", "dit"}
    assert info["limits"]["max_image_side"] == 1024
    assert KEY not in str(info)


def test_good_image_gives_a_mesh_in_each_format(app):
    import trimesh

    url, _ = app
    r = post(url, png(), seed=3)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "model/gltf-binary" and r.headers["x-s2-seed"] == "3"
    mesh = trimesh.load(io.BytesIO(r.content), file_type="glb", force="mesh")
    assert len(mesh.faces) == int(r.headers["x-s2-faces"]) > 0
    again = post(url, png(), seed=3)  # same image and seed: the same mesh
    assert again.content == r.content
    files = {"image": ("chair.png", png(), "image/png")}
    m = requests.post(f"{url}/v1/generate", files=files, params={"format": "obj", "seed": 3},
                      headers={"X-API-Key": KEY}, timeout=300)
    assert m.status_code == 200, m.text
    obj = trimesh.load(io.BytesIO(m.content), file_type="obj", force="mesh")
    assert len(obj.faces) == len(mesh.faces)


def test_refusals_name_the_reason(app):
    url, _ = app
    r = post(url, b"this is not an image")
    assert r.status_code == 422 and "not an image" in r.json()["error"]
    r = post(url, png(box=False))
    assert r.status_code == 422 and "no foreground" in r.json()["error"]
    r = post(url, b"{}", ctype="application/json")
    assert r.status_code == 415 and "application/json" in r.json()["error"]
    r = post(url, os.urandom(400_000))
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    r = post(url, png(w=1500, h=20))
    assert r.status_code == 413 and "1500x20" in r.json()["error"]
    r = post(url, png(), format="stl")
    assert r.status_code == 400


def test_api_key_required(app):
    url, _ = app
    assert post(url, png(), key=None).status_code == 401
    assert post(url, png(), key="wrong-key").status_code == 401
    assert requests.get(f"{url}/v1/model", timeout=30).status_code == 401


def test_concurrent_requests_are_batched(app):
    from pipeline.serve.app import generator_handle

    url, cfg = app
    answers = [None] * 4

    def call(i):
        answers[i] = post(url, png(), seed=10 + i)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert max(int(a.headers["x-s2-batch-size"]) for a in answers) > 1
    assert len({a.content for a in answers}) == 4  # different seeds, different meshes
    sizes = generator_handle(cfg.name).batch_sizes.remote().result()
    assert max(sizes) > 1


def test_second_app_on_another_port_is_refused(app):
    """Serve has one HTTP address per cluster: asking for another port is an error naming both, not ignored."""
    import dataclasses

    from pipeline.serve.app import start

    url, cfg = app
    other = dataclasses.replace(cfg, name="s2other", port=cfg.port + 1)
    with pytest.raises(RuntimeError, match=f"listens on .*:{cfg.port}.*asked for .*:{cfg.port + 1}"):
        start(other)
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"  # the running app is untouched


def _png_header(w: int, h: int) -> bytes:
    """A PNG of a few bytes whose header claims w x h pixels: the start of a decompression bomb."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


def test_pixel_bombs_get_413(app):
    url, _ = app
    r = post(url, _png_header(40000, 40000))  # PIL's own bomb ceiling (was a 500)
    assert r.status_code == 413 and "too large" in r.json()["error"], r.text
    r = post(url, _png_header(1000, 1000))  # sides within max_image_side, pixel count not
    assert r.status_code == 413 and "1000x1000 = 1000000 pixels exceeds max_image_pixels 500000" in r.json()["error"]


def test_docs_and_openapi_need_the_key(app):
    url, _ = app
    for path in ("/docs", "/openapi.json"):
        assert requests.get(f"{url}{path}", timeout=30).status_code == 401, path
        assert requests.get(f"{url}{path}", headers={"X-API-Key": "wrong"}, timeout=30).status_code == 401
        assert requests.get(f"{url}{path}", headers={"X-API-Key": KEY}, timeout=30).status_code == 200, path
    spec = requests.get(f"{url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}, timeout=30).json()
    assert "/v1/generate" in spec["paths"]
    assert requests.get(f"{url}/redoc", timeout=30).status_code == 404


@pytest.mark.integration  # Serve tries the replica three times before the app fails (~40 s)
def test_open_api_on_a_public_address_refuses_to_start(app):
    """An app whose HTTP address is not loopback and whose replica finds no key does not come up."""
    import dataclasses

    from ray import serve

    from pipeline.config import ConfigError
    from pipeline.serve.app import deploy

    url, cfg = app
    open_cfg = dataclasses.replace(cfg, name="s2open", route_prefix="/open", host="0.0.0.0", api_key_file="",
                                   api_key_env="S2_TEST_KEY_NOT_SET")
    try:
        with pytest.raises(ConfigError, match="^refusing to serve on 0.0.0.0 without an API key: set api_key_file"):
            deploy(open_cfg)
    finally:
        serve.delete("s2open")
    assert requests.get(f"{url}/open/healthz", timeout=30).status_code == 404
