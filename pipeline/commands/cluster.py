"""``s2 cluster up|down|status``: a local Ray cluster on this machine, with token auth."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("cluster", help="start or stop a local Ray cluster on this machine (token auth on)")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--num-cpus", type=int, default=None)
    p.add_argument("--num-gpus", type=int, default=None)
    p.add_argument("--dashboard-port", type=int, default=8265)
    p.add_argument("--no-auth", action="store_true", help="start without token auth (not recommended)")
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


def _run(args) -> int:
    ray = os.path.join(os.path.dirname(sys.executable), "ray")
    env = _env(args.no_auth)
    if args.action == "up":
        ensure_token(env)
        cmd = [ray, "start", "--head", "--disable-usage-stats", "--dashboard-host", "127.0.0.1",
               "--dashboard-port", str(args.dashboard_port)]
        if args.num_cpus is not None:
            cmd += ["--num-cpus", str(args.num_cpus)]
        if args.num_gpus is not None:
            cmd += ["--num-gpus", str(args.num_gpus)]
        rc = subprocess.call(cmd, env=env)
        if rc == 0:
            print(f"\nRay cluster up: RAY_ADDRESS=http://127.0.0.1:{args.dashboard_port}"
                  + ("" if args.no_auth else " (token auth; clients read ~/.ray/auth_token)"))
        return rc
    if args.action == "down":
        return subprocess.call([ray, "stop", "--force"], env=env)
    return subprocess.call([ray, "status"], env=env)
