"""The preprocess job on a real multi-node Ray cluster (a head and two workers, each in its own network
namespace on one bridge, joined by `ray start --address` with token auth): its tasks spread over the
workers and every mesh is written once; a whole worker node killed mid-job (every process of its
namespace) loses and duplicates nothing."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from pipeline import shards
from test_preprocess_ray import SMALL, SPEC, _check_output, _key, _valid

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

TASK = "process_meshes"


def _submit(cluster, inp, out, *extra, no_wait=False):
    args = [os.path.join(os.path.dirname(sys.executable), "s2"), "submit", SPEC, "--address", cluster.dashboard]
    for kv in [f"input={inp}", f"output={out}", *SMALL, *extra]:
        args += ["--set", kv]
    if no_wait:
        args.append("--no-wait")
    return subprocess.run(args, env=cluster.env, capture_output=True, text=True, timeout=400)


def _wait_job(cluster, job_id, timeout_s=300.0):
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    deadline = time.monotonic() + timeout_s
    while True:
        st = subprocess.run([ray, "job", "status", "--address", cluster.dashboard, job_id], env=cluster.env,
                            capture_output=True, text=True, timeout=60).stdout.lower()
        if any(s in st for s in ("succeeded", "failed", "stopped")):
            logs = subprocess.run([ray, "job", "logs", "--address", cluster.dashboard, job_id], env=cluster.env,
                                  capture_output=True, text=True, timeout=60).stdout
            return st, logs
        assert time.monotonic() < deadline, f"job {job_id} still running after {timeout_s:.0f}s: {st}"
        time.sleep(1)


def test_s2_cluster_up_status_down_by_hand():
    """First, before the module's cluster exists: `s2 cluster up --nodes 3` leaves a running cluster behind; `down` removes every namespace and link it made."""
    from pipeline.multinode import can_make_namespaces
    from servers import free_port

    if why := can_make_namespaces():
        pytest.skip(f"no multi-node cluster on this machine: {why}")
    s2 = os.path.join(os.path.dirname(sys.executable), "s2")
    port = str(free_port())  # names the cluster: s2c<port>-<i>, bridge s2c<port>br

    def run(*args):
        return subprocess.run([s2, "cluster", *args, "--dashboard-port", port], capture_output=True, text=True,
                              timeout=400)

    up = run("up", "--nodes", "3", "--num-cpus", "1")
    try:
        assert up.returncode == 0, up.stdout[-3000:] + up.stderr[-3000:]
        assert "RAY_AUTH_TOKEN_PATH=" in up.stdout
        st = run("status")
        assert st.returncode == 0 and st.stdout.count(" node_") == 3, st.stdout
    finally:
        down = run("down")
    assert down.returncode == 0, down.stderr
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    spaces = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert f"s2c{port}" not in links + spaces
    assert not os.path.exists(f"/tmp/s2ray-{os.getuid()}-{port}n")


def test_cluster_is_three_hosts(netns_cluster):
    c = netns_cluster
    assert c.alive_count() == 3
    ips = {n.ip for n in c.nodes}
    assert len(ips) == 3 and c.head_ip in ips
    # Each node is its own process tree: no Ray process of one namespace in another.
    pids = [set(c.node_pids(i)) for i in range(3)]
    assert all(pids) and not (pids[0] & pids[1] or pids[0] & pids[2] or pids[1] & pids[2])


def test_preprocess_spreads_over_workers_and_writes_each_mesh_once(netns_cluster, sample_corpus, tmp_path):
    c = netns_cluster
    inp = tmp_path / "in"
    picked = _valid(sample_corpus)[:12]
    for e in picked:
        (inp / _key(e.path)).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.join(sample_corpus.out_dir, e.path), inp / _key(e.path))
    out = str(tmp_path / "out")
    t0 = time.monotonic()
    res = _submit(c, inp, out, "meshes_per_task=1")
    seconds = time.monotonic() - t0
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    _check_output(out, sample_corpus, subset={_key(e.path) for e in picked})
    placed = c.task_nodes(TASK)
    workers = {n.ip for n in c.nodes if not n.head}
    ran = {ip for ip, states in placed.items() if states.get("FINISHED")}
    assert ran == workers, f"{TASK} tasks ran on {placed}, expected every worker of {workers} ({seconds:.0f}s)"
    assert c.head_ip not in placed  # the head has no CPUs, as in jobs/preprocess.yaml


def test_worker_node_killed_mid_job_loses_and_duplicates_nothing(netns_cluster, sample_corpus, tmp_path):
    c = netns_cluster
    out = str(tmp_path / "out")
    res = _submit(c, sample_corpus.out_dir, out, "meshes_per_task=1", no_wait=True)
    assert res.returncode == 0, res.stderr[-3000:]
    job_id = res.stderr.split(" as ")[1].split()[0]
    victim = len(c.nodes) - 1
    killed = 0
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not killed:
        # Some meshes written and a task of the victim node in flight: lose the whole node now.
        if shards.list_shards(out) and c.node_pids_running(victim, TASK):
            killed = c.kill_node(victim)
        time.sleep(0.2)
    assert killed, "never saw the victim node run a preprocess task while work was left"
    assert not c.node_pids(victim)
    st, logs = _wait_job(c, job_id)
    assert "succeeded" in st, logs[-4000:]
    _check_output(out, sample_corpus)  # every valid mesh once per resolution: none lost, none twice
    placed = c.task_nodes(TASK)  # the victim ran tasks of this job; the survivor finished the rest
    assert c.nodes[victim].ip in placed and placed[c.nodes[1].ip].get("FINISHED"), placed
    print(f"{TASK} tasks by node after losing {c.nodes[victim].ip}: {placed}")
    # The head saw the node go: two nodes alive, the dead one listed as such.
    deadline = time.monotonic() + 120
    while c.alive_count() != 2:
        assert time.monotonic() < deadline, c.status()
        time.sleep(2)

