"""The Serve app on a real multi-node cluster (network namespaces on one bridge, token auth), deployed with
`serve deploy` through the head's dashboard as on real hosts: a Generator replica on each worker node, an
HTTP proxy on every node; a whole worker node killed: the app keeps answering through the head's proxy."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import requests
import yaml

from test_serve import FAST, KEY, png, post

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

PORT = 8000  # every node has its own network: the same port on each, as on real hosts


def _serve(cluster, *args, timeout=180):
    serve = os.path.join(os.path.dirname(sys.executable), "serve")
    return subprocess.run([serve, *args], env=cluster.env, capture_output=True, text=True, timeout=timeout)


def _answers(url: str) -> bool:
    """A mesh with faces for the test image (glb), from the proxy at ``url``."""
    try:
        r = post(url, png(), seed=3)
    except requests.RequestException:
        return False
    return r.status_code == 200 and int(r.headers.get("x-s2-faces", 0)) > 0 and r.content[:4] == b"glTF"


def test_replicas_on_two_nodes_and_a_lost_node_keeps_answering(netns_cluster, tmp_path):
    c = netns_cluster
    key_file = tmp_path / "api_key"
    key_file.write_text(KEY + "\n")
    key_file.chmod(0o600)
    workers = [i for i, n in enumerate(c.nodes) if not n.head]
    per_node = c.nodes[workers[0]].num_cpus  # one Generator replica fills a worker node
    config = {"proxy_location": "EveryNode", "http_options": {"host": "0.0.0.0", "port": PORT},
              "applications": [{"name": "s2", "route_prefix": "/", "import_path": "pipeline.serve.app:app_builder",
                                "args": {"generation": FAST, "random_weights": "debug", "num_replicas": len(workers),
                                         "num_cpus": per_node, "max_batch_size": 2, "batch_wait_timeout_s": 0.2,
                                         "api_key_file": str(key_file), "torch_threads": 1}}]}
    path = tmp_path / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    t0 = time.monotonic()
    res = _serve(c, "deploy", str(path), "--address", c.dashboard)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    head = f"http://{c.head_ip}:{PORT}"
    deadline = time.monotonic() + 240
    placed: set[int] = set()
    while True:
        placed = {i for i in workers if c.node_pids_running(i, "ServeReplica:s2:Generator")}
        if placed == set(workers) and _answers(head):
            break
        assert time.monotonic() < deadline, (placed, _serve(c, "status", "--address", c.dashboard).stdout)
        time.sleep(2)
    t_up = time.monotonic() - t0
    # Every node's proxy serves the app: each worker answers on its own address too.
    for i in workers:
        assert _answers(f"http://{c.nodes[i].ip}:{PORT}"), f"no answer from node {i}'s proxy"

    victim = workers[-1]
    c.kill_node(victim)
    t_kill = time.monotonic()
    # The head's proxy routes around the lost replica; allow the moment Serve takes to notice the death.
    ok, failed, first_ok = 0, 0, None
    deadline = time.monotonic() + 120
    while ok < 3:
        if _answers(head):
            ok += 1
            first_ok = first_ok or time.monotonic() - t_kill
        else:
            ok, failed = 0, failed + 1
        assert time.monotonic() < deadline, f"{failed} failed requests and no 3 answers in a row after the kill"
    assert c.node_pids_running(workers[0], "ServeReplica:s2:Generator")
    print(f"serve up on {len(workers)} nodes in {t_up:.0f}s; after the node loss: first answer "
          f"{first_ok:.1f}s, {failed} failed requests before 3 in a row")
    _serve(c, "shutdown", "--yes", "--address", c.dashboard)
