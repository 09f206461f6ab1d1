"""Redfish BMCs for tests: DMTF-style mockups over HTTPS on loopback.

- ``make_pki``: a CA and a server certificate for 127.0.0.1 made with the ``openssl`` CLI.
- ``SushyStatic``: sushy-tools' ``sushy-static`` serving a mockup directory over TLS, as a
  real subprocess. It serves files as they are on disk at each request, so a test moves
  the meter by rewriting a reading. It does not check credentials.
- ``FaultyBmc``: a small HTTPS server of our own that serves the same mockup layout with
  basic auth, and on demand answers 401, 500, malformed JSON, or hangs until released;
  ``stop``/``start`` make it vanish and come back on the same port.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from conftest import REPO

MOCKUPS = REPO / "tests" / "fixtures" / "redfish"
USERNAME = "kwatt"
PASSWORD = "s3cret:with colon"


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path
    other_ca: Path  # a CA that did not sign the server certificate


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def make_pki(directory: Path) -> Pki:
    directory.mkdir(parents=True, exist_ok=True)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    for name in ("ca", "other-ca"):
        _openssl("req", "-x509", *ec, "-keyout", f"{name}.key", "-out", f"{name}.crt",
                 "-subj", f"/CN=kwatt test {name}", "-days", "2", cwd=directory)
    _openssl("req", *ec, "-keyout", "bmc.key", "-out", "bmc.csr", "-subj", "/CN=127.0.0.1",
             cwd=directory)
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "bmc.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "bmc.crt", "-days", "2", "-extfile", "san.ext",
             cwd=directory)
    return Pki(directory / "ca.crt", directory / "bmc.crt", directory / "bmc.key",
               directory / "other-ca.crt")


def copy_mockup(name: str, target: Path) -> Path:
    """A writable copy of a mockup, so a test can change readings."""
    shutil.copytree(MOCKUPS / name, target)
    return target


def set_reading(mockup: Path, resource: str, prop: str, value: float) -> None:
    """Set ``<resource>.<prop>.Reading`` (an excerpt) or ``<resource>.<prop>`` (a plain
    property, written ``PowerControl.0.PowerConsumedWatts``) in the mockup on disk."""
    path = mockup / resource / "index.json"
    data = json.loads(path.read_text())
    node: Any = data
    parts = prop.split(".")
    for part in parts[:-1]:
        node = node[int(part)] if part.isdigit() else node[part]
    if isinstance(node.get(parts[-1]), dict):
        node[parts[-1]]["Reading"] = value
    else:
        node[parts[-1]] = value
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    tmp.replace(path)  # atomic: a request never sees half a file


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def wait_for_tls(port: int, ca: Path, within: float = 30.0) -> None:
    """Until the server completes a TLS handshake (a bound on a hang, not a timing)."""
    context = ssl.create_default_context(cafile=str(ca))
    deadline = time.monotonic() + within
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=2) as raw, \
                    context.wrap_socket(raw, server_hostname="127.0.0.1"):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class SushyStatic:
    """``sushy-static -m MOCKUP -c CERT -k KEY`` on a loopback port."""

    def __init__(self, mockup: Path, pki: Pki) -> None:
        self.port = free_port()
        exe = Path(sys.executable).with_name("sushy-static")
        self.process = subprocess.Popen(
            [str(exe), "-i", "127.0.0.1", "-p", str(self.port), "-m", str(mockup),
             "-c", str(pki.cert), "-k", str(pki.key)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_for_tls(self.port, pki.ca)
        except OSError:
            self.close()
            raise

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class FaultyBmc:
    """An HTTPS Redfish mockup server whose replies a test switches (``mode``).

    Modes: ``ok``; ``401``; ``500``; ``malformed`` (a 200 with broken JSON); ``hang``
    (the handler signals ``entered`` and waits for ``release``). ``delay_seconds`` slows
    every reply (benchmarks/bench_redfish.py). Requests are counted.
    """

    def __init__(self, mockup: Path, pki: Pki) -> None:
        self.mockup = mockup
        self.pki = pki
        self.port = free_port()
        self.mode = "ok"
        self.delay_seconds = 0.0  # every reply waits this long (a slow BMC)
        self.entered = threading.Event()
        self.release = threading.Event()
        self.requests = 0
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.start()

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def start(self) -> None:
        bmc = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                bmc.requests += 1
                if bmc.delay_seconds:
                    time.sleep(bmc.delay_seconds)
                mode = bmc.mode
                if mode == "hang":
                    bmc.entered.set()
                    bmc.release.wait(60)
                    mode = "ok"
                expected = base64.b64encode(f"{USERNAME}:{PASSWORD}".encode()).decode()
                if mode == "401" or self.headers.get("Authorization") != f"Basic {expected}":
                    self._send(401, b'{"error": {"code": "Base.1.0.NoValidSession"}}')
                    return
                if mode == "500":
                    self._send(500, b'{"error": {"code": "Base.1.0.InternalError"}}')
                    return
                if mode == "malformed":
                    self._send(200, b'{"PowerWatts": {"Reading": 37')
                    return
                relative = self.path.split("?")[0].rstrip("/").removeprefix("/redfish/v1")
                path = bmc.mockup / relative.lstrip("/") / "index.json"
                if ".." in relative or not path.is_file():
                    self._send(404, b'{"error": {"code": "Base.1.0.ResourceMissingAtURI"}}')
                    return
                self._send(200, path.read_bytes())

        server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        server.daemon_threads = True
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(str(self.pki.cert), str(self.pki.key))
        server.socket = context.wrap_socket(server.socket, server_side=True)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """The BMC vanishes: the port refuses connections until ``start``."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def close(self) -> None:
        self.release.set()
        self.stop()
