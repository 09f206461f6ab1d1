"""A misbehaving Kubernetes API: 500s, a burst of reconnects, a request that hangs, a
refused connection, a proxy that ignores the fieldSelector, and strings that are not valid
Unicode.

The exporter cases run the real CLI (``python -m kwatt``) against the fake API server
(tests/fake_kube_api.py) through a kubeconfig, with the watcher's production settings, and
read what a user reads: /metrics. The gate case drives the real watcher thread with a
shorter attempt window, as tests/test_kubernetes_watch.py does.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import require_tool
from fake_kube_api import FakeKubeApi, make_pod, write_kubeconfig
from kubetest import FAST, NODE, running_watcher, wait_until
from kwatt.workloads.podwatch import WatchSettings
from simnode import SimulatedNode, pod_uid

pytestmark = pytest.mark.slow

_SOURCE_UP = re.compile(r'^kwatt_source_up\{node="[^"]*",source="kubernetes"\} (\S+)$', re.M)
_ERRORS = re.compile(
    r'^kwatt_source_errors_total\{node="[^"]*",reason="(\w+)",source="kubernetes"\} (\S+)$',
    re.M)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningExporter:
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def scrape(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics",
                                    timeout=10) as response:
            assert response.status == 200
            return str(response.read().decode("utf-8"))

    def try_scrape(self) -> str:
        try:
            return self.scrape()
        except OSError:
            return ""

    def source_up(self) -> float | None:
        match = _SOURCE_UP.search(self.try_scrape())
        return float(match.group(1)) if match else None

    def errors(self) -> dict[str, float]:
        return {reason: float(n) for reason, n in _ERRORS.findall(self.try_scrape())}

    def serving(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=10):
                return True
        except urllib.error.HTTPError:
            return True  # answered: 503 before the first cycle
        except OSError:
            return False

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def running_exporter(tmp_path: Path, server: str, *extra: str) -> Iterator[RunningExporter]:
    """The real CLI in Kubernetes mode against ``server``, sampling every 200 ms."""
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server)
    port = _free_port()
    log_path = tmp_path / "exporter.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kwatt", "--kubernetes", "on", "--kubeconfig",
             str(kubeconfig), "--node-name", NODE, "--path.sysfs", str(node.sysfs),
             "--path.procfs", str(node.procfs), "--gpu", "off", "--interval", "200ms",
             "--web.listen-address", f"127.0.0.1:{port}", "--log.level", "debug", *extra],
            env={**os.environ, "PYTHONUNBUFFERED": "1"}, stdout=log,
            stderr=subprocess.STDOUT)
    running = RunningExporter(port, proc, log_path)
    try:
        wait_until(running.serving, timeout=30, what="exporter serving")
        yield running
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _watch_requests(api: FakeKubeApi) -> int:
    return sum(1 for r in api.pod_requests() if r.query.get("watch") == "true")


def _reconnect_burst(api: FakeKubeApi, closes: int) -> None:
    """The server ends the watch ``closes`` times in quick succession (a rolling restart of
    API servers behind a load balancer looks like this); each time wait briefly for the
    watcher to come back, without requiring it."""
    for _ in range(closes):
        before = _watch_requests(api)
        api.close_watches()
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline and _watch_requests(api) == before:
            time.sleep(0.01)


def test_500s_for_ten_seconds_after_a_reconnect_burst_show_as_down(tmp_path: Path) -> None:
    api = FakeKubeApi()
    api.add(make_pod("web-0", uid=pod_uid("web-0")))
    with api.serve() as url, running_exporter(tmp_path, url) as exporter:
        wait_until(lambda: exporter.source_up() == 1.0, timeout=30, what="source up")
        _reconnect_burst(api, 12)
        api.set_failure(500)
        seen: list[float | None] = []
        outage_end = time.monotonic() + 10.0
        while time.monotonic() < outage_end:
            seen.append(exporter.source_up())
            time.sleep(0.25)
        api.set_failure(None)
        assert 0.0 in seen, f"source_up during 10 s of HTTP 500: {seen}"
        assert exporter.errors().get("api", 0.0) >= 1
        wait_until(lambda: exporter.source_up() == 1.0, timeout=60, what="source up again")


def test_a_watch_request_that_hangs_is_down_after_the_grace(tmp_path: Path) -> None:
    """No watch is open while the new watch request waits for headers (the read timeout is
    150 s); the fake gives up after 30 s. source_up must not say 1 all that time."""
    api = FakeKubeApi()
    api.add(make_pod("web-0", uid=pod_uid("web-0")))
    with api.serve() as url, running_exporter(tmp_path, url) as exporter:
        wait_until(lambda: exporter.source_up() == 1.0, timeout=30, what="source up")
        api.set_failure(hang=True)  # ends the open watch; the next request hangs
        wait_until(lambda: exporter.source_up() == 0.0, timeout=25,
                   what="source_up 0 while no watch is open")
        api.set_failure(None)
        wait_until(lambda: exporter.source_up() == 1.0, timeout=60, what="source up again")


def test_the_request_gate_does_not_keep_the_watch_closed(tmp_path: Path) -> None:
    """A burst of normal watch ends used to exhaust the attempt window, after which no
    request went out until the whole window had passed (27 s in the field)."""
    settings = WatchSettings(**{**FAST.__dict__, "max_attempts_per_window": 6,
                                "attempt_window_seconds": 30.0})
    api = FakeKubeApi()
    api.add(make_pod("web-0", uid=pod_uid("web-0")))
    with running_watcher(api, tmp_path, settings=settings) as parts:
        wait_until(lambda: parts.watcher.watches >= 1 and parts.store.current().synced)
        for _ in range(8):
            before = _watch_requests(api)
            api.close_watches()
            # 30 s / 6 attempts: the next request may wait about 5 s, never the window.
            wait_until(lambda before=before: _watch_requests(api) > before, timeout=15,
                       what="the watch reopened")
        api.add(make_pod("web-1", uid=pod_uid("web-1")))
        wait_until(lambda: pod_uid("web-1") in parts.store.current().pods, timeout=15,
                   what="events flow again")


def test_connection_refused_is_counted_as_api_not_timeout(tmp_path: Path) -> None:
    port = _free_port()  # nothing listens there: every connect is refused at once
    with running_exporter(tmp_path, f"http://127.0.0.1:{port}") as exporter:
        wait_until(lambda: exporter.errors().get("api", 0.0) >= 1, timeout=30,
                   what="an api fault")
        errors = exporter.errors()
        assert errors.get("timeout", 0.0) == 0.0, errors
        assert exporter.source_up() == 0.0


def test_an_api_that_ignores_the_field_selector_adds_no_foreign_pods(tmp_path: Path) -> None:
    api = FakeKubeApi()
    api.ignore_field_selector = True
    api.add(make_pod("mine", uid=pod_uid("mine")))
    for index in range(20):
        api.add(make_pod(f"theirs-{index}", uid=pod_uid(f"theirs-{index}"), node="node-b"))
    with api.serve() as url, running_exporter(tmp_path, url) as exporter:
        wait_until(lambda: 'pod="mine"' in exporter.try_scrape(), timeout=30, what="listed")
        # Watch events for other nodes' pods too.
        api.add(make_pod("theirs-late", uid=pod_uid("theirs-late"), node="node-b"))
        api.add(make_pod("mine-late", uid=pod_uid("mine-late")))
        wait_until(lambda: 'pod="mine-late"' in exporter.try_scrape(), timeout=30,
                   what="watched")
        text = exporter.scrape()
    pods = sorted(re.findall(r'^kwatt_pod_info\{.*pod="([^"]+)"', text, re.M))
    assert pods == ["mine", "mine-late"]
    assert "fieldSelector" in exporter.log()  # the operator is told why


def test_a_lone_surrogate_in_api_strings_keeps_the_exposition_valid(tmp_path: Path) -> None:
    """JSON may carry a lone "\\ud800" escape; the label value becomes U+FFFD."""
    api = FakeKubeApi()
    api.add(make_pod("web-0", uid=pod_uid("web-0"), owner=("StatefulSet", "web\ud800"),
                     labels={"team": "check\ud800out"}))
    config = tmp_path / "kwatt.yaml"
    config.write_text("kubernetes:\n  pod_label_allowlist: [team]\n")
    with api.serve() as url, running_exporter(tmp_path, url, "--config",
                                              str(config)) as exporter:
        wait_until(lambda: 'pod="web-0"' in exporter.try_scrape(), timeout=30,
                   what="pod listed and scraped")
        text = exporter.scrape()
    assert 'label_team="check\ufffdout"' in text
    assert 'workload="web\ufffd"' in text
    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=text.encode(),
                           capture_output=True, timeout=30)
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
