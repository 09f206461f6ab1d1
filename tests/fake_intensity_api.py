"""A fake grid-signal API on loopback: Electricity Maps, UK National Grid and a price feed.

Real HTTP (or HTTPS with a test CA) so the exporter's client, TLS, timeouts and size
limits are exercised as in production. The response formats follow the providers' public
documentation (cited in docs/carbon-and-cost.md):

* ``GET /v3/carbon-intensity/latest?zone=Z`` with header ``auth-token``: Electricity Maps;
* ``GET /intensity``: UK national; ``GET /regional/regionid/N``: UK regional;
* ``GET /price``: kwatt's own price document (``Authorization: Bearer`` when a token is set);
* ``GET /redirect``: 302 to the Electricity Maps path.

A test sets the value, a fault (``fail(status)``, ``malformed()``, ``oversize()``) or a
hang (``hang()``: requests block until ``release()``; ``requests_held`` says how many are
waiting, so a test can order events without timing them).
"""

from __future__ import annotations

import json
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Seen:
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]


@dataclass
class FakeIntensityApi:
    token: str = "em-token"
    value: float = 412.0
    forecast: float = 300.0
    uk_actual: float | None = 250.0
    price: Any = field(default_factory=lambda: {"value": 0.31, "currency": "EUR"})
    status: int | None = None
    retry_after: str | None = None
    body_override: bytes | None = None
    requests: list[Seen] = field(default_factory=list)
    requests_held: int = 0
    _hang: threading.Event = field(default_factory=threading.Event)
    _released: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # -- what the next requests get ---------------------------------------------------

    def ok(self) -> None:
        self.status = None
        self.retry_after = None
        self.body_override = None

    def fail(self, status: int, retry_after: str | None = None) -> None:
        self.status = status
        self.retry_after = retry_after

    def malformed(self) -> None:
        self.body_override = b'{"carbonIntensity": '

    def oversize(self, size: int = 2 * 1024 * 1024) -> None:
        self.body_override = b'{"pad": "' + b"x" * size + b'"}'

    def hang(self) -> None:
        self._released.clear()
        self._hang.set()

    def release(self) -> None:
        self._hang.clear()
        self._released.set()

    # -- serving ----------------------------------------------------------------------

    def _body(self, path: str, query: dict[str, list[str]],
              headers: dict[str, str]) -> tuple[int, dict[str, Any] | None]:
        if path == "/v3/carbon-intensity/latest":
            if headers.get("auth-token") != self.token:
                return 401, {"message": "unauthorized"}
            zone = query.get("zone", [""])[0]
            return 200, {"zone": zone, "carbonIntensity": self.value,
                         "datetime": "2026-12-01T11:00:00.000Z",
                         "updatedAt": "2026-12-01T10:47:20.402Z",
                         "emissionFactorType": "lifecycle", "isEstimated": True,
                         "estimationMethod": "TIME_SLICER_AVERAGE"}
        intensity = {"forecast": self.forecast, "actual": self.uk_actual, "index": "moderate"}
        if path == "/intensity":
            return 200, {"data": [{"from": "2026-12-01T11:00Z", "to": "2026-12-01T11:30Z",
                                   "intensity": intensity}]}
        if path.startswith("/regional/regionid/"):
            region = int(path.rsplit("/", 1)[1])
            return 200, {"data": [{"regionid": region, "dnoregion": "Fake DNO",
                                   "shortname": "Fake Region", "data": [{
                                       "from": "2026-12-01T11:00Z", "to": "2026-12-01T11:30Z",
                                       "intensity": {"forecast": self.forecast,
                                                     "index": "moderate"},
                                       "generationmix": [{"fuel": "wind", "perc": 40.0}]}]}]}
        if path == "/price":
            if self.token and headers.get("authorization") not in (None, f"Bearer {self.token}"):
                return 401, {"message": "unauthorized"}
            return 200, self.price
        return 404, {"message": "not found"}

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        split = urlsplit(handler.path)
        headers = {k.lower(): v for k, v in handler.headers.items()}
        with self._lock:
            self.requests.append(Seen(split.path, parse_qs(split.query), headers))
        if self._hang.is_set():
            with self._lock:
                self.requests_held += 1
            self._released.wait(60)
            with self._lock:
                self.requests_held -= 1
        if split.path == "/redirect":
            payload = b""
            handler.send_response(302)
            handler.send_header("Location", "/v3/carbon-intensity/latest?zone=DE")
        elif self.status is not None:
            payload = json.dumps({"error": self.status}).encode()
            handler.send_response(self.status)
            if self.retry_after is not None:
                handler.send_header("Retry-After", self.retry_after)
        elif self.body_override is not None:
            payload = self.body_override
            handler.send_response(200)
        else:
            status, body = self._body(split.path, parse_qs(split.query), headers)
            payload = json.dumps(body).encode()
            handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        try:
            handler.wfile.write(payload)
        except OSError:
            pass  # the client gave up (timeout): nothing to do


@contextmanager
def serve(api: FakeIntensityApi, cert: Path | None = None,
          key: Path | None = None) -> Iterator[str]:
    """Serve ``api``; yields the base URL (https when a certificate is given)."""
    outer = api

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            outer._handle(self)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    scheme = "http"
    if cert is not None:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(cert, key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
        scheme = "https"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"{scheme}://127.0.0.1:{server.server_address[1]}"
    finally:
        api.release()
        server.shutdown()
        server.server_close()
