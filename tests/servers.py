"""Servers the integration tests start and stop themselves: a local Ray cluster and an S3 server.

The Ray cluster runs with token auth (Ray 2.60's default once a token exists),
on free ports and its own temp dir, so it never collides with another cluster
on the machine; teardown kills exactly its own processes.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

import psutil


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports: every socket stays bound until all are chosen, so the OS cannot hand the
    same port out twice (chosen one at a time, two of a cluster's components once got the same port)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@dataclass
class S3Server:
    endpoint: str
    env: dict[str, str]
    server: object = None

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()


def start_s3() -> S3Server:
    """An S3-compatible server on loopback (moto's server mode), with dummy credentials."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    return S3Server(endpoint=endpoint, env=env, server=server)


@dataclass
class RayCluster:
    address: str  # GCS address for ray.init
    dashboard: str  # http address for job submission
    env: dict[str, str]  # environment a client needs (auth token, PATH, S3)
    temp_dir: str
    procs: list = field(default_factory=list)

    def processes(self) -> list[psutil.Process]:
        from pipeline.commands.cluster import own_processes

        return own_processes(self.temp_dir)

    def worker_pids(self, name_part: str) -> list[int]:
        """PIDs of Ray worker processes running a task whose title contains ``name_part``."""
        out = []
        for p in self.processes():
            try:
                title = " ".join(p.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if title.startswith("ray::") and name_part in title:
                out.append(p.pid)
        return out

    def stop(self) -> None:
        from pipeline.commands.cluster import end_processes

        end_processes(self.processes(), timeout_s=2.0)  # a throwaway cluster: no need to let it wind down
        shutil.rmtree(self.temp_dir, ignore_errors=True)


def start_ray(num_cpus: int = 2, extra_env: dict[str, str] | None = None, drop_env: tuple[str, ...] = ()) -> RayCluster:
    temp_dir = tempfile.mkdtemp(prefix="s2r", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    # one token for the session's clusters (conftest exports it): Ray fixes a process's auth mode and token
    # the first time it connects, so every in-process client must see the same ones
    token_path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.join(temp_dir, "auth_token")
    if not os.path.exists(token_path):
        with open(token_path, "w") as fh:
            fh.write(secrets.token_hex(32))
    bindir = os.path.dirname(sys.executable)
    env = {k: v for k, v in os.environ.items() if k not in drop_env}
    env.update(extra_env or {})
    env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": token_path,
                "PATH": bindir + os.pathsep + env.get("PATH", ""), "RAY_USAGE_STATS_ENABLED": "0",
                "OMP_NUM_THREADS": "1"})
    names = ("--port", "--dashboard-port", "--ray-client-server-port", "--dashboard-agent-listen-port",
             "--dashboard-agent-grpc-port", "--metrics-export-port", "--node-manager-port", "--object-manager-port",
             "--runtime-env-agent-port")
    ports = dict(zip(names, free_ports(len(names))))
    gcs, dash = ports["--port"], ports["--dashboard-port"]
    cmd = [os.path.join(bindir, "ray"), "start", "--head", f"--num-cpus={num_cpus}", "--temp-dir", temp_dir,
           "--dashboard-host=127.0.0.1", "--include-dashboard=true", "--disable-usage-stats",
           "--object-store-memory", str(512 * 2**20)]
    for k, v in ports.items():
        cmd.append(f"{k}={v}")
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    cluster = RayCluster(address=f"127.0.0.1:{gcs}", dashboard=f"http://127.0.0.1:{dash}", env=env,
                         temp_dir=temp_dir)
    if out.returncode != 0:
        cluster.stop()
        raise RuntimeError(f"ray start failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    # The job API answers a little after `ray start` returns.
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"{cluster.dashboard}/api/version", timeout=2)
            break
        except urllib.error.HTTPError:  # it answered (401 without a token): it is up
            break
        except Exception:
            time.sleep(0.5)
    return cluster
