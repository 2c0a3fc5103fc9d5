"""Checks before any work: an unreachable cluster, a bad RAY_ADDRESS, an unwritable output, a secret in a
job spec: each one line, no traceback, nothing started."""
import json
import os
import subprocess
import sys

import pytest

from pipeline.config import ConfigError
from servers import free_port

S2 = os.path.join(os.path.dirname(sys.executable), "s2")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture
def s2():
    """``s2 ARGS`` as a user runs it, in its own process: Ray fixes its client's auth mode for the life of a
    process, so an in-process call would leave this one unable to reach the token-auth test cluster."""

    def run(*args, env=None):
        res = subprocess.run([S2, *args], cwd=ROOT, env={**os.environ, **(env or {})}, capture_output=True,
                             text=True, timeout=300)
        return res.returncode, res.stdout, res.stderr
    return run


def _one_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr and len(lines) == 1, stderr[-2000:]
    return lines[0]


@pytest.mark.parametrize("address", ["http://127.0.0.1:FREE", "127.0.0.1:1", "not a host:xx"])
def test_submit_to_an_unreachable_cluster_is_one_line(s2, address):
    address = address.replace("FREE", str(free_port()))  # chosen when run: test ids stay the same per process
    rc, _, err = s2("submit", "jobs/preprocess.yaml", "--address", address)
    assert rc == 2
    line = _one_line(err)
    assert line.startswith("s2 submit: configuration error: ") and ("no Ray cluster answers at" in line
                                                                    or "not host:port" in line), line


def test_train_with_a_bad_ray_address_is_one_line(tmp_path):
    """The real command: one line on stderr, exit 2, no traceback, nothing written."""
    res = subprocess.run([S2, "train", "dit", "--shards", "synthetic", "--storage", str(tmp_path / "runs")],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "RAY_ADDRESS": f"127.0.0.1:{free_port()}"})
    rc, err = res.returncode, res.stderr
    assert rc == 2 and "no Ray cluster answers at 127.0.0.1:" in _one_line(err)
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").iterdir())


def test_unwritable_outputs_fail_before_any_work(s2, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    rc, _, err = s2("train", "dit", "--shards", "synthetic", "--storage", str(blocker / "runs"),
                     env={"RAY_ADDRESS": f"127.0.0.1:{free_port()}"})
    assert rc == 2 and f"storage {blocker}/runs: cannot write there" in _one_line(err)
    rc, _, err = s2("preprocess", "--input", str(tmp_path), "--output", str(blocker / "dataset"))
    assert rc == 2 and f"output {blocker}/dataset: cannot write there" in _one_line(err)
    rc, _, err = s2("generate", "--images", str(tmp_path), "--output", str(blocker / "library"))
    assert rc == 2 and f"output {blocker}/library: cannot write there" in _one_line(err)


def test_no_secret_in_a_job_spec_or_storage_options(s2, tmp_path):
    """Credentials inline are refused before submission, by name; the value is never echoed."""
    from pipeline import jobs, storage

    sentinel = "SENTINEL-2b7e1516"
    spec = jobs.with_overrides(jobs.load_job_spec(os.path.join(ROOT, "jobs", "preprocess.yaml")),
                               [f'storage_options={json.dumps({"client_kwargs": {"aws_secret_access_key": sentinel}})}'])
    with pytest.raises(storage.InlineCredentials, match="storage-options.client_kwargs.aws_secret_access_key") as e:
        jobs.check_entrypoint(spec)
    assert sentinel not in str(e.value)
    with pytest.raises(storage.InlineCredentials, match="storage_options.secret"):
        storage.filesystem("s3://bucket/x", {"secret": sentinel})
    storage.filesystem("s3://bucket/x", {"profile": "training"})  # naming a profile of the credentials file is fine
    text = open(os.path.join(ROOT, "jobs", "preprocess.yaml")).read()
    bad = tmp_path / "spec.yaml"
    bad.write_text(text.replace("env_vars:", f"env_vars:\n      AWS_SECRET_ACCESS_KEY: {sentinel}", 1))
    with pytest.raises(ConfigError, match="env_vars.AWS_SECRET_ACCESS_KEY: a secret in the job's runtime env") as e:
        jobs.check_entrypoint(jobs.load_job_spec(bad))
    assert sentinel not in str(e.value)
    rc, _, err = s2("submit", str(bad), "--address", "http://127.0.0.1:1")
    assert rc == 2 and sentinel not in err and "AWS_SECRET_ACCESS_KEY" in _one_line(err)


def test_launcher_with_an_unwritable_storage_is_one_line(tmp_path, capsys):
    """`python -m pipeline.train` (torchrun's entry) checks --storage before the process group starts."""
    from pipeline.train.__main__ import main

    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert main(["dit", "--shards", "synthetic", "--storage", str(blocker / "runs")]) == 1
    err = capsys.readouterr().err
    assert f"storage {blocker}/runs: cannot write there" in _one_line(err)
