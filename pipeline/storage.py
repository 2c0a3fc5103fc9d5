"""Storage by URI: local paths and ``s3://`` through fsspec (s3fs).

S3 endpoints and credentials come from the usual AWS variables
(``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ...) or from ``storage_options``;
they are never logged or written into outputs.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from typing import Any

import fsspec
from fsspec.core import url_to_fs


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def filesystem(uri: str, storage_options: dict[str, Any] | None = None) -> tuple[fsspec.AbstractFileSystem, str]:
    """The filesystem and the path inside it for ``uri``."""
    opts = dict(storage_options or {})
    if uri.startswith("s3://") and "endpoint_url" not in opts and os.environ.get("AWS_ENDPOINT_URL"):
        opts.setdefault("client_kwargs", {}).setdefault("endpoint_url", os.environ["AWS_ENDPOINT_URL"])
    if not is_remote(uri):
        uri = os.path.abspath(uri.removeprefix("file://"))
    fs, path = url_to_fs(uri, **opts)
    return fs, path


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
    tmp = os.path.join(parent, f".tmp-{uuid.uuid4().hex}-{os.path.basename(path)}")
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
    fs, path = filesystem(uri, storage_options)
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such file or folder")
    if fs.isfile(path):
        return [(full_uri(fs, path), int(fs.size(path)))]
    out = []
    for p, info in fs.find(path, detail=True).items():
        name = posixpath.basename(p)
        if name.startswith(".") or info.get("type") == "directory":
            continue
        out.append((full_uri(fs, p), int(info.get("size") or 0)))
    return sorted(out)
