"""Ray addresses as users write them (pipeline.ray_address): parsing, token auth as Ray reads it, one-line errors;
and every form on a live local cluster."""
from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading

import pytest

from pipeline.config import ConfigError
from pipeline.ray_address import auth_env, check_dashboard, dashboard_url, parse, read_token, reachable
from servers import free_port


@pytest.mark.parametrize("text,kind,host,port", [
    ("http://127.0.0.1:8265", "dashboard", "127.0.0.1", 8265),
    ("http://head.example", "dashboard", "head.example", 8265),
    ("https://ray.example.com", "dashboard", "ray.example.com", 443),
    ("http://10.0.0.2:8265/", "dashboard", "10.0.0.2", 8265),
    ("ray://10.0.0.2:10001", "client", "10.0.0.2", 10001),
    ("ray://head", "client", "head", 10001),
    ("10.0.0.2:6379", "gcs", "10.0.0.2", 6379),
    ("[::1]:6379", "gcs", "::1", 6379),
    ("auto", "auto", "", 0),
])
def test_the_forms_users_write(text, kind, host, port):
    a = parse(text)
    assert (a.kind, a.host, a.port) == (kind, host, port) and str(a) == text


@pytest.mark.parametrize("text,msg", [
    ("", "empty Ray address"),
    ("10.0.0.2", r"no port; write 10.0.0.2:6379 \(GCS\) or http://10.0.0.2:8265"),
    ("grpc://10.0.0.2:6379", "unknown scheme grpc://"),
    ("10.0.0.2:port", "not host:port .the port is a number"),
    ("10.0.0.2:70000", "not host:port"),
    ("http://10.0.0.2:8265/api/jobs", "expected http://HEAD:8265"),
    ("http://:8265", "expected http://HEAD:8265"),
])
def test_wrong_forms_are_one_line_naming_the_right_ones(text, msg):
    with pytest.raises(ConfigError, match=msg) as err:
        parse(text)
    assert "\n" not in str(err.value)


def test_token_read_the_way_ray_reads_it(tmp_path, monkeypatch):
    for k in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert read_token() is None and auth_env() is None and "RAY_AUTH_MODE" not in os.environ
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("from-home\n")
    assert read_token() == "from-home"
    assert auth_env() == "from-home" and os.environ["RAY_AUTH_MODE"] == "token"  # a token turns token mode on
    (tmp_path / "t").write_text("from-path")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "t"))
    assert read_token() == "from-path"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert read_token() == "from-env"
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH=.*missing: no such file"):
        read_token()
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH")
    (tmp_path / ".ray" / "auth_token").unlink()
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    with pytest.raises(ConfigError, match="RAY_AUTH_MODE=token but no token: export RAY_AUTH_MODE=token and put"):
        auth_env()


def test_nothing_listening_is_one_line():
    port = free_port()
    for text in (f"127.0.0.1:{port}", f"http://127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(ConfigError, match=rf"^no Ray cluster answers at {text} .*s2 cluster up") as err:
            reachable(text)
        assert "\n" not in str(err.value)


@pytest.fixture()
def fake_dashboard():
    """An HTTP server with Ray's job route that wants the token 'good' (401 without it, 403 with another)."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            auth = self.headers.get("Authorization")
            code = 404 if not self.path.startswith("/api/jobs") else 200 if auth == "Bearer good" else (
                403 if auth else 401)
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_dashboard_token_checks(fake_dashboard):
    a = parse(fake_dashboard)
    assert check_dashboard(a, "good") == fake_dashboard
    with pytest.raises(ConfigError, match="needs a token: export RAY_AUTH_MODE=token"):
        check_dashboard(a, None)
    with pytest.raises(ConfigError, match="refused this machine's token"):
        check_dashboard(a, "stale")


def test_a_gcs_form_pointing_at_a_dashboard_is_taken_as_one(fake_dashboard, monkeypatch):
    monkeypatch.setenv("RAY_AUTH_TOKEN", "good")
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    hostport = fake_dashboard.split("://")[1]
    monkeypatch.setenv("RAY_ADDRESS", hostport)
    assert dashboard_url() == fake_dashboard


def test_no_address_names_the_fix(monkeypatch):
    for k in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(k, raising=False)
    with pytest.raises(ConfigError, match="no Ray cluster address: pass --address or set RAY_ADDRESS"):
        dashboard_url()


PROBE = ("from pipeline.ray_address import connect, dashboard_url; url = dashboard_url(); connect(log_to_driver=False); "
         "import ray; print(int(ray.cluster_resources()['CPU']), url)")


@pytest.mark.integration
def test_every_form_on_a_live_cluster(ray_cluster, tmp_path):
    """A driver (ray.init) and the job API reach the same local cluster from the dashboard URL, the GCS address,
    the dashboard's host:port and ray://; a client without the token gets the one line that names the fix."""
    # auto is Ray's own lookup (the cluster `ray start` last started here), passed through as it is
    forms = [ray_cluster.dashboard, ray_cluster.address, ray_cluster.dashboard.split("://")[1]]
    import psutil

    client = [a.split("=", 1)[1] for p in psutil.process_iter() for a in _cmdline(p)
              if {"ray.util.client.server", f"--address={ray_cluster.address}"} <= set(_cmdline(p))
              and a.startswith("--port=")]
    if client:  # Ray Client's server runs where ray[client] is installed
        forms.append(f"ray://127.0.0.1:{client[0]}")
    for form in forms:
        env = {**ray_cluster.env, "RAY_ADDRESS": form}
        env.pop("RAY_AUTH_MODE")  # a token file is enough: token mode follows, as with Ray's own tools
        out = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, f"{form}: {out.stderr[-2000:]}"
        assert out.stdout.split()[-2:] == ["2", ray_cluster.dashboard], (form, out.stdout)
    env = {k: v for k, v in ray_cluster.env.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(tmp_path), RAY_ADDRESS=ray_cluster.dashboard)
    s2 = os.path.join(os.path.dirname(sys.executable), "s2")
    out = subprocess.run([s2, "cluster", "status"], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "needs a token: export RAY_AUTH_MODE=token" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1, out.stderr



def _cmdline(p) -> list[str]:
    try:
        return p.cmdline()
    except Exception:  # noqa: BLE001 - a process that ended meanwhile
        return []


def test_client_initialization_failure_is_retried_once(monkeypatch):
    """Ray Client's transient "Initialization failure from server" gets one more attempt; a second failure, or
    any other error, or the same text from a non-client address, is not retried."""
    import pipeline.ray_address as ra

    monkeypatch.setattr(ra, "CLIENT_RETRY_PAUSE_S", 0.0)
    calls = []

    def flaky(fails, msg="Initialization failure from server:\nTraceback ..."):
        def fn():
            calls.append(1)
            if len(calls) <= fails:
                raise ConnectionAbortedError(msg)
            return "ok"
        return fn

    client, gcs = ra.parse("ray://127.0.0.1:10001"), ra.parse("127.0.0.1:6379")
    assert ra._client_call(client, flaky(1)) == "ok" and len(calls) == 2
    calls.clear()
    with pytest.raises(ConnectionAbortedError):
        ra._client_call(client, flaky(2))
    assert len(calls) == 2
    for addr, fn in ((client, flaky(1, "connection refused")), (gcs, flaky(1)), (None, flaky(1))):
        calls.clear()
        with pytest.raises(ConnectionAbortedError):
            ra._client_call(addr, fn)
        assert len(calls) == 1
