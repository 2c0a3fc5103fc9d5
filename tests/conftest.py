"""Shared fixtures: the generated sample corpus, an S3 server on loopback, a local Ray cluster."""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

# Triton reads TRITON_INTERPRET when a kernel module is imported, and test modules import the kernels (through
# model/) at collection, in any order: on a machine without CUDA, set it before any of them. Code paths
# choose Triton on CUDA only ("auto"), so this changes nothing but the tests that ask for Triton.
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

from servers import start_ray, start_s3  # noqa: E402

# Token auth for every Ray this test process talks to or starts (the local clusters of start_ray, a Ray Data
# run in-process): Ray reads the mode and token once per process, so they are set before any test runs.
if "RAY_AUTH_TOKEN_PATH" not in os.environ:
    import secrets
    import tempfile

    _token = os.path.join(tempfile.mkdtemp(prefix="s2auth"), "auth_token")
    with open(_token, "w") as _fh:
        _fh.write(secrets.token_hex(32))
    os.environ.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": _token})

try:  # mesh-to-sdf refuses to load after pyrender (which the renderer's cross-check imports)
    import mesh_to_sdf  # noqa: F401,E402
except ImportError:
    pass


@pytest.fixture(scope="session")
def sample_corpus(tmp_path_factory):
    """The project's deterministic sample corpus (valid meshes of every kind plus broken files)."""
    from pipeline.corpus import generate_corpus

    out = tmp_path_factory.mktemp("corpus")
    report = generate_corpus(out, seed=0)
    return report


@pytest.fixture(scope="session")
def s3_server():
    server = start_s3()
    old = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    yield server
    server.stop()
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """A 2-CPU local Ray cluster with token auth; its processes see the S3 server's endpoint."""
    cluster = start_ray(num_cpus=2, extra_env=s3_server.env)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="module")
def netns_cluster():
    """A head (no CPUs) and two 2-CPU workers, each in its own network namespace on one bridge, token auth on
    (pipeline.multinode); torn down after the module. Skipped where namespaces cannot be made (not root)."""
    from pipeline.multinode import NetnsCluster, can_make_namespaces

    if why := can_make_namespaces():
        pytest.skip(f"no multi-node cluster on this machine: {why}")
    cluster = NetnsCluster.start(nodes=3, cpus_per_worker=2)
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def _gloo_port():
    """One gloo group for the whole session: DeepSpeed keeps handles to the first one it saw."""
    import torch.distributed as dist

    from servers import free_port

    yield free_port()
    if dist.is_initialized():
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def local_dist(_gloo_port):
    """A one-process world inside the test process (``run_without_ray``'s world of one); the environment
    it needs is set for the module only, the group (made by the first run) lives for the session."""
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(_gloo_port), "DS_ACCELERATOR": "cpu"}
    with pytest.MonkeyPatch.context() as mp:
        for key, value in env.items():
            mp.setenv(key, value)
        yield


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config):
    """The default suite runs on several processes (addopts: ``-n auto``); a run that selects integration or GPU
    tests runs them in one (they start their own clusters, time their steps, share one card), unless ``-n`` is
    on the command line."""
    expr = (getattr(config.option, "markexpr", "") or "").replace("not integration", "").replace("not gpu", "")
    given = any(a == "-n" or a.startswith(("-n=", "--numprocesses")) or (a.startswith("-n") and a[2:].isdigit())
                for a in config.invocation_params.args)
    if ("integration" in expr or "gpu" in expr) and not given and hasattr(config.option, "numprocesses"):
        config.option.numprocesses = 0
