"""Hostile and overloaded HTTP clients against the real exporter (issue 12, items 4 and 5).

Slow (slowloris) connections, more connections than the cap, basic-auth brute force and
username probing, clients that reset mid-request, and a web config whose bcrypt cost
would hang the start. Each case runs the real CLI or the real ``Exporter``; nothing here
depends on how fast this machine is: counts of threads, connections and bcrypt calls are
compared, not durations.
"""

from __future__ import annotations

import base64
import http.client
import re
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import bcrypt
import pytest
from conftest import node_config
from deploytools import Certs, make_test_certs
from exporter_process import ExporterProcess
from kwatt.config import ConfigError
from kwatt.exporter import Exporter
from kwatt.web import ServerLimits
from kwatt.webconfig import BasicAuthChecker, WebConfig, build_ssl_context, load_web_config
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from simnode import SimulatedNode

PASSWORD = "s3cret-scrape"


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    return make_test_certs(tmp_path_factory.mktemp("certs"))


def _hash(password: str, cost: int) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=cost)).decode()


def _node(tmp_path: Path) -> SimulatedNode:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    return node


def _web_config(tmp_path: Path, certs: Certs | None, users: dict[str, str]) -> Path:
    text = ""
    if certs is not None:
        text += f"tls_server_config:\n  cert_file: {certs.cert}\n  key_file: {certs.key}\n"
    if users:
        text += "basic_auth_users:\n" + "".join(f"  {u}: '{h}'\n" for u, h in users.items())
    path = tmp_path / "web-config.yml"
    path.write_text(text)
    return path


def _threads(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"^Threads:\s+(\d+)", status, re.M)
    assert match
    return int(match.group(1))


def _tls_client(certs: Certs) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca))


def _get(port: int, path: str, context: ssl.SSLContext | None = None,
         auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    conn: http.client.HTTPConnection
    if context is not None:
        conn = http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=20)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(
            f"{auth[0]}:{auth[1]}".encode()).decode()
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


# --------------------------------------------------------------------------- item 4: cost


@pytest.mark.slow
def test_bcrypt_cost_above_the_maximum_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # A cost of 31 is 2^31 rounds: checking it once at start-up would take days.
    hashed = "$2y$31$" + _hash("x", 4)[7:]
    config = tmp_path / "web.yml"
    config.write_text(f"basic_auth_users:\n  prometheus: '{hashed}'\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "kwatt", "--kubernetes=off", "--gpu=off",
         "--web.listen-address=127.0.0.1:0", f"--web.config.file={config}",
         f"--path.procfs={tmp_path}", f"--path.sysfs={tmp_path}"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("a bcrypt cost of 31 hangs the start")
    assert proc.returncode == 2
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"kwatt-exporter: {config}: basic_auth_users.prometheus: "
                               "bcrypt cost 31 is above the maximum of 14"), err


# --------------------------------------------------------------------------- slowloris


def _slow_tls_connection(port: int, context: ssl.SSLContext) -> ssl.SSLSocket:
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
    tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: kwatt\r\n")  # and never the blank line
    return tls


@pytest.mark.slow
def test_slow_connections_hold_no_thread_and_are_closed_at_the_head_deadline(
        tmp_path: Path, certs: Certs) -> None:
    web = _web_config(tmp_path, certs, {"prometheus": _hash(PASSWORD, 4)})
    exporter = ExporterProcess(_node(tmp_path), f"--web.config.file={web}")
    context = _tls_client(certs)
    slow: list[ssl.SSLSocket] = []
    try:
        threads_before = _threads(exporter.proc.pid)
        slow = [_slow_tls_connection(exporter.port, context) for _ in range(300)]
        # The old server held one thread (and ~71 KiB) per connection.
        assert _threads(exporter.proc.pid) < threads_before + 10
        status, body = _get(exporter.port, "/metrics", context, ("prometheus", PASSWORD))
        assert status == 200 and b"kwatt_build_info" in body

        # A client that trickles one header line a second is still cut off: the request
        # head has a total deadline (10 s), not a per-read timeout.
        trickler = _slow_tls_connection(exporter.port, context)
        trickler.settimeout(1.0)
        started = time.monotonic()
        closed = False
        while time.monotonic() - started < 40 and not closed:
            try:
                trickler.sendall(b"X-Slow: 1\r\n")
                if trickler.recv(1) == b"":
                    closed = True
            except TimeoutError:
                continue
            except (OSError, ssl.SSLError):
                closed = True
        trickler.close()
        assert closed, "a trickling client was never disconnected"
        assert time.monotonic() - started >= 9  # not before its deadline
    finally:
        for sock in slow:
            sock.close()
        log = exporter.stop()
    assert "Traceback" not in log


class _ServedExporter:
    def __init__(self, tmp_path: Path, web: WebConfig, limits: ServerLimits) -> None:
        self.exporter = Exporter(node_config(_node(tmp_path), "--web.listen-address",
                                             "127.0.0.1:0"), web,
                                 build_ssl_context(web.tls) if web.tls else None,
                                 server_limits=limits)
        self.server = self.exporter.serve()
        self.port = int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., _ServedExporter]]:
    started: list[_ServedExporter] = []

    def start(web: WebConfig | None = None,
              limits: ServerLimits | None = None) -> _ServedExporter:
        served = _ServedExporter(tmp_path, web or WebConfig(), limits or ServerLimits())
        started.append(served)
        return served

    yield start
    for one in started:
        one.close()


def _open_count(socks: list[socket.socket]) -> int:
    """How many of these client sockets the server has not closed."""
    still_open = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            if sock.recv(1) != b"":
                still_open += 1
        except BlockingIOError:
            still_open += 1
        except OSError:
            pass
    return still_open


def test_connections_over_the_cap_evict_the_oldest_unfinished_one(
        served: Callable[..., _ServedExporter]) -> None:
    server = served(limits=ServerLimits(max_connections=16))
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=10)
            for _ in range(40)]
    try:
        # A real scrape still gets through: it displaces the oldest idle connection.
        status, body = _get(server.port, "/metrics")
        assert status == 200
        dropped = re.search(
            rb'^kwatt_http_connections_dropped_total\{node="sim",reason="limit"\} (\S+)$',
            body, re.M)
        assert dropped and float(dropped.group(1)) >= 40 + 1 - 16
        deadline = time.monotonic() + 10
        while _open_count(idle) > 16 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _open_count(idle) <= 16
    finally:
        for sock in idle:
            sock.close()


def test_oversized_and_malformed_request_heads_are_refused(
        served: Callable[..., _ServedExporter]) -> None:
    server = served(limits=ServerLimits(max_head_bytes=4096))
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\n" + b"X-Pad: " + b"a" * 8000 + b"\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 431 ")
    with socket.create_connection(("127.0.0.1", server.port), timeout=10) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        assert sock.recv(100).startswith(b"HTTP/1.1 400 ")
    assert _get(server.port, "/healthz")[0] in (200, 503)
    status, body = _get(server.port, "/metrics")
    assert status == 200
    assert re.search(
        rb'kwatt_http_connections_dropped_total\{node="sim",reason="head_too_large"\} 1', body)


class _SlowCountingCollector(Collector):
    """Stands for a render that takes a while (~1,000 series take ~10 ms of CPU)."""

    def __init__(self) -> None:
        self.collects = 0

    def collect(self) -> Iterator[Metric]:
        self.collects += 1
        time.sleep(0.3)
        yield GaugeMetricFamily("kwatt_test_slow", "a slow collector", value=1)


def test_concurrent_scrapes_share_one_render(served: Callable[..., _ServedExporter]) -> None:
    server = served()
    slow = _SlowCountingCollector()
    server.exporter.registry.register(slow)
    results: list[int] = []
    scrapers = [threading.Thread(target=lambda: results.append(
        _get(server.port, "/metrics")[0])) for _ in range(24)]
    for scraper in scrapers:
        scraper.start()
    for scraper in scrapers:
        scraper.join(60)
    assert results == [200] * 24
    # One render per scrape queued 24 renders (7 s here, minutes with 50 real scrapers).
    assert slow.collects <= 12, slow.collects


# --------------------------------------------------------------------------- basic auth


def _cost(hashed: bytes) -> int:
    return int(hashed.split(b"$")[2])


def test_unknown_user_costs_one_bcrypt_at_the_known_users_cost() -> None:
    calls: list[int] = []

    def recording_checkpw(password: bytes, hashed: bytes) -> bool:
        calls.append(_cost(hashed))
        return bcrypt.checkpw(password, hashed)

    checker = BasicAuthChecker({"prometheus": _hash(PASSWORD, 6)}, checkpw=recording_checkpw)
    assert not checker.check(b"prometheus", b"wrong-1")
    assert not checker.check(b"mallory", b"wrong-2")
    # Same number of bcrypt rounds either way: the time to answer does not tell an
    # attacker which user names exist.
    assert calls == [6, 6]


def test_failed_checks_run_one_bcrypt_at_a_time_and_never_delay_verified_scrapes() -> None:
    running = 0
    most = 0
    lock = threading.Lock()
    gate = threading.Event()

    def gated_checkpw(password: bytes, hashed: bytes) -> bool:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        try:
            if password != PASSWORD.encode():
                gate.wait(10)  # a brute-force guess that takes its time
            return bcrypt.checkpw(password, hashed)
        finally:
            with lock:
                running -= 1

    checker = BasicAuthChecker({"prometheus": _hash(PASSWORD, 4)}, checkpw=gated_checkpw)
    assert checker.check(b"prometheus", PASSWORD.encode())  # verified once, now cached
    verdicts: list[bool] = []
    guessers = [threading.Thread(target=lambda i=i: verdicts.append(
        checker.check(b"prometheus", f"guess-{i}".encode()))) for i in range(8)]
    for guesser in guessers:
        guesser.start()
    time.sleep(0.3)  # let the guessers queue up behind the gate
    assert checker.check(b"prometheus", PASSWORD.encode())  # answered from the cache
    gate.set()
    for guesser in guessers:
        guesser.join(20)
    assert verdicts == [False] * 8
    assert most == 1


def test_a_failed_check_is_followed_by_a_pause_as_long_as_the_check() -> None:
    now = [0.0]
    pauses: list[float] = []

    def slow_checkpw(password: bytes, hashed: bytes) -> bool:
        now[0] += 0.25  # what bcrypt costs on this (fake) clock
        return bcrypt.checkpw(password, hashed)

    checker = BasicAuthChecker({"prometheus": _hash(PASSWORD, 4)}, checkpw=slow_checkpw,
                               pause=pauses.append, clock=lambda: now[0])
    assert not checker.check(b"prometheus", b"wrong")
    assert not checker.check(b"nobody", b"wrong")
    assert checker.check(b"prometheus", PASSWORD.encode())
    # Failures leave the CPU idle as long as they used it: at most half a core; a
    # successful check is not slowed down.
    assert pauses == [0.25, 0.25]


# --------------------------------------------------------------------------- resets


def _reset_after_request(port: int, context: ssl.SSLContext) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    try:
        tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
        token = base64.b64encode(f"prometheus:wrong-{time.monotonic_ns()}".encode())
        tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: kwatt\r\nAuthorization: Basic "
                    + token + b"\r\n\r\n")
        # SO_LINGER 0: close() sends a TCP reset instead of a FIN.
        tls.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        tls.close()
    finally:
        raw.close()


def _reset_mid_handshake(port: int) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    raw.sendall(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40)
    raw.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    raw.close()


@pytest.mark.slow
def test_clients_that_reset_leave_no_traceback_in_the_log(tmp_path: Path,
                                                           certs: Certs) -> None:
    web = _web_config(tmp_path, certs, {"prometheus": _hash(PASSWORD, 4)})
    exporter = ExporterProcess(_node(tmp_path), f"--web.config.file={web}")
    context = _tls_client(certs)
    try:
        workers = [threading.Thread(target=_reset_after_request, args=(exporter.port, context))
                   for _ in range(100)]
        workers += [threading.Thread(target=_reset_mid_handshake, args=(exporter.port,))
                    for _ in range(50)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(30)
        status, _ = _get(exporter.port, "/metrics", context, ("prometheus", PASSWORD))
        assert status == 200
        time.sleep(1.0)  # let the server finish writing to the reset sockets
    finally:
        log = exporter.stop()
    assert "Traceback" not in log
    web_lines = [line for line in log.splitlines() if "logger=kwatt.web" in line]
    assert len(web_lines) <= 10, "\n".join(web_lines)
    assert all(line.startswith("ts=") for line in log.splitlines() if line), log


def test_a_cost_just_above_the_maximum_is_rejected_before_any_bcrypt(tmp_path: Path) -> None:
    path = tmp_path / "web.yml"
    path.write_text(f"basic_auth_users:\n  p: '$2y$15${_hash('x', 4)[7:]}'\n")
    with pytest.raises(ConfigError, match=r"basic_auth_users\.p: bcrypt cost 15 is above"):
        load_web_config(str(path))
