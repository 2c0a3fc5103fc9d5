"""A real multi-node Ray cluster on one Linux machine: one network namespace per node, joined by a bridge.

Each node is a network namespace of its own (``ip netns``) with one veth into a Linux bridge on the
host, so every node has its own address and reaches the others over a network, as hosts do: the head
runs ``ray start --head`` on its address, every worker ``ray start --address HEAD_IP:6379``, all with
token auth (one token file, ``RAY_AUTH_MODE=token``). Each node also runs in a PID namespace of its own
(``unshare --pid``) under its own ``--temp-dir``, so a node dies the way a host does: kill every process
of its namespace and nothing else on the machine notices. The host holds the bridge's first address
and talks to the head's dashboard and GCS like a laptop beside the cluster.

Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN) and iproute2. Teardown kills only the processes of the
namespaces the cluster created (``ip netns pids``), then deletes the namespaces, their veths and the
bridge; it never runs ``ray stop``.

    cluster = NetnsCluster.start(nodes=3)        # head + 2 workers
    cluster.dashboard                            # http://10.x.y.2:8265 for `s2 submit --address`
    cluster.kill_node(2)                         # every process of worker 2, at once
    cluster.stop()
"""

from __future__ import annotations

import json
import os
import random
import re
import secrets
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

GCS_PORT = 6379
DASHBOARD_PORT = 8265
RECORD = "netns-cluster.json"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check)


def _free_subnet() -> str:
    """A /24 under 10.200-254.x that no interface of the host uses (first three octets)."""
    used = _ip("-4", "-o", "addr", "show").stdout
    rng = random.SystemRandom()
    for _ in range(200):
        net = f"10.{rng.randint(200, 254)}.{rng.randint(0, 255)}"
        if f" {net}." not in used:
            return net
    raise RuntimeError("no free 10.x.y.0/24 subnet for the cluster bridge")


def can_make_namespaces() -> str | None:
    """None where this process may create network namespaces and bridges, else why not."""
    if shutil.which("ip") is None:
        return "iproute2's `ip` is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"s2p{secrets.token_hex(2)}"
    made = _ip("link", "add", probe, "type", "bridge", check=False)
    if made.returncode != 0:
        return f"cannot create a bridge: {made.stderr.strip()}"
    _ip("link", "del", probe, check=False)
    made = _ip("netns", "add", probe, check=False)
    if made.returncode != 0:
        return f"cannot create a network namespace: {made.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@dataclass
class Node:
    netns: str  # network namespace name
    ip: str
    veth: str  # host end of the node's veth pair (in the bridge)
    temp_dir: str  # the node's own --temp-dir
    log: str
    head: bool = False
    num_cpus: int = 0


@dataclass
class NetnsCluster:
    name: str  # prefix of every namespace and link the cluster owns
    subnet: str  # first three octets of its /24
    state_dir: str  # auth token, node temp dirs, logs, the record
    bridge: str
    nodes: list[Node] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)

    # ---- addresses and environment -------------------------------------------------------------
    @property
    def host_ip(self) -> str:
        return f"{self.subnet}.1"

    @property
    def head_ip(self) -> str:
        return f"{self.subnet}.2"

    @property
    def address(self) -> str:
        """GCS address, for ``ray.init`` and ``ray start --address``."""
        return f"{self.head_ip}:{GCS_PORT}"

    @property
    def dashboard(self) -> str:
        """Job API address, for ``s2 submit --address`` and ``ray job submit``."""
        return f"http://{self.head_ip}:{DASHBOARD_PORT}"

    @property
    def token_path(self) -> str:
        return os.path.join(self.state_dir, "auth_token")

    @property
    def env(self) -> dict[str, str]:
        """Environment of a client (and of every node): the token, this Python's scripts on PATH."""
        env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN")}
        env.update(self.extra_env)
        bindir = os.path.dirname(sys.executable)
        env.update({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": self.token_path,
                    "PATH": bindir + os.pathsep + env.get("PATH", ""), "RAY_USAGE_STATS_ENABLED": "0",
                    "OMP_NUM_THREADS": "1"})
        return env

    # ---- life cycle ---------------------------------------------------------------------------------
    @classmethod
    def start(cls, nodes: int = 3, cpus_per_worker: int = 2, head_cpus: int = 0, *, name: str | None = None,
              state_dir: str | None = None, extra_env: dict[str, str] | None = None,
              object_store_mb: int = 200, timeout_s: float = 300.0) -> NetnsCluster:
        """Bridge, head and ``nodes - 1`` workers; returns once ``ray status`` counts every node alive.
        On any failure it tears down what it made and raises."""
        cluster = cls.network(name=name, state_dir=state_dir, extra_env=extra_env)
        cluster.start_nodes(nodes, cpus_per_worker, head_cpus, object_store_mb=object_store_mb, timeout_s=timeout_s)
        return cluster

    @classmethod
    def network(cls, *, name: str | None = None, state_dir: str | None = None,
                extra_env: dict[str, str] | None = None) -> NetnsCluster:
        """The bridge (the host at ``host_ip``) and the token, no node yet: start a server the nodes need on
        ``host_ip`` first (an S3 store, say), put its address into ``extra_env``, then ``start_nodes``."""
        if shutil.which("ip") is None:
            raise RuntimeError("iproute2's `ip` is not installed")
        name = name or f"s2n{secrets.token_hex(2)}"
        state_dir = state_dir or f"/tmp/{name}"  # short: Ray's socket paths must fit 107 bytes
        os.makedirs(state_dir, mode=0o700, exist_ok=True)
        cluster = cls(name=name, subnet=_free_subnet(), state_dir=state_dir, bridge=f"{name}br",
                      extra_env=dict(extra_env or {}))
        fd = os.open(cluster.token_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_hex(32))
        try:
            _ip("link", "add", cluster.bridge, "type", "bridge")
            cluster.save()
            _ip("addr", "add", f"{cluster.host_ip}/24", "dev", cluster.bridge)
            _ip("link", "set", cluster.bridge, "up")
        except BaseException:
            cluster.stop()
            raise
        return cluster

    def start_nodes(self, nodes: int = 3, cpus_per_worker: int = 2, head_cpus: int = 0, *,
                    object_store_mb: int = 200, timeout_s: float = 300.0) -> None:
        if nodes < 2:
            raise ValueError("a multi-node cluster needs a head and at least one worker (nodes >= 2)")
        try:
            self._add_node(head=True, num_cpus=head_cpus, object_store_mb=object_store_mb)
            self.wait_alive(1, timeout_s)
            for _ in range(nodes - 1):
                self.add_worker(cpus_per_worker, object_store_mb=object_store_mb, wait=False)
            self.wait_alive(nodes, timeout_s)
            self.wait_dashboard(timeout_s)
        except BaseException:
            self.stop()
            raise

    def add_worker(self, num_cpus: int = 2, *, object_store_mb: int = 200, wait: bool = True,
                   timeout_s: float = 300.0) -> Node:
        """One more worker node (``ray start --address HEAD_IP:6379`` in a new namespace)."""
        node = self._add_node(head=False, num_cpus=num_cpus, object_store_mb=object_store_mb)
        if wait:
            self.wait_alive(len(self.alive_nodes()), timeout_s)
        return node

    def _add_node(self, *, head: bool, num_cpus: int, object_store_mb: int) -> Node:
        i = len(self.nodes)
        node = Node(netns=f"{self.name}-{i}", ip=f"{self.subnet}.{i + 2}", veth=f"{self.name}v{i}",
                    temp_dir=os.path.join(self.state_dir, f"n{i}"), log=os.path.join(self.state_dir, f"n{i}.log"),
                    head=head, num_cpus=num_cpus)
        self.nodes.append(node)
        self.save()  # recorded before it exists, so a teardown after a crash finds it
        _ip("netns", "add", node.netns)
        _ip("link", "add", node.veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
        _ip("link", "set", node.veth, "master", self.bridge, "up")
        _ip("-n", node.netns, "addr", "add", f"{node.ip}/24", "dev", "eth0")
        _ip("-n", node.netns, "link", "set", "eth0", "up")
        _ip("-n", node.netns, "link", "set", "lo", "up")
        os.makedirs(node.temp_dir, exist_ok=True)
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        cmd = [ray, "start", "--block", "--disable-usage-stats", "--temp-dir", node.temp_dir,
               "--node-ip-address", node.ip, f"--num-cpus={num_cpus}",
               "--object-store-memory", str(object_store_mb * 2**20)]
        if head:
            cmd += ["--head", "--port", str(GCS_PORT), "--dashboard-host", "0.0.0.0",
                    "--dashboard-port", str(DASHBOARD_PORT), "--include-dashboard=true"]
        else:
            cmd += ["--address", self.address]
        # ip netns exec: the node's network; unshare --pid: its own process tree, whose first process
        # (`ray start --block`) takes every other one down with it when killed, like a host losing power.
        full = ["ip", "netns", "exec", node.netns, "unshare", "--pid", "--fork", "--mount-proc", *cmd]
        with open(node.log, "ab") as log:
            # Collective libraries bind the node's own interface, not the host name's address.
            env = {**self.env, "GLOO_SOCKET_IFNAME": "eth0", "NCCL_SOCKET_IFNAME": "eth0"}
            subprocess.Popen(full, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, cwd=self.state_dir)
        return node

    def status(self, timeout_s: float = 60.0) -> str:
        """``ray status`` of the head, asked over the bridge as any client would."""
        ray = os.path.join(os.path.dirname(sys.executable), "ray")
        try:
            done = subprocess.run([ray, "status", "--address", self.address], env=self.env, capture_output=True,
                                  text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            return ""
        return done.stdout if done.returncode == 0 else ""

    def alive_count(self) -> int:
        """Nodes ``ray status`` lists under "Active:" (0 when the head does not answer)."""
        text = self.status()
        m = re.search(r"Active:\n(.*?)\n\s*Pending:", text, re.S)
        return len(re.findall(r"^\s*\d+\s+node_", m.group(1), re.M)) if m else 0

    def wait_alive(self, n: int, timeout_s: float = 300.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            got = self.alive_count()
            if got == n:
                return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {nd.log}\n{_tail(nd.log)}" for nd in self.nodes)
                raise TimeoutError(f"{got} of {n} Ray nodes alive after {timeout_s:.0f}s\n{logs}")
            time.sleep(2)

    def wait_dashboard(self, timeout_s: float = 120.0) -> None:
        """The job API answers a little after the GCS does."""
        import urllib.error
        import urllib.request

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"{self.dashboard}/api/version", timeout=3)
                return
            except urllib.error.HTTPError:  # answered (401 without the token): up
                return
            except Exception:
                time.sleep(1)
        raise TimeoutError(f"no job API at {self.dashboard} after {timeout_s:.0f}s")

    def node_pids(self, i: int) -> list[int]:
        """Every process in node ``i``'s network namespace."""
        out = _ip("netns", "pids", self.nodes[i].netns, check=False).stdout
        return [int(p) for p in out.split()]

    def kill_node(self, i: int, timeout_s: float = 30.0) -> int:
        """SIGKILL every process of node ``i`` (as a host losing power); its namespace and links stay until
        ``stop``. Returns how many processes it killed."""
        killed: set[int] = set()
        deadline = time.monotonic() + timeout_s
        while True:
            pids = self.node_pids(i)
            if not pids:
                return len(killed)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                    killed.add(pid)
                except ProcessLookupError:
                    pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {i} still has processes {pids} after {timeout_s:.0f}s")
            time.sleep(0.2)

    def node_pids_running(self, i: int, title_part: str) -> list[int]:
        """PIDs in node ``i`` whose command line (a Ray worker's title, ``ray::<task>``) contains ``title_part``."""
        out = []
        for pid in self.node_pids(i):
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if title_part in cmdline:
                out.append(pid)
        return out

    def task_nodes(self, name_part: str, timeout_s: float = 120.0) -> dict[str, dict[str, int]]:
        """Node address -> {task state: count} of the tasks whose name contains ``name_part``, from Ray's state
        API on the head (asked by a client process holding the token)."""
        code = ("import collections, json, sys\n"
                "from ray.util.state import list_nodes, list_tasks\n"
                "a = sys.argv[1]\n"
                "ips = {n.node_id: n.node_ip for n in list_nodes(address=a, limit=1000)}\n"
                "c = collections.defaultdict(collections.Counter)\n"
                "for t in list_tasks(address=a, limit=10000, detail=True):\n"
                "    if sys.argv[2] in t.name:\n"
                "        c[ips.get(t.node_id, str(t.node_id))][t.state] += 1\n"
                "print(json.dumps(c))\n")
        done = subprocess.run([sys.executable, "-c", code, self.dashboard, name_part], env=self.env,
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise RuntimeError(f"Ray state API at {self.dashboard}: {done.stderr[-2000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])

    def alive_nodes(self) -> list[int]:
        return [i for i in range(len(self.nodes)) if self.node_pids(i)]

    def stop(self) -> None:
        """Kill the processes of every namespace of this cluster, delete the namespaces, veths and bridge."""
        for i in reversed(range(len(self.nodes))):
            try:
                self.kill_node(i)
            except TimeoutError:
                pass
        for node in self.nodes:
            _ip("netns", "del", node.netns, check=False)  # takes the veth pair with it
            _ip("link", "del", node.veth, check=False)
        _ip("link", "del", self.bridge, check=False)
        shutil.rmtree(self.state_dir, ignore_errors=True)

    # ---- record, so that another process (`s2 cluster down`) can tear it down ------------------------
    def save(self) -> None:
        data = asdict(self)
        data.pop("extra_env")  # may hold credentials
        Path(self.state_dir, RECORD).write_text(json.dumps(data, indent=1))

    @classmethod
    def load(cls, state_dir: str) -> NetnsCluster:
        data = json.loads(Path(state_dir, RECORD).read_text())
        nodes = [Node(**n) for n in data.pop("nodes")]
        return cls(**data, nodes=nodes)


def _tail(path: str, n: int = 2000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-n:]
    except OSError:
        return "(no log)"
