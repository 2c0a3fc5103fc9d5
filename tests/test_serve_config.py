"""Serve settings: the shipped Serve config file parses, wrong keys and missing checkpoints fail early."""
from __future__ import annotations

import pytest
import yaml

from pipeline.config import ConfigError, from_dict
from pipeline.jobs import check_entrypoint, load_job_spec, with_overrides
from pipeline.serve.config import ServeConfig, load_serve_config_file
from pipeline.serve.uploads import UploadError, check_api_key, image_from_body


def test_shipped_serve_config_and_job_spec(tmp_path):
    cfg = load_serve_config_file("jobs/serve.yaml", "s2")
    assert cfg.num_gpus == 1 and cfg.generation_config.resolution == 512 and cfg.port == 8000
    spec = load_job_spec("jobs/generate.yaml")
    check_entrypoint(spec)
    with pytest.raises(ConfigError, match="concurrency"):
        check_entrypoint(with_overrides(spec, ["concurrency=0"]))


def test_wrong_keys_are_named(tmp_path):
    with pytest.raises(ConfigError, match="unknown key.*max_batch"):
        from_dict(ServeConfig, {"max_batch": 4, "random_weights": "debug"})
    with pytest.raises(ConfigError, match="unknown key.*steps"):
        from_dict(ServeConfig, {"generation": {"steps": 3}, "random_weights": "debug"})
    with pytest.raises(ConfigError, match="structure_vae, structure_dit, dit not set"):
        from_dict(ServeConfig, {})
    with pytest.raises(ConfigError, match="resolution: must be a multiple of 64"):
        from_dict(ServeConfig, {"generation": {"resolution": 100}, "random_weights": "debug"})
    with pytest.raises(ConfigError, match="cuda_graph_max_tokens: must be >= 1"):
        from_dict(ServeConfig, {"generation": {"cuda_graph_max_tokens": 0}, "random_weights": "debug"})
    doc = {"applications": [{"name": "other", "import_path": "x:y"}]}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ConfigError, match="no application named 's2'"):
        load_serve_config_file(tmp_path / "s.yaml", "s2")


def test_api_key_and_multipart_parsing():
    check_api_key(None, {})
    check_api_key("k1", {"authorization": "Bearer k1"})
    check_api_key("k1", {"x-api-key": "k1"})
    for headers in ({}, {"authorization": "Bearer k2"}, {"x-api-key": "k"}):
        with pytest.raises(UploadError, match="API key") as e:
            check_api_key("k1", headers)
        assert e.value.status == 401
    body = (b"--XX\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhello\r\n"
            b"--XX\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            b"Content-Type: image/png\r\n\r\n\x89PNGdata\r\n--XX--\r\n")
    up = image_from_body({"content-type": "multipart/form-data; boundary=XX"}, body)
    assert up.data == b"\x89PNGdata" and up.filename == "a.png"
    with pytest.raises(UploadError, match="no 'image' field"):
        image_from_body({"content-type": "multipart/form-data; boundary=XX"},
                        b"--XX\r\nContent-Disposition: form-data; name=\"note\"\r\n\r\nhi\r\n--XX--\r\n")


def test_key_is_required_beyond_loopback(tmp_path, monkeypatch):
    from pipeline.serve.uploads import NoApiKey, read_api_key, require_key

    monkeypatch.delenv("S2_API_KEY", raising=False)
    for host, loopback in (("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True),
                           ("0.0.0.0", False), ("10.1.2.3", False), ("::", False), ("myhost", False)):
        assert ServeConfig(host=host).loopback is loopback, host
    require_key(None, "127.0.0.1", True, False)
    require_key(None, "0.0.0.0", False, True)  # insecure_open: explicit
    with pytest.raises(NoApiKey, match="refusing to serve on 0.0.0.0 without an API key"):
        require_key(read_api_key("", "S2_API_KEY"), "0.0.0.0", False, False)
    monkeypatch.setenv("S2_API_KEY", "from-env")
    assert read_api_key("", "S2_API_KEY") == "from-env"
    (tmp_path / "key").write_text("from-file\n")
    assert read_api_key(str(tmp_path / "key"), "S2_API_KEY") == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_api_key(str(tmp_path / "empty"), "S2_API_KEY")


def test_key_from_a_kubernetes_secret(tmp_path, monkeypatch):
    """api_key_secret reads the secret through the cluster API (a stub on loopback) with the pod's token."""
    import base64
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from pipeline.serve.uploads import read_api_key

    seen = []

    class Api(BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            if self.path != "/api/v1/namespaces/ml/secrets/s2-api-key":
                self.send_response(404)
                self.end_headers()
                return
            body = json.dumps({"data": {"S2_API_KEY": base64.b64encode(b"from-secret\n").decode()}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    sa = tmp_path / "sa"
    sa.mkdir()
    (sa / "token").write_text("pod-token")
    (sa / "namespace").write_text("ml")
    monkeypatch.setenv("S2_SERVICE_ACCOUNT_DIR", str(sa))
    monkeypatch.setenv("S2_KUBERNETES_API", f"http://127.0.0.1:{server.server_port}")
    try:
        assert read_api_key("", "S2_API_KEY", "s2-api-key/S2_API_KEY") == "from-secret"
        assert read_api_key("", "S2_API_KEY", "ml/s2-api-key/S2_API_KEY") == "from-secret"
        assert seen[0] == ("/api/v1/namespaces/ml/secrets/s2-api-key", "Bearer pod-token")
        with pytest.raises(ValueError, match="api_key_secret ml/other/K: the cluster API answered 404"):
            read_api_key("", "S2_API_KEY", "ml/other/K")
        with pytest.raises(ValueError, match="has no key 'NOPE'"):
            read_api_key("", "S2_API_KEY", "s2-api-key/NOPE")
    finally:
        server.shutdown()


def test_manifests_give_the_key_to_every_pod_that_can_host_the_api():
    """jobs/generate.yaml starts the Serve app: head and workers alike get the key secret, not optional.
    jobs/serve.yaml binds 0.0.0.0, so its replicas refuse to start without a key (never open)."""
    doc = yaml.safe_load(open("jobs/generate.yaml"))
    cluster = doc["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            refs = [e["secretRef"] for e in container.get("envFrom", []) if "secretRef" in e]
            key = [r for r in refs if r["name"] == "s2-api-key"]
            assert key and not key[0].get("optional", False), container["name"]
    cfg = load_serve_config_file("jobs/serve.yaml", "s2")
    assert not cfg.loopback and not cfg.insecure_open and cfg.api_key_env == "S2_API_KEY"
    # The GPU cluster that `serve deploy jobs/serve.yaml` targets: every pod gets the key when it exists.
    gpu = yaml.safe_load(open("cluster/gpu-kuberay.yaml"))["spec"]
    for pod in [gpu["headGroupSpec"]["template"]] + [g["template"] for g in gpu["workerGroupSpecs"]]:
        for container in pod["spec"]["containers"]:
            assert {"name": "s2-api-key", "optional": True} in [e.get("secretRef") for e in container["envFrom"]]


def test_run_folders_and_latest_name_the_newest_checkpoint(tmp_path):
    """A checkpoint field may name a run folder, or that folder + /latest: the checkpoint of the highest step."""
    import json

    from model.cascade import GenerationConfig
    from pipeline.serve.app import resolve_run_folders

    run = tmp_path / "runs" / "ss-dit-512"
    for name, step in (("checkpoint_2026-12-04_10", 300), ("checkpoint_2026-12-04_09", 900), ("checkpoint_x", 50)):
        (run / name).mkdir(parents=True)
        (run / name / "meta.json").write_text(json.dumps({"step": step}))
        (run / name / "weights.pt").write_bytes(b"")
    (run / "checkpoint_no_weights").mkdir()
    (run / "checkpoint_no_weights" / "meta.json").write_text(json.dumps({"step": 10_000}))
    pinned = str(run / "checkpoint_x")
    gen = GenerationConfig(structure_vae=str(run), structure_dit=f"{run}/latest", dit=f"{run}/latest/", vae=pinned)
    got = resolve_run_folders(gen)
    newest = str(run / "checkpoint_2026-12-04_09")
    assert (got.structure_vae, got.structure_dit, got.dit, got.vae) == (newest, newest, newest, pinned)
