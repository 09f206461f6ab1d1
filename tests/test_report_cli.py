"""``kwatt report`` as a user runs it: the real CLI against a fake Prometheus HTTP API
(tests only), over HTTPS with a CA made now, with bearer and basic auth from files, and
each failure a user meets: a wrong token, no CA, nothing listening, a refused query, bad
arguments. Numbers against a real Prometheus: tests/test_carbon_prometheus.py."""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, ClassVar

import pytest
from deploytools import Certs, make_test_certs

TOKEN = "s3cret-token"
# (metric name in the expression, result rows) for namespace ml: 1 kWh, 400 g operational,
# 50 g embodied, 0.25 EUR, 7.2 MJ of token serving for 2.4 M tokens (3 J/token).
RESULTS = (
    ("increase(kwatt_namespace_energy_joules_total", {"namespace": "ml"}, 3.6e6),
    ("namespace:kwatt_carbon_grams_per_second", {"namespace": "ml"}, 400.0),
    ("namespace:kwatt_embodied_grams_per_second", {"namespace": "ml"}, 50.0),
    ("namespace:kwatt_cost_per_second", {"namespace": "ml", "currency": "EUR"}, 0.25),
    ("namespace:kwatt_serving_power_watts", {"namespace": "ml"}, 7.2e6),
    ("namespace:kwatt_generated_tokens", {"namespace": "ml"}, 2.4e6),
)


class FakePrometheus(BaseHTTPRequestHandler):
    rules_loaded = True
    refuse = False
    auth = f"Bearer {TOKEN}"
    queries: ClassVar[list[str]] = []

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _send(self, code: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        if self.headers.get("Authorization") != self.auth:
            self._send(401, {"status": "error", "error": "unauthorized"})
            return
        url = urllib.parse.urlsplit(self.path)
        params = dict(urllib.parse.parse_qsl(url.query))
        if url.path == "/api/v1/rules":
            names = ["namespace:kwatt_carbon_grams_per_second:rate5m"] \
                if self.rules_loaded else ["up:other"]
            self._send(200, {"status": "success", "data": {"groups": [
                {"name": "g", "rules": [{"name": n, "type": "recording"} for n in names]}]}})
        elif url.path == "/api/v1/query":
            expr = params["query"]
            type(self).queries.append(expr)
            if self.refuse and "kwatt_generated_tokens" in expr:
                self._send(400, {"status": "error", "errorType": "bad_data",
                                 "error": "query processing would load too many samples"})
                return
            result = [{"metric": labels, "value": [float(params["time"]), str(value)]}
                      for needle, labels, value in RESULTS if needle in expr]
            self._send(200, {"status": "success",
                             "data": {"resultType": "vector", "result": result}})
        else:
            self._send(404, {"status": "error", "error": "not found"})


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_test_certs(tmp_path_factory.mktemp("certs"))


@pytest.fixture
def server(certs: Certs) -> Iterator[str]:
    FakePrometheus.rules_loaded, FakePrometheus.auth = True, f"Bearer {TOKEN}"
    FakePrometheus.refuse = False
    FakePrometheus.queries = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), FakePrometheus)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(certs.cert, certs.key)
    httpd.socket = context.wrap_socket(httpd.socket, server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kwatt", "report", *args],
                          capture_output=True, text=True, timeout=60)


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    return path


def test_json_table_and_csv_over_https_with_a_bearer_token(
        server: str, certs: Certs, token_file: Path) -> None:
    common = ("--prometheus.url", server, "--tls.ca-file", str(certs.ca),
              "--bearer-token-file", str(token_file), "--end", "2026-12-01T00:00:00Z")
    done = run(*common, "--format", "json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert (report["start"], report["end"]) == ("2026-11-30T00:00:00Z", "2026-12-01T00:00:00Z")
    assert report["rows"] == [{"namespace": "ml", "kwh": 1.0, "operational_gco2e": 400.0,
                               "embodied_gco2e": 50.0, "cost_EUR": 0.25,
                               "joules_per_token": 3.0}]
    # A day: every integral reads 1440 whole minutes (1 ms short of 86 400 s).
    assert any("[86399999ms:60s]" in q for q in FakePrometheus.queries)
    table = run(*common).stdout.splitlines()
    assert table[1].split() == ["namespace", "kWh", "operational", "gCO2e", "embodied",
                                "gCO2e", "cost", "EUR", "J/token"]
    assert table[2].split() == ["ml", "1.0000", "400.00", "50.00", "0.2500", "3.000"]
    csv = run(*common, "--format", "csv").stdout.splitlines()
    assert csv == ["namespace,kwh,operational_gco2e,embodied_gco2e,cost_EUR,joules_per_token",
                   "ml,1.0,400.0,50.0,0.25,3.0"]


def test_basic_auth_from_a_file(server: str, certs: Certs, tmp_path: Path) -> None:
    FakePrometheus.auth = "Basic " + base64.b64encode(b"alice:pa:ss").decode()
    password = tmp_path / "password"
    password.write_text("pa:ss\n")
    done = run("--prometheus.url", server, "--tls.ca-file", str(certs.ca),
               "--basic-auth.username", "alice", "--basic-auth.password-file", str(password))
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(("extra", "needle"), [
    (("--bearer-token-file", "WRONG"), "401 Unauthorized"),
    ((), "401 Unauthorized"),
])
def test_wrong_or_missing_credentials(server: str, certs: Certs, tmp_path: Path,
                                      extra: tuple[str, ...], needle: str) -> None:
    if extra:
        wrong = tmp_path / "wrong"
        wrong.write_text("nope")
        extra = (extra[0], str(wrong))
    done = run("--prometheus.url", server, "--tls.ca-file", str(certs.ca), *extra)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and needle in done.stderr
    assert "--bearer-token-file" in done.stderr  # the hint


def test_an_unknown_ca_is_refused(server: str, token_file: Path) -> None:
    done = run("--prometheus.url", server, "--bearer-token-file", str(token_file))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "CERTIFICATE_VERIFY_FAILED" in done.stderr


def test_rules_not_loaded(server: str, certs: Certs, token_file: Path) -> None:
    FakePrometheus.rules_loaded = False
    done = run("--prometheus.url", server, "--tls.ca-file", str(certs.ca),
               "--bearer-token-file", str(token_file))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "rules are not loaded" in done.stderr


def test_a_refused_query(server: str, certs: Certs, token_file: Path) -> None:
    FakePrometheus.refuse = True
    done = run("--prometheus.url", server, "--tls.ca-file", str(certs.ca),
               "--bearer-token-file", str(token_file))
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "400 Bad Request" in done.stderr
    assert "too many samples" in done.stderr  # Prometheus' own reason


def test_nothing_listening() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    done = run("--prometheus.url", f"http://127.0.0.1:{port}")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1 and "cannot reach Prometheus" in done.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (("--period", "30s"), "at least 1m"),
    (("--period", "a day"), "not a duration"),
    (("--end", "yesterday"), "RFC 3339"),
    (("--by", "pod"), "invalid choice"),
    (("--bearer-token-file", "/nonexistent/token"), "--bearer-token-file"),
    (("--basic-auth.username", "alice"), "--basic-auth.password-file"),
])
def test_bad_arguments_exit_2_with_one_line(args: tuple[str, ...], needle: str) -> None:
    done = run("--prometheus.url", "http://127.0.0.1:9", *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and needle in done.stderr, done.stderr
