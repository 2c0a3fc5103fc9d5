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
