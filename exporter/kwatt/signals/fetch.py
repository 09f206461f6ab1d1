"""Bounded reads for the signal pollers: one HTTP(S) GET of JSON, one operator file.

Every failure is a ``FetchError`` carrying a fault reason (kwatt.faults.REASONS), so the
poller counts it and keeps going. Bounds: a per-request deadline (connect, headers and
body together), a response-size limit, TLS verified against the system CAs or a CA file.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import stat
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kwatt.config import ConfigError, read_yaml_file

MAX_RESPONSE_BYTES = 1024 * 1024  # real answers are well under 10 KiB
MAX_RETRY_AFTER_SECONDS = 3600.0
MAX_TOKEN_BYTES = 16 * 1024
_CHUNK = 64 * 1024


class FetchError(Exception):
    def __init__(self, reason: str, detail: str, retry_after: float | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry_after = retry_after


def tls_context(ca_file: str, key: str) -> ssl.SSLContext:
    """Verifying context: the system CAs, or only ``ca_file`` when one is given."""
    try:
        return ssl.create_default_context(cafile=ca_file or None)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{key}: cannot load {ca_file}: {exc}") from None


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """A redirect would carry the API token to wherever it points: refuse it (the 3xx
    becomes an HTTPError, counted as ``api``)."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        return None


def read_secret(path: str) -> str:
    """A credential from a mounted Secret, read at each use so rotation needs no restart."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_TOKEN_BYTES + 1)
    except OSError as exc:
        reason = "absent" if isinstance(exc, FileNotFoundError) else "permission"
        raise FetchError(reason, f"token file {path}: {exc.strerror}") from None
    token = raw.decode("utf-8", "replace").strip()
    if not token or len(raw) > MAX_TOKEN_BYTES or any(c in token for c in "\r\n\0"):
        raise FetchError("permission", f"token file {path}: empty, multi-line or too large")
    return token


@dataclass(frozen=True)
class HttpGet:
    url: str
    timeout_seconds: float
    context: ssl.SSLContext
    headers: Mapping[str, str] = field(default_factory=dict)
    max_bytes: int = MAX_RESPONSE_BYTES


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None  # the HTTP-date form: fall back to our own backoff
    return min(max(seconds, 0.0), MAX_RETRY_AFTER_SECONDS)


def _is_timeout(exc: BaseException) -> bool:
    reason = getattr(exc, "reason", None)
    return isinstance(exc, TimeoutError | socket.timeout) or isinstance(
        reason, TimeoutError | socket.timeout)


def get_json(request: HttpGet, clock: Callable[[], float] = time.monotonic) -> Any:
    deadline = clock() + request.timeout_seconds
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=request.context), _NoRedirect())
    outgoing = urllib.request.Request(
        request.url, headers={"Accept": "application/json", **request.headers})
    try:
        with opener.open(outgoing, timeout=request.timeout_seconds) as response:
            length = response.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > request.max_bytes:
                raise FetchError("parse", f"response of {length} bytes is over the "
                                 f"{request.max_bytes} byte limit")
            body = bytearray()
            while len(body) <= request.max_bytes:
                if clock() > deadline:
                    raise FetchError("timeout", f"response not complete within "
                                     f"{request.timeout_seconds:g}s")
                chunk = response.read(_CHUNK)
                if not chunk:
                    break
                body += chunk
    except urllib.error.HTTPError as exc:
        exc.close()
        reason = {401: "permission", 403: "permission", 404: "absent"}.get(exc.code, "api")
        raise FetchError(reason, f"HTTP {exc.code} {exc.reason}".strip(),
                         _retry_after(exc.headers.get("Retry-After"))) from None
    except FetchError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as exc:
        if _is_timeout(exc):
            raise FetchError("timeout", f"no answer within {request.timeout_seconds:g}s") \
                from None
        detail = getattr(exc, "reason", exc)
        raise FetchError("api", f"{type(exc).__name__}: {str(detail)[:200]}") from None
    if len(body) > request.max_bytes:
        raise FetchError("parse", f"response over the {request.max_bytes} byte limit")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise FetchError("parse", f"response is not JSON: {str(exc)[:200]}") from None


def read_document_file(path: str) -> Any:
    """The operator's YAML or JSON file; only a regular file (a FIFO would block)."""
    try:
        info = os.stat(path)
    except OSError as exc:
        reason = "absent" if isinstance(exc, FileNotFoundError) else "permission"
        raise FetchError(reason, f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise FetchError("parse", f"{path}: not a regular file")
    try:
        return read_yaml_file(path, "file")
    except ConfigError as exc:
        raise FetchError("parse", str(exc)) from None
