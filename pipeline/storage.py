"""Storage by URI: local paths and ``s3://`` through fsspec (s3fs).

S3 endpoints and credentials come from where botocore looks for them on each node: the AWS variables
(``AWS_ACCESS_KEY_ID``, ... e.g. from a Kubernetes secret through ``envFrom``), a shared credentials
file (``AWS_SHARED_CREDENTIALS_FILE``, a mounted secret; ``storage_options {"profile": NAME}`` picks
a profile) or an instance/pod role. ``storage_options`` never carries a credential: one given there
would sit in the job's entrypoint, Ray's job metadata, configs and logs, so it is refused
(``InlineCredentials``) before anything is read or submitted.
"""

from __future__ import annotations

import os
import posixpath
import time
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs

from pipeline.config import ConfigError

# Option names that hold a credential in fsspec backends (s3fs, gcsfs, adlfs) or botocore.
SECRET_OPTIONS = {"key", "secret", "token", "password", "session_token", "aws_access_key_id",
                  "aws_secret_access_key", "aws_session_token", "account_key", "sas_token", "client_secret",
                  "credentials", "connection_string"}


class InlineCredentials(ConfigError):
    """A credential given in storage_options (or a job's environment); the message names the key, never the value."""


def check_no_credentials(options: Any, where: str = "storage_options") -> None:
    """Refuse credentials inside ``options`` (nested mappings included)."""
    if not isinstance(options, dict):
        return
    for key, value in options.items():
        if str(key).lower() in SECRET_OPTIONS:
            raise InlineCredentials(
                f"{where}.{key}: credentials are not accepted inline (they would show in the job's entrypoint, "
                f"Ray's job metadata and logs); use the AWS_* variables (e.g. from a Kubernetes secret), "
                f"AWS_SHARED_CREDENTIALS_FILE (a mounted secret) with storage_options {{\"profile\": ...}}, or a role")
        check_no_credentials(value, f"{where}.{key}")


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for ``uri``."""
    check_no_credentials(storage_options)
    opts = dict(storage_options or {})
    if uri.startswith("s3://") and "endpoint_url" not in opts and os.environ.get("AWS_ENDPOINT_URL"):
        opts.setdefault("client_kwargs", {}).setdefault("endpoint_url", os.environ["AWS_ENDPOINT_URL"])
    if not is_remote(uri):
        uri = os.path.abspath(uri.removeprefix("file://"))
    fs, path = url_to_fs(uri, **opts)
    return fs, path


def check_writable(uri: str, storage_options: dict[str, Any] | None = None, what: str = "output") -> None:
    """Write and remove a small probe under ``uri`` (creating the folder or bucket); a failure is one ConfigError line.

    Stages call it before any work, so an output that cannot be written costs nothing."""
    try:
        fs, path = filesystem(uri, storage_options)
        fs.makedirs(path, exist_ok=True)
        probe = posixpath.join(path, f".s2-write-probe-{uuid.uuid4().hex}")
        with fs.open(probe, "wb") as fh:
            fh.write(b"probe")
        fs.rm(probe)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - every backend raises its own kind; the line names it
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"{what} {uri}: cannot write there ({type(e).__name__}: {reason})") from None


def join(uri: str, *parts: str) -> str:
    if is_remote(uri):
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://" + posixpath.join(rest, *parts)
    return os.path.join(uri, *parts)


def full_uri(fs: fsspec.AbstractFileSystem, path: str) -> str:
    """A URI for ``path`` on ``fs`` that ``filesystem()`` resolves back."""
    protocol = fs.protocol[0] if isinstance(fs.protocol, (tuple, list)) else fs.protocol
    if protocol in ("file", "local"):
        return path
    return fs.unstrip_protocol(path)


# write_atomic's temporary names (a writer killed between write and rename leaves one): hidden, and with their own
# suffix so that no reader's "*.json" / "*.parquet" pattern ever takes one for a finished object
TEMP_PREFIX, TEMP_SUFFIX = ".tmp-", ".part"


def temp_name(path: str) -> str:
    """A fresh temporary name beside ``path`` for write_atomic."""
    head, base = os.path.split(path)
    return os.path.join(head, f"{TEMP_PREFIX}{uuid.uuid4().hex}-{base}{TEMP_SUFFIX}")


def remove_stale_temps(folder: str, older_than_s: float = 3600.0) -> int:
    """Delete write_atomic's temporary files in the local ``folder`` older than ``older_than_s`` (left by a killed
    writer; a live writer renames its own within seconds); returns how many."""
    if not os.path.isdir(folder):
        return 0
    now, n = time.time(), 0
    for entry in os.scandir(folder):
        if entry.name.startswith(TEMP_PREFIX) and entry.is_file() and now - entry.stat().st_mtime > older_than_s:
            try:
                os.remove(entry.path)
                n += 1
            except FileNotFoundError:
                pass
    return n


def write_atomic(fs: fsspec.AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``data`` so that readers see the whole object or nothing.

    Local files go to a hidden temporary name in the same folder, then rename.
    An S3 object only becomes visible when its upload completes, so it is
    written in place.
    """
    parent = posixpath.dirname(path) if is_remote(full_uri(fs, path)) else os.path.dirname(path)
    if parent:
        fs.makedirs(parent, exist_ok=True)
    if is_remote(full_uri(fs, path)):
        with fs.open(path, "wb") as fh:
            fh.write(data)
        return
    tmp = temp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def list_files(uri: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, int]]:
    """Every file below ``uri`` (or ``uri`` itself) as (full URI, size), sorted.

    Hidden files and our own temporary files are left out.
    """
    return [(u, size) for u, size, _ in list_files_with_stamps(uri, storage_options)]


def list_files_with_stamps(uri: str, storage_options: dict[str, Any] | None = None) -> list[tuple[str, int, str]]:
    """Like `list_files`, with a change stamp per file from the same listing: the ETag on object stores,
    else the modification time (empty if the filesystem gives neither)."""
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such file or folder")
    if fs.isfile(path):
        info = fs.info(path)
        return [(full_uri(fs, path), int(info.get("size") or 0), _stamp(info))]
    out = []
    for p, info in fs.find(path, detail=True).items():
        name = posixpath.basename(p)
        if name.startswith(".") or info.get("type") == "directory":
            continue
        out.append((full_uri(fs, p), int(info.get("size") or 0), _stamp(info)))
    return sorted(out)


def _stamp(info: dict) -> str:
    for key in ("ETag", "etag", "mtime", "LastModified", "last_modified", "created"):
        if info.get(key) is not None:
            return str(info[key])
    return ""
