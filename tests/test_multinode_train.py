"""Ray Train + DeepSpeed ZeRO-2 (gloo, CPU) across two worker nodes of a real multi-node cluster (network
namespaces on one bridge, token auth), checkpoints on an S3 server that only the network reaches; a whole
worker node killed mid-run: the run waits for a replacement node, or with min_workers goes on on the node that
is left and grows back, from its last checkpoint with no step lost or repeated. ``run_losing_a_node`` (ZeRO-3,
one rank per node, a node lost) runs in test_multinode_train_three.py on three worker nodes."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import subprocess
import sys
import time

import pytest

from servers import free_port
from test_train_ray import _flags, _s3_final_checkpoint

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

STEPS = 70  # the node is lost at the third checkpoint (step 30); 40 steps after the restart


@contextlib.contextmanager
def cluster_with_s3(nodes: int, cpus_per_worker: int):
    """A head without CPUs and ``nodes - 1`` worker nodes, an S3 server on the bridge; skips without root."""
    import shutil

    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("a multi-node cluster needs root and iproute2 (network namespaces)")
    import logging

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per S3 request otherwise

    from pipeline.multinode import NetnsCluster

    cluster = NetnsCluster.network()
    server = None
    try:
        port = free_port()
        server = ThreadedMotoServer(ip_address=cluster.host_ip, port=port)
        server.start()
        endpoint = f"http://{cluster.host_ip}:{port}"
        cluster.extra_env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                             "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                             "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
        cluster.start_nodes(nodes, cpus_per_worker=cpus_per_worker)
        yield cluster
    finally:
        cluster.stop()
        if server is not None:
            server.stop()


@pytest.fixture(scope="module")
def train_cluster():
    """Head + two 1-worker-sized nodes (2 CPUs each: one training worker per node), S3 on the bridge."""
    with cluster_with_s3(3, cpus_per_worker=2) as cluster:
        yield cluster


def _ray(cluster, *args, timeout=120):
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.run([ray, *args], env=cluster.env, capture_output=True, text=True, timeout=timeout)


def test_zero2_across_nodes_survives_a_lost_node(train_cluster):
    import s3fs

    c = train_cluster
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": c.extra_env["AWS_ENDPOINT_URL"]}, key="testing",
                           secret="testing")
    # cpus_per_worker = a worker node's CPUs: the two training workers land on different nodes.
    flags = _flags(storage="s3://mn-runs/exp", shards="synthetic", synthetic_shapes=4, num_workers=2,
                   cpus_per_worker=2, zero_stage=2, steps=STEPS, checkpoint_every=10, report_every=10,
                   max_failures=3, name="zero2")
    res = _ray(c, "job", "submit", "--no-wait", "--address", c.dashboard, "--", "s2", "train", "dit", *flags)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", res.stdout + res.stderr).group(0)
    t0 = time.monotonic()
    workers = [i for i, n in enumerate(c.nodes) if not n.head]
    seen, killed = set(), 0
    deadline = t0 + 240
    while time.monotonic() < deadline and not killed:
        seen |= {i for i in workers if c.node_pids_running(i, "RayTrainWorker")}
        fs.invalidate_cache()
        try:
            done = fs.glob("mn-runs/exp/zero2/checkpoint_*/meta.json")
        except FileNotFoundError:  # the run has not made its bucket yet
            done = []
        # Ray Train registers a reported checkpoint asynchronously: by the third on S3 the first is registered.
        if len(done) >= 3 and seen == set(workers):
            killed = c.kill_node(workers[-1])
        time.sleep(0.5)
    assert seen == set(workers), f"training workers seen on nodes {seen}, expected {workers}"
    assert killed, "the run ended (or never checkpointed twice) before a node could be killed"
    t_kill = time.monotonic() - t0
    # The head marks the node dead; a replacement node joins (`ray start --address`) and the run goes on.
    deadline = time.monotonic() + 120
    while c.alive_count() != 2:
        assert time.monotonic() < deadline, c.status()
        time.sleep(2)
    c.add_worker(2)
    deadline = time.monotonic() + 300
    while True:
        done = _ray(c, "job", "status", "--address", c.dashboard, job_id)
        st = (done.stdout + done.stderr).lower()
        if any(s in st for s in ("succeeded", "failed", "stopped")):
            break
        assert time.monotonic() < deadline, st + _ray(c, "job", "logs", "--address", c.dashboard, job_id).stdout[-6000:]
        time.sleep(2)
    logs = _ray(c, "job", "logs", "--address", c.dashboard, job_id).stdout
    assert "succeeded" in st, logs[-4000:]
    fs.invalidate_cache()
    final = _s3_final_checkpoint(fs, "mn-runs/exp/zero2")
    assert final["meta"]["step"] == STEPS
    hist = final["history"]
    assert hist["step"] == list(range(1, STEPS + 1)), "steps lost or repeated across the node loss"
    assert hist["restarted_from"] and all(s % 10 == 0 for s in hist["restarted_from"]), (
        f"killed after {t_kill:.0f}s with {len(done)} checkpoints on S3; restarted_from "
        f"{hist['restarted_from']}\n" + "\n".join(ln for ln in logs.splitlines()
                                                   if re.search(r"step|restor|resum|fail|error", ln, re.I))[-5000:])
    # ZeRO-2 keeps one optimizer partition per rank: both ranks wrote theirs to S3.
    assert {"state/zero_pp_rank_0_mp_rank_00_optim_states.pt",
            "state/zero_pp_rank_1_mp_rank_00_optim_states.pt"} <= set(final["files"]), final["files"]
    print(json.dumps({"killed_after_s": round(t_kill, 1), "total_s": round(time.monotonic() - t0, 1),
                      "restarted_from": hist["restarted_from"]}))


def _submit(cluster, flags: list[str]) -> str:
    """``s2 train dit`` as a Ray job through the head's job API; its id."""
    res = _ray(cluster, "job", "submit", "--no-wait", "--address", cluster.dashboard, "--", "s2", "train", "dit",
               *flags)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return re.search(r"raysubmit_[A-Za-z0-9]+", res.stdout + res.stderr).group(0)


def _newest(fs, run: str) -> dict | None:
    """The run's newest checkpoint on S3 (meta, files, history), None before the first."""
    fs.invalidate_cache()
    try:
        return _s3_final_checkpoint(fs, run)
    except (AssertionError, FileNotFoundError):
        return None


def _two_workers(cluster) -> list[int]:
    """Two live worker nodes (a replacement joins for one lost by an earlier test)."""
    workers = [i for i in cluster.alive_nodes() if not cluster.nodes[i].head]
    if len(workers) < 2:
        # a node an earlier test killed stays "Active" in `ray status` until the head marks it dead; wait for
        # that first, or the replacement's wait below would count the dead node and the next run start short
        cluster.wait_alive(len(cluster.alive_nodes()), 120)
    while len(workers) < 2:
        cluster.add_worker(2)
        workers = [i for i in cluster.alive_nodes() if not cluster.nodes[i].head]
    return workers


def _loop_state(fs, folder: str, rank: int) -> dict:
    import io

    from pipeline.train.checkpoints import safe_load

    return safe_load(io.BytesIO(fs.cat(f"{folder}/loop-rank{rank}.pt")), f"{folder}/loop-rank{rank}.pt")


def run_losing_a_node(c, run_name: str, workers: list[int], steps: int, **settings) -> dict:
    """A ZeRO-3 run of one rank per worker node with ``min_workers`` one below them; the last worker node is
    SIGKILLed once 3 checkpoints are on S3. Checks that the run goes on on the nodes left, every step once,
    its state resharded, and that each new rank continues the old ranks' epoch; returns what happened."""
    import s3fs

    from pipeline.train.checkpoints import owner

    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": c.extra_env["AWS_ENDPOINT_URL"]}, key="testing",
                           secret="testing")
    run, old, new = f"mn-runs/exp/{run_name}", len(workers), len(workers) - 1
    # 120 shapes of ~125 tokens, ~3.5 a step and worker: an epoch outlasts the checkpoints around the loss (11
    # steps on 3 workers, 17 on 2); every checkpoint is kept
    flags = _flags(**{**dict(storage="s3://mn-runs/exp", shards="synthetic", synthetic_shapes=120, token_budget=450,
                             num_workers=old, min_workers=new, resize_check_s=5, zero_stage=3, steps=steps,
                             checkpoint_every=2, report_every=2, keep_checkpoints=100, max_failures=3,
                             name=run_name), **settings})
    job_id = _submit(c, flags)
    newest = functools.partial(_newest, fs, run)
    t0, seen, killed_at = time.monotonic(), set(), None
    while True:
        out = _ray(c, "job", "status", "--address", c.dashboard, job_id)
        st = (out.stdout + out.stderr).lower()
        if any(s in st for s in ("succeeded", "failed", "stopped")):
            break
        assert time.monotonic() - t0 < 380, st
        if killed_at is None:
            seen |= {i for i in workers if c.node_pids_running(i, "RayTrainWorker")}
            ckpt = newest()
            # by the third checkpoint on S3 Ray Train has registered the first (it does so asynchronously)
            if seen == set(workers) and ckpt and ckpt["meta"]["step"] >= 6:
                c.kill_node(workers[-1])
                killed_at = (ckpt["meta"]["step"], round(time.monotonic() - t0, 1))
        time.sleep(1)
    logs = _ray(c, "job", "logs", "--address", c.dashboard, job_id).stdout
    assert "succeeded" in st, logs[-4000:]
    assert killed_at, "the run ended before a node could be killed"
    final = newest()
    hist = final["history"]
    assert hist["step"] == list(range(1, steps + 1)), "steps lost or repeated across the node loss"
    counts = [w for i, w in enumerate(hist["workers"]) if i == 0 or hist["workers"][i - 1] != w]
    assert counts == [old, new], (counts, killed_at, hist["restarted_from"])
    shrink = hist["workers"].index(new)  # steps before it ran on all workers: the checkpoint it resumed from
    assert shrink in hist["restarted_from"] and shrink % 2 == 0, (shrink, hist["restarted_from"])
    assert final["meta"]["world_size"] == new and final["meta"]["zero_stage"] == 3
    partitions = {f for f in final["files"] if f.endswith("_optim_states.pt")}
    assert partitions == {f"state/zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(new)}, partitions

    # The data position: the new ranks' first checkpoint after the shrink continues the old ranks' epoch.
    folders = {json.loads(fs.cat(m))["step"]: m.rsplit("/", 1)[0] for m in fs.glob(f"{run}/checkpoint_*/meta.json")}
    # before the loss every rank wrote its own ZeRO-3 partition to S3 (trained across nodes)
    assert {f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt" for r in range(old)} <= {
        f.rsplit("/", 1)[-1] for f in fs.find(folders[shrink])}, fs.find(folders[shrink])
    before = [_loop_state(fs, folders[shrink], r) for r in range(old)]
    after = [_loop_state(fs, folders[shrink + 2], r) for r in range(new)]
    epoch = min(b["epoch"] for b in before)
    done = {n for b in before if b["epoch"] == epoch for n in b["names"]}
    ahead = [r for r, b in enumerate(before) if b["epoch"] > epoch]
    assert [a["epoch"] for a in after] == [epoch] * new, (
        f"the new ranks did not continue the old ranks' epoch: resumed at {shrink} (killed at {killed_at}), old "
        f"ranks at {[(b['epoch'], len(b['names'])) for b in before]}, "
        f"new at {[(a['epoch'], a['consumed']) for a in after]}")
    for r, a in enumerate(after):
        assert len(a["names"]) == len(set(a["names"])), f"rank {r} trained a shape twice in one epoch"
        assert all(owner(n, new) == r for n in a["names"]), f"rank {r} trained another rank's shape"
        assert not ahead or [old, ahead] in a["clauses"], (ahead, a["clauses"])
        fresh = [n for n in a["names"] if n not in done]
        assert fresh, f"rank {r} trained nothing new after the shrink"
        assert not any(owner(n, old) in ahead for n in fresh), "a shape of a finished share trained again"
    assert done <= {n for a in after for n in a["names"]}, "a shape the old ranks had trained was forgotten"
    return {"killed_at_step_and_s": killed_at, "restarted_from": hist["restarted_from"], "epoch": epoch,
            "done_before": len(done), "after": [{k: a[k] for k in ("epoch", "consumed")} for a in after],
            "total_s": round(time.monotonic() - t0, 1)}


# lost at step ~40, grown back at ~140 (the new node's start and a resize check), 2026-12-06 on 2 cores
ELASTIC_STEPS = 300


@pytest.mark.timeout(720)
def test_elastic_run_shrinks_to_the_remaining_node_and_grows_back(train_cluster):
    """min_workers 1 of 2: a lost worker node shrinks the run to the node that is left (no waiting for a
    replacement), a node that joins later grows it back; ZeRO-2 state is resharded each time, no step is lost
    or repeated, and history.json names every step's worker count."""
    import s3fs

    c = train_cluster
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": c.extra_env["AWS_ENDPOINT_URL"]}, key="testing",
                           secret="testing")
    workers = _two_workers(c)
    run = "mn-runs/exp/elastic"
    flags = _flags(storage="s3://mn-runs/exp", shards="synthetic", synthetic_shapes=8, num_workers=2, min_workers=1,
                   resize_check_s=5, cpus_per_worker=2, zero_stage=2, steps=ELASTIC_STEPS, checkpoint_every=10,
                   report_every=10, max_failures=6, name="elastic")
    job_id = _submit(c, flags)
    newest = functools.partial(_newest, fs, run)

    def status() -> str:
        out = _ray(c, "job", "status", "--address", c.dashboard, job_id)
        return (out.stdout + out.stderr).lower()

    t0, phase, seen = time.monotonic(), "both", set()
    events = {}
    while True:
        st = status()
        if any(s in st for s in ("succeeded", "failed", "stopped")):
            break
        assert time.monotonic() - t0 < 660, f"phase {phase}: {st}"
        ckpt = newest()
        hist = ckpt["history"] if ckpt else {"workers": []}
        if phase == "both":
            seen |= {i for i in workers if c.node_pids_running(i, "RayTrainWorker")}
            if seen == set(workers) and len(hist["workers"]) >= 20 and hist["workers"][-1] == 2:
                c.kill_node(workers[-1])
                phase, events["killed_at_step"] = "shrunk?", hist["step"][-1]
        elif phase == "shrunk?" and hist["workers"] and hist["workers"][-1] == 1:
            c.add_worker(2)
            phase, events["node_added_at_step"] = "grown?", hist["step"][-1]
        elif phase == "grown?" and hist["workers"] and hist["workers"][-1] == 2:
            phase, events["grown_at_step"] = "done", hist["step"][-1]
        time.sleep(1)
    logs = _ray(c, "job", "logs", "--address", c.dashboard, job_id).stdout
    assert "succeeded" in st, logs[-4000:]
    final = newest()
    hist = final["history"]
    assert hist["step"] == list(range(1, ELASTIC_STEPS + 1)), "steps lost or repeated across the resizes"
    counts = [w for i, w in enumerate(hist["workers"]) if i == 0 or hist["workers"][i - 1] != w]
    assert counts == [2, 1, 2], (counts, events, hist["restarted_from"])
    assert len(hist["restarted_from"]) >= 2 and all(s % 10 == 0 for s in hist["restarted_from"])
    print(json.dumps({**events, "restarted_from": hist["restarted_from"], "total_s": round(time.monotonic() - t0, 1)}))
