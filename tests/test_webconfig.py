"""TLS and basic auth on the exporter's HTTP endpoints (exporter-toolkit web config).

Certificates are made at test time with the openssl CLI; servers are the exporter's real
HTTP server on a loopback port; the startup-error tests run the real CLI.
"""

from __future__ import annotations

import base64
import http.client
import re
import socket
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
from deploytools import Certs, make_test_certs
from kwatt.config import ConfigError
from kwatt.web import build_app, start_server
from kwatt.webconfig import (
    BasicAuthChecker,
    WebConfig,
    build_ssl_context,
    load_web_config,
    secure_app,
)
from prometheus_client import CollectorRegistry, Gauge

PASSWORD = "s3cret-scrape"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_test_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture(scope="module")
def password_hash() -> str:
    # Cost 10 is what htpasswd -nBC 10 produces; $2y$ is the prefix htpasswd writes.
    hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=10)).decode()
    return "$2y$" + hashed[4:]


def _write(tmp: Path, text: str, name: str = "web-config.yml") -> Path:
    path = tmp / name
    path.write_text(textwrap.dedent(text))
    return path


def _registry() -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    Gauge("kwatt_test_marker", "present so a scrape has content", registry=registry).set(1)
    return registry


@dataclass
class Served:
    port: int


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[Any] = []

    def start(config: WebConfig, checker: BasicAuthChecker | None = None) -> Served:
        app = secure_app(build_app(_registry(), lambda: (True, "ok")), config, checker)
        context = build_ssl_context(config.tls) if config.tls else None
        server, _ = start_server(app, "127.0.0.1", 0, ssl_context=context)
        servers.append(server)
        return Served(server.server_address[1])

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def _client_context(certs: Certs, with_client_cert: bool = False) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=str(certs.ca))
    if with_client_cert:
        context.load_cert_chain(str(certs.client_cert), str(certs.client_key))
    return context


def _get(port: int, path: str, *, context: ssl.SSLContext | None = None,
         auth: tuple[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=10)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {}
    if auth is not None:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- TLS + auth


def test_tls_handshake_and_basic_auth(tmp_path: Path, certs: Certs, password_hash: str,
                                      serve: Any) -> None:
    config = load_web_config(str(_write(tmp_path, f"""\
        tls_server_config:
          cert_file: {certs.cert}
          key_file: {certs.key}
        http_server_config:
          headers:
            X-Content-Type-Options: nosniff
        basic_auth_users:
          prometheus: '{password_hash}'
        """)))
    served = serve(config)
    context = _client_context(certs)

    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        peer = tls.getpeercert()
        assert peer is not None and ("commonName", "kwatt") in peer["subject"][0]

    status, headers, body = _get(served.port, "/metrics", context=context)
    assert status == 401
    assert headers["WWW-Authenticate"].startswith('Basic realm="kwatt"')
    assert b"kwatt_test_marker" not in body

    status, _, body = _get(served.port, "/metrics", context=context,
                           auth=("prometheus", "wrong"))
    assert status == 401 and b"kwatt_test_marker" not in body
    status, _, _ = _get(served.port, "/metrics", context=context, auth=("nobody", PASSWORD))
    assert status == 401

    status, headers, body = _get(served.port, "/metrics", context=context,
                                 auth=("prometheus", PASSWORD))
    assert status == 200
    assert b"kwatt_test_marker 1.0" in body
    assert headers["X-Content-Type-Options"] == "nosniff"

    # kubelet probes send no credentials: /healthz must answer without them.
    status, _, body = _get(served.port, "/healthz", context=context)
    assert (status, body) == (200, b"ok\n")
    status, _, _ = _get(served.port, "/", context=context)
    assert status == 401


def test_client_that_speaks_plain_http_or_stalls_does_not_block_others(
        tmp_path: Path, certs: Certs, serve: Any) -> None:
    config = load_web_config(str(_write(tmp_path, f"""\
        tls_server_config:
          cert_file: {certs.cert}
          key_file: {certs.key}
        """)))
    served = serve(config)
    # A scrape configured with http:// against the TLS port: refused, server survives.
    with pytest.raises((http.client.HTTPException, ConnectionError)):
        _get(served.port, "/metrics")
    # A client that connects and never starts the handshake holds only its own thread.
    with socket.create_connection(("127.0.0.1", served.port), timeout=10):
        started = time.monotonic()
        status, _, _ = _get(served.port, "/metrics", context=_client_context(certs))
        assert status == 200
        assert time.monotonic() - started < 5


def test_client_certificates_are_required_and_verified(tmp_path: Path, certs: Certs,
                                                       serve: Any) -> None:
    config = load_web_config(str(_write(tmp_path, f"""\
        tls_server_config:
          cert_file: {certs.cert}
          key_file: {certs.key}
          client_ca_file: {certs.ca}
        """)))
    assert config.tls is not None
    assert config.tls.client_auth_type == "RequireAndVerifyClientCert"  # toolkit default
    served = serve(config)

    status, _, _ = _get(served.port, "/metrics", context=_client_context(certs, True))
    assert status == 200
    with pytest.raises((ssl.SSLError, ConnectionError)):
        # TLS 1.3 reports the missing certificate on the first read, not in the handshake.
        _get(served.port, "/metrics", context=_client_context(certs, False))


def test_basic_auth_without_tls(tmp_path: Path, password_hash: str, serve: Any) -> None:
    config = load_web_config(str(_write(tmp_path, f"""\
        basic_auth_users:
          prometheus: {password_hash}
        """)))
    served = serve(config)
    assert _get(served.port, "/metrics")[0] == 401
    assert _get(served.port, "/metrics", auth=("prometheus", PASSWORD))[0] == 200


def test_bcrypt_verdicts_are_cached_per_credential(password_hash: str) -> None:
    calls: list[bytes] = []

    def counting_checkpw(password: bytes, hashed: bytes) -> bool:
        calls.append(password)
        return bcrypt.checkpw(password, hashed)

    checker = BasicAuthChecker({"prometheus": password_hash}, cache_size=2,
                               checkpw=counting_checkpw)
    for _ in range(5):
        assert checker.check(b"prometheus", PASSWORD.encode())
    assert len(calls) == 1
    assert not checker.check(b"prometheus", b"wrong")
    assert not checker.check(b"prometheus", b"x" * 100)  # over bcrypt's 72-byte limit
    assert not checker.check(b"prometheus", b"wrong")  # a failure is cached too
    assert len(calls) == 3
    for guess in range(5):  # failed guesses fill their own cache, never evict a verified one
        assert not checker.check(b"prometheus", f"guess-{guess}".encode())
    assert checker.check(b"prometheus", PASSWORD.encode())
    assert len(calls) == 8
    assert not checker.check(b"eve", PASSWORD.encode())  # unknown user: decoy hash, still False


# --------------------------------------------------------------------------- bad config


@pytest.mark.parametrize(("text", "message"), [
    ("tls_server_config:\n  cert_file: {cert}\n", r"tls_server_config\.key_file: required"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {missing}\n",
     r"tls_server_config\.key_file: no such file .*missing\.key"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS14\n",
     r"tls_server_config\.min_version: must be one of TLS10, TLS11, TLS12, TLS13"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  min_version: TLS13\n"
     "  max_version: TLS12\n", r"min_version: TLS13 is above max_version TLS12"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAndVerifyClientCert\n",
     r"client_ca_file: required when client_auth_type is RequireAndVerifyClientCert"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n"
     "  client_auth_type: RequireAnyClientCert\n", r"unverified certificates"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {cert}\n",
     r"tls_server_config: cannot load cert_file"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  cipher_suites: [x]\n",
     r"tls_server_config\.cipher_suites: not supported"),
    ("tls_server_config:\n  cert_file: {cert}\n  key_file: {key}\n  certfile: x\n",
     r"unknown key 'tls_server_config\.certfile'"),
    ("basic_auth_users:\n  prometheus: plaintext-password\n",
     r"basic_auth_users\.prometheus: not a bcrypt hash"),
    ("basic_auth_users:\n  prometheus: '$2y$99$" + "a" * 53 + "'\n",
     r"basic_auth_users\.prometheus: bcrypt cost 99 is above the maximum of 14"),
    ("basic_auth_users:\n  prometheus: '$2y$10$" + "a" * 53 + "'\n",
     r"basic_auth_users\.prometheus: invalid bcrypt hash"),
    ("basic_auth_user:\n  prometheus: x\n", r"unknown key 'basic_auth_user'"),
    ("rate_limit:\n  interval: 1s\n", r"rate_limit: not supported"),
    ("http_server_config:\n  headers:\n    Server: kwatt\n", r"unknown header 'Server'"),
    ("- a list\n", r"expected a mapping"),
    ("tls_server_config: [\n", r"web-config\.yml: line \d+:"),
])
def test_bad_web_config_is_a_config_error_naming_the_problem(
        tmp_path: Path, certs: Certs, text: str, message: str) -> None:
    path = _write(tmp_path, text.format(cert=certs.cert, key=certs.key,
                                        missing=tmp_path / "missing.key"))
    with pytest.raises(ConfigError, match=message) as raised:
        load_web_config(str(path))
    assert "\n" not in str(raised.value)


def _cli(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "kwatt", "--kubernetes=off", "--gpu=off",
         "--web.listen-address=127.0.0.1:0", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
@pytest.mark.parametrize(("text", "message"), [
    ("tls_server_config:\n  cert_file: /nonexistent/tls.crt\n  key_file: /nonexistent/k\n",
     "kwatt-exporter: {path}: tls_server_config.cert_file: no such file /nonexistent/tls.crt"),
    ("basic_auth_users:\n  prometheus: hunter2\n",
     "kwatt-exporter: {path}: basic_auth_users.prometheus: not a bcrypt hash"),
])
def test_cli_exits_2_with_one_line_on_a_bad_web_config(tmp_path: Path, text: str,
                                                       message: str) -> None:
    path = _write(tmp_path, text)
    proc = _cli(f"--web.config.file={path}", f"--path.procfs={tmp_path}",
                f"--path.sysfs={tmp_path}")
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(message.format(path=path))


@pytest.mark.slow
def test_cli_serves_metrics_over_tls_with_basic_auth(tmp_path: Path, certs: Certs,
                                                     password_hash: str) -> None:
    path = _write(tmp_path, f"""\
        tls_server_config:
          cert_file: {certs.cert}
          key_file: {certs.key}
        basic_auth_users:
          prometheus: '{password_hash}'
        """)
    (tmp_path / "proc").mkdir()
    (tmp_path / "sys").mkdir()
    proc = _cli(f"--web.config.file={path}", f"--path.procfs={tmp_path / 'proc'}",
                f"--path.sysfs={tmp_path / 'sys'}", "--interval=1s")
    lines: list[str] = []
    port_found = threading.Event()

    def read_stderr() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if "kwatt exporter started" in line:
                port_found.set()

    reader = threading.Thread(target=read_stderr, daemon=True)
    reader.start()
    try:
        assert port_found.wait(60), "".join(lines)
        started = next(line for line in lines if "kwatt exporter started" in line)
        assert "tls=True" in started and "basic_auth=True" in started
        match = re.search(r"listen=127\.0\.0\.1:(\d+)", started)
        assert match, started
        port = int(match.group(1))
        context = _client_context(certs)
        assert _get(port, "/metrics", context=context)[0] == 401
        status, _, body = _get(port, "/metrics", context=context,
                               auth=("prometheus", PASSWORD))
        assert status == 200
        assert b"kwatt_build_info" in body
    finally:
        proc.terminate()
        proc.wait(timeout=30)
