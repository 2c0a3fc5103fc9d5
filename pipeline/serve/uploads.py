"""Checks on what a client uploads, before any model work: API key, content type, size, image dimensions."""
from __future__ import annotations

import hmac
import io
import os
from dataclasses import dataclass
from email.parser import BytesParser
from email.policy import HTTP
from pathlib import Path

IMAGE_TYPES = ("image/png", "image/jpeg", "image/webp", "application/octet-stream")


class UploadError(Exception):
    """A request the API refuses; ``status`` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class NoApiKey(ValueError):
    """The API would listen beyond this machine without a key; the message says where a key can come from."""


def read_api_key(key_file: str, key_env: str, key_secret: str = "") -> str | None:
    """The configured API key (a file, else a Kubernetes secret, else the environment), or None."""
    if key_file:
        try:
            key = Path(key_file).read_text().strip()
        except OSError as e:
            raise ValueError(f"api_key_file {key_file}: cannot read ({e.strerror})") from None
        if not key:
            raise ValueError(f"api_key_file {key_file}: empty")
        return key
    if key_secret:
        from pipeline.serve.secrets import read_kubernetes_secret

        return read_kubernetes_secret(key_secret)
    return os.environ.get(key_env) or None if key_env else None


def require_key(key: str | None, host: str, loopback: bool, open_ok: bool) -> None:
    """Refuse an open API on a non-loopback address unless explicitly allowed."""
    if key is None and not loopback and not open_ok:
        raise NoApiKey(f"refusing to serve on {host} without an API key: set api_key_file, api_key_secret or the "
                       f"variable named by api_key_env on every node that can host the API, or bind 127.0.0.1")


def check_api_key(expected: str | None, headers) -> None:
    if expected is None:
        return
    auth = headers.get("authorization", "")
    given = auth[7:].strip() if auth.lower().startswith("bearer ") else headers.get("x-api-key", "")
    if not given or not hmac.compare_digest(given.encode(), expected.encode()):
        raise UploadError(401, "missing or wrong API key (send Authorization: Bearer KEY or X-API-Key)")


def check_declared_size(headers, max_bytes: int) -> None:
    length = headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise UploadError(413, f"upload of {int(length)} bytes exceeds the limit of {max_bytes} bytes")


def media_type(headers) -> str:
    return headers.get("content-type", "").split(";")[0].strip().lower()


def check_content_type(headers) -> None:
    ct = media_type(headers)
    if ct != "multipart/form-data" and ct not in IMAGE_TYPES:
        raise UploadError(415, f"content type {ct or '(none)'!r} is not accepted; send "
                               f"{', '.join(IMAGE_TYPES)} or multipart/form-data with an 'image' field")


@dataclass
class Upload:
    data: bytes
    filename: str


def image_from_body(headers, body: bytes) -> Upload:
    """The image bytes of a raw body or of a multipart form's 'image' field (else its first file)."""
    if media_type(headers) != "multipart/form-data":
        return Upload(body, "")
    head = f"Content-Type: {headers.get('content-type')}\r\n\r\n".encode()
    msg = BytesParser(policy=HTTP).parsebytes(head + body)
    if not msg.is_multipart():
        raise UploadError(400, "malformed multipart body")
    parts = [p for p in msg.iter_parts() if p.get_param("name", header="content-disposition")]
    named = [p for p in parts if p.get_param("name", header="content-disposition") == "image"]
    files = named or [p for p in parts if p.get_filename()]
    if not files:
        raise UploadError(400, "multipart body has no 'image' field")
    part = files[0]
    return Upload(part.get_payload(decode=True) or b"", part.get_filename() or "")


def check_image(data: bytes, max_side: int, name: str, max_pixels: int | None = None) -> tuple[int, int]:
    """Reads only the header: (width, height); refuses non-images and images over ``max_side`` or ``max_pixels``."""
    from PIL import Image, UnidentifiedImageError

    if not data:
        raise UploadError(422, f"{name}: empty upload")
    try:
        with Image.open(io.BytesIO(data)) as img:
            w, h = img.size
    except Image.DecompressionBombError as e:  # PIL's own ceiling, far above ours: still a too-large image
        raise UploadError(413, f"{name}: image too large ({e})") from None
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise UploadError(422, f"{name}: not an image ({e})") from None
    if w > max_side or h > max_side:
        raise UploadError(413, f"{name}: image of {w}x{h} pixels exceeds max_image_side {max_side}")
    if max_pixels is not None and w * h > max_pixels:
        raise UploadError(413, f"{name}: image of {w}x{h} = {w * h} pixels exceeds max_image_pixels {max_pixels}")
    return w, h
