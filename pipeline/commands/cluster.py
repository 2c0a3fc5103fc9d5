"""``s2 cluster up|down|status``: a local Ray cluster on this machine, with token auth.

``up`` starts the head in its own temp folder (``/tmp/s2ray-<uid>-<dashboard port>``) and records the
processes it started there; ``down`` ends exactly the processes of that folder (the recorded ones and
what they spawned), never another cluster's: ``ray stop`` would end every Ray process of the machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pipeline.ray_address import psutil_module

RECORD = "s2-cluster.json"


def register(sub) -> None:
    p = sub.add_parser("cluster", help="start or stop a local Ray cluster on this machine (token auth on)")
    p.add_argument("action", choices=["up", "down", "status"],
                   help="up: start it; down: end its processes; status: `ray status` of it (or of RAY_ADDRESS's)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs the head offers to tasks (default: all)")
    p.add_argument("--num-gpus", type=int, default=None, help="GPUs the head offers to tasks (default: all)")
    p.add_argument("--port", type=int, default=6379, help="GCS port of the head")
    p.add_argument("--dashboard-port", type=int, default=8265, help="names the cluster for `down` and `status`")
    p.add_argument("--no-auth", action="store_true", help="start without token auth (not recommended)")
    p.add_argument("--nodes", type=int, default=1,
                   help="2 or more: a head and NODES-1 workers, each in its own network namespace on one bridge "
                        "(needs root; --num-cpus is then per worker; docs/cluster.md)")
    p.set_defaults(func=_run)


def _env(no_auth: bool) -> dict[str, str]:
    env = dict(os.environ)
    # Jobs run `s2 ...` entrypoints in a shell on the head: put this environment's scripts on its PATH.
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", "")
    if no_auth:
        env["RAY_AUTH_MODE"] = "disabled"
    else:
        env.setdefault("RAY_AUTH_MODE", "token")
    return env


def ensure_token(env: dict[str, str]) -> None:
    """Ray 2.60 reads the token from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if env.get("RAY_AUTH_MODE") != "token" or env.get("RAY_AUTH_TOKEN"):
        return
    path = Path(env.get("RAY_AUTH_TOKEN_PATH", Path.home() / ".ray" / "auth_token"))
    if not path.exists():
        import secrets

        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))


def temp_dir_for(dashboard_port: int) -> str:
    """This user's cluster folder for a dashboard port (short: Ray's socket paths must fit 107 bytes)."""
    return os.path.join(tempfile.gettempdir(), f"s2ray-{os.getuid()}-{dashboard_port}")


def multinode_dir_for(dashboard_port: int) -> str:
    """State folder of a multi-node cluster (``--nodes``): not the one-node cluster's, which `down` removes."""
    return temp_dir_for(dashboard_port) + "n"


def own_processes(temp_dir: str) -> list:
    """Live processes whose command line names ``temp_dir`` (every Ray daemon of that cluster does), with children."""
    psutil = psutil_module()
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in a for a in (p.info["cmdline"] or [])):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return list(found.values())


def end_processes(procs: list, timeout_s: float = 10.0) -> int:
    """SIGTERM, then SIGKILL what is left after ``timeout_s``; returns how many were ended."""
    psutil = psutil_module()
    for p in procs:
        try:
            p.terminate()
        except psutil.NoSuchProcess:
            pass
    _, alive = psutil.wait_procs(procs, timeout=timeout_s)
    for p in alive:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return len(procs)


def start_local(env: dict[str, str], *, dashboard_port: int = 8265, port: int = 6379, num_cpus: int | None = None,
                num_gpus: int | None = None, quiet: bool = False) -> subprocess.CompletedProcess:
    """``ray start --head`` in this cluster's own temp folder; records the processes it started there."""
    temp_dir = temp_dir_for(dashboard_port)
    os.makedirs(temp_dir, mode=0o700, exist_ok=True)
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    cmd = [ray, "start", "--head", "--disable-usage-stats", "--temp-dir", temp_dir, "--port", str(port),
           "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard_port)]
    if num_cpus is not None:
        cmd += ["--num-cpus", str(num_cpus)]
    if num_gpus is not None:
        cmd += ["--num-gpus", str(num_gpus)]
    out = subprocess.PIPE if quiet else None
    done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.PIPE if quiet else None, text=True)
    if done.returncode == 0:
        record = {"temp_dir": temp_dir, "gcs_port": port, "dashboard_port": dashboard_port, "started": time.time(),
                  "pids": sorted(p.pid for p in own_processes(temp_dir))}
        Path(temp_dir, RECORD).write_text(json.dumps(record))
    return done


def stop_local(dashboard_port: int = 8265, timeout_s: float = 10.0) -> int | None:
    """End the processes of the cluster ``start_local`` started for this port; None when there is none."""
    temp_dir = temp_dir_for(dashboard_port)
    record_path = Path(temp_dir, RECORD)
    if not record_path.exists():
        return None
    psutil = psutil_module()
    record = json.loads(record_path.read_text())
    procs = {p.pid: p for p in own_processes(temp_dir)}
    for pid in record.get("pids", []):  # recorded daemons that no longer name the folder (renamed titles)
        try:
            p = psutil.Process(pid)
            if p.create_time() <= record["started"] + 60:
                procs.setdefault(pid, p)
        except psutil.NoSuchProcess:
            continue
    n = end_processes(list(procs.values()), timeout_s)
    record_path.unlink(missing_ok=True)
    return n


def connect(start_if_none: bool = False, **init_kwargs) -> None:
    """``ray.init`` on the cluster of RAY_ADDRESS in any of Ray's forms (pipeline.ray_address.connect)."""
    from pipeline.ray_address import connect as join

    join(start_if_none, **init_kwargs)


def _run(args) -> int:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    env = _env(args.no_auth)
    if args.nodes > 1 or Path(multinode_dir_for(args.dashboard_port), "netns-cluster.json").exists():
        return _run_multinode(args)
    if args.action == "up":
        if busy := _ports_in_use(args):
            print(f"s2 cluster up: {busy}", file=sys.stderr)
            return 1
        ensure_token(env)
        rc = start_local(env, dashboard_port=args.dashboard_port, port=args.port, num_cpus=args.num_cpus,
                         num_gpus=args.num_gpus).returncode
        if rc == 0:
            print(f"\nRay cluster up (token auth {'off' if args.no_auth else 'on: the token is ~/.ray/auth_token'}):\n"
                  f"  export RAY_ADDRESS=http://127.0.0.1:{args.dashboard_port}"
                  + ("" if args.no_auth else " RAY_AUTH_MODE=token")
                  + f"\n`s2 cluster down --dashboard-port {args.dashboard_port}` ends it")
        return rc
    if args.action == "down":
        n = stop_local(args.dashboard_port)
        if n is None:
            print(f"s2 cluster down: no cluster started by `s2 cluster up` on dashboard port {args.dashboard_port}; "
                  f"nothing stopped (other Ray clusters are left alone)", file=sys.stderr)
            return 1
        print(f"stopped the cluster of {temp_dir_for(args.dashboard_port)} ({n} processes)")
        return 0
    return _status(args, ray, env)


def _status(args, ray: str, env: dict[str, str]) -> int:
    """``ray status`` of the cluster RAY_ADDRESS names (any form), else of the one `up` started here."""
    from pipeline import ray_address

    addr = ray_address.from_env()
    gcs = f"127.0.0.1:{_gcs_port(args)}"
    if addr is not None and addr.kind != "auto":
        gcs = ray_address.init_target(addr)
        if gcs.startswith("ray://"):
            print(f"s2 cluster status: {addr} reaches the cluster through Ray Client only; run `ray status` on the "
                  f"head", file=sys.stderr)
            return 1
    env = {k: v for k, v in env.items() if k != "RAY_ADDRESS"}  # `ray status` reads it over --address
    return subprocess.call([ray, "status", "--address", gcs], env=env)


def _ports_in_use(args) -> str | None:
    """Why `up` cannot start on these ports (a cluster of ours or something else listens there), or None."""
    import socket

    ours = Path(temp_dir_for(args.dashboard_port), RECORD).exists() and own_processes(temp_dir_for(args.dashboard_port))
    for port, what in ((args.port, "the GCS port, --port"), (args.dashboard_port, "the dashboard port, --dashboard-port")):
        with socket.socket() as sock:
            sock.settimeout(1.0)
            if sock.connect_ex(("127.0.0.1", port)) != 0:
                continue
        if ours:
            return (f"the cluster `s2 cluster up` started on dashboard port {args.dashboard_port} already runs "
                    f"(RAY_ADDRESS=http://127.0.0.1:{args.dashboard_port}); `s2 cluster down` first to restart it")
        return (f"port {port} ({what}) is in use on this machine, by another Ray cluster or program; "
                f"pick free ports with --port and --dashboard-port")
    return None


def _gcs_port(args) -> int:
    record = Path(temp_dir_for(args.dashboard_port), RECORD)
    return json.loads(record.read_text())["gcs_port"] if record.exists() else args.port


def _run_multinode(args) -> int:
    """``up|down|status`` of a cluster of network namespaces (pipeline.multinode), named by the dashboard port."""
    from pipeline.multinode import RECORD as NETNS_RECORD
    from pipeline.multinode import NetnsCluster, can_make_namespaces

    state_dir = multinode_dir_for(args.dashboard_port)
    recorded = Path(state_dir, NETNS_RECORD).exists()
    if args.action == "up":
        if recorded:
            print(f"s2 cluster up: a multi-node cluster is already recorded in {state_dir}; "
                  f"`s2 cluster down --dashboard-port {args.dashboard_port}` first", file=sys.stderr)
            return 1
        if args.no_auth:
            print("s2 cluster up: a multi-node cluster always runs with token auth", file=sys.stderr)
            return 2
        if why := can_make_namespaces():
            print(f"s2 cluster up --nodes {args.nodes}: {why}", file=sys.stderr)
            return 1
        cluster = NetnsCluster.start(nodes=args.nodes, cpus_per_worker=args.num_cpus or 2,
                                     name=f"s2c{args.dashboard_port}", state_dir=state_dir)
        print(f"Ray cluster up: {args.nodes} nodes, head {cluster.head_ip}, workers "
              + ", ".join(n.ip for n in cluster.nodes[1:])
              + f"\n  export RAY_ADDRESS={cluster.dashboard} RAY_AUTH_MODE=token "
              f"RAY_AUTH_TOKEN_PATH={cluster.token_path}\n"
              f"`s2 cluster down --dashboard-port {args.dashboard_port}` ends it")
        return 0
    if not recorded:
        print(f"s2 cluster {args.action}: no multi-node cluster recorded in {state_dir}", file=sys.stderr)
        return 1
    cluster = NetnsCluster.load(state_dir)
    if args.action == "down":
        cluster.stop()
        print(f"stopped the {len(cluster.nodes)}-node cluster {cluster.name} (namespaces, veths, bridge removed)")
        return 0
    text = cluster.status()
    print(text or f"the head at {cluster.address} does not answer")
    return 0 if text else 1
