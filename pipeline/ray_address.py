"""Ray cluster addresses as users write them, and token auth read the way Ray reads it.

Every ``s2`` command that talks to a cluster goes through ``connect`` (a driver: ``ray.init``) or
``dashboard_url`` (the job API). Each accepts what Ray's own tools accept, from ``--address`` or
``RAY_ADDRESS``:

=====================  ==========================================================================
``http://HEAD:8265``    the dashboard (what ``ray job submit`` and ``serve deploy`` take)
``ray://HEAD:10001``    Ray Client
``HEAD:6379``           the GCS (what ``ray start --address`` and ``ray.init`` take)
``auto``                the cluster ``ray start`` last started on this machine
=====================  ==========================================================================

Token auth as Ray reads it: ``RAY_AUTH_MODE=token`` and the token from ``RAY_AUTH_TOKEN``,
``RAY_AUTH_TOKEN_PATH`` or ``~/.ray/auth_token``; a token found there turns token mode on for the process.
A wrong form, a cluster that does not answer, or a token the cluster needs and this machine lacks is one
``ConfigError`` line that names the fix.
"""
from __future__ import annotations

import os
import socket
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from pipeline.config import ConfigError

FORMS = "http://HEAD:8265 (dashboard), ray://HEAD:10001 (Ray Client), HEAD:6379 (GCS) or auto"
DEFAULT_PORTS = {"dashboard": 8265, "client": 10001, "gcs": 6379}
START_HINT = "start one with `s2 cluster up`, or set RAY_ADDRESS to a running cluster"
TOKEN_HINT = ("export RAY_AUTH_MODE=token and put the cluster's token in ~/.ray/auth_token "
              "(or RAY_AUTH_TOKEN / RAY_AUTH_TOKEN_PATH)")


@dataclass(frozen=True)
class RayAddress:
    text: str  # as the user wrote it
    kind: str  # dashboard | client | gcs | auto
    host: str = ""
    port: int = 0
    scheme: str = ""

    @property
    def hostport(self) -> str:
        return f"{self.host}:{self.port}"

    def __str__(self) -> str:
        return self.text


def parse(text: str) -> RayAddress:
    """Classify an address without touching the network; a wrong form is a ConfigError naming the right ones."""
    raw = (text or "").strip()
    if not raw:
        raise ConfigError(f"empty Ray address; expected {FORMS}")
    if raw == "auto":
        return RayAddress(raw, "auto")
    scheme = raw.split("://", 1)[0].lower() if "://" in raw else ""
    kinds = {"http": "dashboard", "https": "dashboard", "ray": "client", "": "gcs"}
    if scheme not in kinds:
        raise ConfigError(f"Ray address {raw!r}: unknown scheme {scheme}://; expected {FORMS}")
    kind = kinds[scheme]
    parsed = urlparse(raw if scheme else f"tcp://{raw}")
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        raise ConfigError(f"Ray address {raw!r}: not host:port (the port is a number in 1-65535); expected {FORMS}") from None
    if not host or (parsed.path not in ("", "/")) or parsed.query:
        raise ConfigError(f"Ray address {raw!r}: expected {FORMS}")
    if port is None:
        if kind == "gcs":
            raise ConfigError(f"Ray address {raw!r}: no port; write {host}:6379 (GCS) or http://{host}:8265 "
                              f"(dashboard)")
        port = 443 if scheme == "https" else DEFAULT_PORTS[kind]
    return RayAddress(raw, kind, host, port, scheme)


def from_env(explicit: str | None = None, *, jobs: bool = False) -> RayAddress | None:
    """``explicit`` (a ``--address`` flag), else RAY_ADDRESS (for the job API RAY_API_SERVER_ADDRESS first, as
    Ray's job CLI reads it); None when none is set."""
    names = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if jobs else ("RAY_ADDRESS",)
    text = explicit or next((os.environ[n] for n in names if os.environ.get(n)), "")
    return parse(text) if text else None


# ---- token auth ---------------------------------------------------------------------------------------------


def token_path() -> Path:
    return Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")


def read_token() -> str | None:
    """The token Ray would present: RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return os.environ["RAY_AUTH_TOKEN"].strip()
    path = token_path()
    try:
        return path.read_text().strip() or None
    except FileNotFoundError:
        if os.environ.get("RAY_AUTH_TOKEN_PATH"):
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path}: no such file; point it at the cluster's token") from None
        return None
    except OSError as e:
        raise ConfigError(f"cannot read the Ray token {path} ({e.strerror})") from None


def auth_env(strict: bool = True) -> str | None:
    """Token mode on for this process when a token exists and RAY_AUTH_MODE is unset; returns the token.
    Ray reads the mode once per process, so ``s2`` calls this (not strict) before any command imports Ray."""
    try:
        token = read_token()
    except ConfigError:
        if strict:
            raise
        return None
    if token and not os.environ.get("RAY_AUTH_MODE"):
        os.environ["RAY_AUTH_MODE"] = "token"
    if os.environ.get("RAY_AUTH_MODE") == "token" and not token:
        if not strict:
            return None
        raise ConfigError(f"RAY_AUTH_MODE=token but no token: {TOKEN_HINT}")
    return token if os.environ.get("RAY_AUTH_MODE") == "token" else None


# ---- the network ---------------------------------------------------------------------------------------------


def reachable(address: RayAddress | str, timeout_s: float = 5.0) -> None:
    """A TCP connection to the address's host and port, or a one-line ConfigError."""
    addr = parse(address) if isinstance(address, str) else address
    if addr.kind == "auto":
        return
    try:
        with socket.create_connection((addr.host, addr.port), timeout=timeout_s):
            pass
    except OSError as e:
        raise ConfigError(f"no Ray cluster answers at {addr} ({e.strerror or e}); {START_HINT}") from None


def _http_get(url: str, token: str | None, timeout_s: float = 5.0) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""


def is_dashboard(addr: RayAddress, timeout_s: float = 2.0) -> bool:
    """Does an HTTP server (Ray's dashboard) answer at a ``host:port`` given as a GCS address?"""
    try:
        _http_get(f"http://{addr.hostport}/api/version", None, timeout_s)
        return True
    except Exception:  # noqa: BLE001 - a gRPC port answers HTTP/1 with garbage or a reset: not a dashboard
        return False


def check_dashboard(addr: RayAddress, token: str | None) -> str:
    """The dashboard URL after a request that needs auth went through; ConfigError on no answer or a refused token."""
    url = f"{addr.scheme or 'http'}://{addr.hostport}"
    reachable(addr)
    try:
        status, _ = _http_get(f"{url}/api/jobs/", token)
    except (OSError, urllib.error.URLError) as e:
        raise ConfigError(f"the Ray dashboard at {url} does not answer ({getattr(e, 'reason', e)}); "
                          f"{START_HINT}") from None
    if status in (401, 403):
        if token:
            raise ConfigError(f"the Ray cluster at {url} refused this machine's token (HTTP {status}); use the "
                              f"cluster's token: {TOKEN_HINT}")
        raise ConfigError(f"the Ray cluster at {url} needs a token: {TOKEN_HINT}")
    if status == 404:
        raise ConfigError(f"{url} answers HTTP but is not a Ray dashboard (no job API); expected {FORMS}")
    return url


def psutil_module():
    """psutil, or the copy Ray ships and puts on the path when it is imported."""
    try:
        import psutil
    except ImportError:
        import ray  # noqa: F401
        import psutil
    return psutil


def _local_gcs_for_dashboard(port: int) -> str | None:
    """The GCS address of the dashboard listening on ``port`` on this machine (its own command line names it)."""
    try:
        psutil = psutil_module()
    except ImportError:
        return None
    pids = set()
    try:
        pids = {c.pid for c in psutil.net_connections(kind="tcp")
                if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN and c.pid}
    except (psutil.AccessDenied, OSError):
        pass
    for p in (psutil.Process(pid) for pid in pids):
        try:
            for arg in p.cmdline():
                if arg.startswith("--gcs-address="):
                    return arg.split("=", 1)[1]
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return None


def _is_local(host: str) -> bool:
    if host in ("localhost", "127.0.0.1", "::1", "0.0.0.0"):
        return True
    try:
        return host in {socket.gethostname(), *socket.gethostbyname_ex(socket.gethostname())[2]}
    except OSError:
        return False


def gcs_for_dashboard(addr: RayAddress) -> str:
    """What ``ray.init`` takes for a dashboard URL: this machine's cluster's GCS (read from the dashboard process),
    else the head's GCS on its default port 6379, else its Ray Client port 10001."""
    if _is_local(addr.host):
        found = _local_gcs_for_dashboard(addr.port)
        if found:
            return found
    for port, form in ((DEFAULT_PORTS["gcs"], "{h}:{p}"), (DEFAULT_PORTS["client"], "ray://{h}:{p}")):
        try:
            with socket.create_connection((addr.host, port), timeout=3.0):
                return form.format(h=addr.host, p=port)
        except OSError:
            continue
    raise ConfigError(f"the dashboard {addr} answers but neither the GCS ({addr.host}:6379) nor Ray Client "
                      f"({addr.host}:10001) does; set RAY_ADDRESS to the head's GCS address HEAD:PORT "
                      f"(`ray status` on the head shows it)")


# Ray Client's proxier starts a server process for each client; when that process is not up in time the client
# gets "Initialization failure from server" (seen once in the live-cluster integration test on a 2-core machine;
# its rerun connected). One more attempt after a pause; any other error is final.
CLIENT_INIT_FAILURE = "initialization failure from server"
CLIENT_RETRY_PAUSE_S = 2.0


def _client_call(addr: RayAddress | None, fn):
    """fn(), once more after CLIENT_RETRY_PAUSE_S if a Ray Client address answered with its transient
    initialization failure (any other address or error: fn's outcome as it is)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 - re-raised unless it is the client's transient failure
        if addr is None or addr.kind != "client" or CLIENT_INIT_FAILURE not in str(e).lower():
            raise
    time.sleep(CLIENT_RETRY_PAUSE_S)
    return fn()


def dashboard_url(explicit: str | None = None) -> str:
    """The job API's URL for ``--address``/RAY_ADDRESS in any form, checked (answers, token accepted)."""
    addr = from_env(explicit, jobs=True)
    if addr is None:
        raise ConfigError("no Ray cluster address: pass --address or set RAY_ADDRESS "
                          "(e.g. http://127.0.0.1:8265, the URL `s2 cluster up` prints)")
    token = auth_env()
    if addr.kind == "gcs" and is_dashboard(addr):
        addr = parse(f"http://{addr.hostport}")
    if addr.kind == "dashboard":
        return check_dashboard(addr, token)
    # GCS, Ray Client or auto: Ray finds the dashboard the cluster registered
    if addr.kind != "auto":
        reachable(addr)
    if addr.kind == "client" and is_dashboard(parse(f"http://{addr.host}:{DEFAULT_PORTS['dashboard']}")):
        return check_dashboard(parse(f"http://{addr.host}:{DEFAULT_PORTS['dashboard']}"), token)
    from ray.dashboard.utils import ray_address_to_api_server_url, ray_client_address_to_api_server_url

    try:
        find = ray_client_address_to_api_server_url if addr.kind == "client" else ray_address_to_api_server_url
        url = _client_call(addr, lambda: find(addr.text))
    except Exception as e:  # noqa: BLE001 - Ray raises several types here; the user needs one line
        raise ConfigError(f"cannot find the dashboard of the Ray cluster at {addr}: {_first_line(e)}") from None
    return check_dashboard(parse(url if "://" in url else f"http://{url}"), token)


def init_target(addr: RayAddress | None, start_if_none: bool = False) -> str | None:
    """What ``ray.init(address=...)`` gets: a GCS host:port, ray://..., "auto", or None (start one in-process)."""
    if addr is None:
        return None if start_if_none else "auto"
    if addr.kind == "auto":
        return "auto"
    reachable(addr)
    if addr.kind == "gcs" and is_dashboard(addr):
        addr = parse(f"http://{addr.hostport}")
    if addr.kind == "dashboard":
        check_dashboard(addr, read_token() if os.environ.get("RAY_AUTH_MODE") == "token" else None)
        return gcs_for_dashboard(addr)
    return addr.text


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def connect(start_if_none: bool = False, address: str | None = None, **init_kwargs) -> None:
    """``ray.init`` on the cluster of ``address`` or RAY_ADDRESS in any of Ray's forms, checked first.

    With neither: the cluster ``ray start`` started on this machine, or with ``start_if_none`` a new one in this
    process. Ray's own RAY_ADDRESS is set to the resolved address for the call (Ray reads it over the argument).
    """
    auth_env()  # before Ray is imported: it reads the auth mode once per process
    import ray

    if ray.is_initialized():
        return
    addr = from_env(address)
    target = init_target(addr, start_if_none)
    saved = os.environ.pop("RAY_ADDRESS", None)
    try:
        _client_call(addr, lambda: ray.init(address=target, ignore_reinit_error=True, **init_kwargs))
    except (ConnectionError, RuntimeError, ValueError, TimeoutError, PermissionError) as e:
        line = _first_line(e)
        if any(w in line.lower() for w in ("unauthenticated", "token", "authentication")):
            raise ConfigError(f"the Ray cluster at {addr or 'auto'} refused the connection ({line}): "
                              f"{TOKEN_HINT}") from None
        hint = START_HINT if (addr is None or addr.kind == "auto") else (
            f"if it runs with token auth: {TOKEN_HINT}" if os.environ.get("RAY_AUTH_MODE") != "token"
            else "is the token the cluster's?")
        raise ConfigError(f"cannot join the Ray cluster at {addr or 'auto'}: {line}; {hint}") from None
    finally:
        if saved is not None:
            os.environ["RAY_ADDRESS"] = saved
