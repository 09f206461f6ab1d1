"""HTTP benchmark: the real CLI under load and attack, TLS and basic auth on (issue 12, item 5).

Each scenario starts a fresh ``python -m kwatt`` on a simulated node (110 pods, ~330
containers) and measures from outside: latency of real scrapes from this process, and the
exporter's RSS, threads and CPU from /proc/<pid>/status and /proc/<pid>/stat.

    .venv/bin/python benchmarks/bench_http.py [--seconds 10] [--slow 1000]

Scenarios (loopback only, bounded in count and time):
  scrapers-tls / scrapers-http: 50 concurrent authenticated scrapers, a new connection each.
  slowloris: N TLS connections that finish the handshake and never finish their request
    head, then 20 normal scrapes; RSS, threads, open connections (the server's gauge).
  brute-force: 8 clients sending wrong passwords as fast as they can; the exporter's CPU
    share and a verified scraper's latency meanwhile.

Targets: scrapers p99 < 1 s with no errors; slowloris RSS < 80 MB and a scrape < 200 ms;
brute force at most about one core of bcrypt. The load generator runs on the same
machine, so its CPU competes with the exporter's: figures are upper bounds.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import os
import re
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import bcrypt
from deploytools import Certs, make_test_certs
from exporter_process import ExporterProcess
from simnode import SimulatedNode, container_id, pod_uid

PASSWORD = "bench-scrape"
TICKS = os.sysconf("SC_CLK_TCK")


def proc_status(pid: int) -> tuple[float, int]:
    """(RSS in MB, threads) of the exporter, from /proc/<pid>/status."""
    text = Path(f"/proc/{pid}/status").read_text()
    rss = re.search(r"^VmRSS:\s+(\d+)", text, re.M)
    threads = re.search(r"^Threads:\s+(\d+)", text, re.M)
    assert rss and threads
    return int(rss.group(1)) / 1024, int(threads.group(1))


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


WORKLOADS: list[str] = []


def build_node(root: Path, pods: int, units: int) -> SimulatedNode:
    node = SimulatedNode(root, cgroup_version=2, driver="systemd", vcpus=32)
    node.add_intel_server_zones(sockets=2)
    for i in range(pods):
        pod = node.add_pod(pod_uid(f"bench-{i}"), ("guaranteed", "burstable")[i % 2])
        for j in range(3):
            WORKLOADS.append(node.add_container(pod, container_id(f"b-{i}-{j}")).path)
    for i in range(units):  # host mode exposes systemd units as workloads
        WORKLOADS.append(node.add_unit(f"/system.slice/bench-{i}.service"))
    for path in WORKLOADS:
        node.add_cpu(path, 1.0)
    node.add_node_cpu(busy_seconds=10, idle_seconds=100)
    return node


class Scraper:
    def __init__(self, port: int, context: ssl.SSLContext | None,
                 user: str = "prometheus", password: str = PASSWORD) -> None:
        self.port = port
        self.context = context
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        self.headers = {"Authorization": f"Basic {token}", "Accept-Encoding": "gzip"}

    def scrape(self, path: str = "/metrics") -> tuple[int, float]:
        conn: http.client.HTTPConnection
        if self.context is not None:
            conn = http.client.HTTPSConnection("127.0.0.1", self.port, context=self.context,
                                               timeout=30)
        else:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30)
        started = time.perf_counter()
        try:
            conn.request("GET", path, headers=self.headers)
            response = conn.getresponse()
            response.read()
            return response.status, time.perf_counter() - started
        finally:
            conn.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def run_for(seconds: float, clients: int, work: Callable[[], tuple[int, float]],
            ok_status: int = 200) -> tuple[list[float], int, int]:
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def loop() -> None:
        nonlocal errors
        while time.monotonic() < stop_at:
            try:
                status, latency = work()
                failed = status != ok_status
            except (OSError, http.client.HTTPException):
                failed, latency = True, 0.0
            with lock:
                if failed:
                    errors += 1
                else:
                    latencies.append(latency)

    threads = [threading.Thread(target=loop) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, len(latencies) + errors


def line(name: str, latencies: list[float], errors: int, total: int, pid: int,
         cpu: float, wall: float) -> None:
    rss, threads = proc_status(pid)
    ms = [v * 1000 for v in latencies]
    print(f"{name:<14} requests={total} errors={errors} "
          f"p50={percentile(ms, 0.5):.0f}ms p99={percentile(ms, 0.99):.0f}ms "
          f"max={max(ms, default=float('nan')):.0f}ms rss={rss:.1f}MB threads={threads} "
          f"exporter_cpu={cpu / wall:.2f} cores")


def start(node: SimulatedNode, tmp: Path, certs: Certs | None, hashed: str) -> ExporterProcess:
    web = tmp / ("web-tls.yml" if certs else "web-http.yml")
    text = f"basic_auth_users:\n  prometheus: '{hashed}'\n"
    if certs is not None:
        text += f"tls_server_config:\n  cert_file: {certs.cert}\n  key_file: {certs.key}\n"
    web.write_text(text)
    exporter = ExporterProcess(node, f"--web.config.file={web}", interval="2s",
                               log_path=tmp / f"exporter-{time.monotonic_ns()}.log")
    # Workloads get series once they use CPU between two cycles (wait_for_cycle cannot
    # tell: /metrics needs auth).
    time.sleep(1)
    for path in WORKLOADS:
        node.add_cpu(path, 0.5)
    node.add_node_cpu(busy_seconds=10, idle_seconds=100)
    for zone in ("0", "1", "0:2", "1:2"):
        node.add_energy(zone, 300.0)
    time.sleep(3)
    return exporter


def scrapers(node: SimulatedNode, tmp: Path, certs: Certs | None, hashed: str,
             seconds: float) -> None:
    exporter = start(node, tmp, certs, hashed)
    try:
        context = ssl.create_default_context(cafile=str(certs.ca)) if certs else None
        scraper = Scraper(exporter.port, context)
        series = sum(1 for raw in _body(exporter.port, context).splitlines()
                     if raw and not raw.startswith("#"))
        rss0, threads0 = proc_status(exporter.proc.pid)
        print(f"{'idle':<14} series={series} rss={rss0:.1f}MB threads={threads0}")
        cpu0, wall0 = proc_cpu_seconds(exporter.proc.pid), time.monotonic()
        latencies, errors, total = run_for(seconds, 50, scraper.scrape)
        line("scrapers-tls" if certs else "scrapers-http", latencies, errors, total,
             exporter.proc.pid, proc_cpu_seconds(exporter.proc.pid) - cpu0,
             time.monotonic() - wall0)
    finally:
        exporter.stop()


def _body(port: int, context: ssl.SSLContext | None) -> str:
    scraper = Scraper(port, context)
    scraper.headers.pop("Accept-Encoding")
    conn: http.client.HTTPConnection = (
        http.client.HTTPSConnection("127.0.0.1", port, context=context, timeout=30)
        if context else http.client.HTTPConnection("127.0.0.1", port, timeout=30))
    try:
        conn.request("GET", "/metrics", headers=scraper.headers)
        return conn.getresponse().read().decode()
    finally:
        conn.close()


def slowloris(node: SimulatedNode, tmp: Path, certs: Certs, hashed: str, count: int) -> None:
    exporter = start(node, tmp, certs, hashed)
    context = ssl.create_default_context(cafile=str(certs.ca))
    held: list[ssl.SSLSocket] = []
    lock = threading.Lock()
    try:
        rss0, threads0 = proc_status(exporter.proc.pid)

        def open_some(n: int) -> None:
            for _ in range(n):
                try:
                    raw = socket.create_connection(("127.0.0.1", exporter.port), timeout=30)
                    tls = context.wrap_socket(raw, server_hostname="127.0.0.1")
                    tls.sendall(b"GET /metrics HTTP/1.1\r\nHost: kwatt\r\n")
                except OSError:
                    continue
                with lock:
                    held.append(tls)

        openers = [threading.Thread(target=open_some, args=(count // 8,)) for _ in range(8)]
        opened_at = time.monotonic()
        for opener in openers:
            opener.start()
        for opener in openers:
            opener.join()
        open_seconds = time.monotonic() - opened_at
        rss, threads = proc_status(exporter.proc.pid)
        scraper = Scraper(exporter.port, context)
        latencies = []
        for _ in range(20):
            status, latency = scraper.scrape()
            if status == 200:
                latencies.append(latency)
        body = _body(exporter.port, context)
        gauge = re.search(r"^kwatt_http_connections\{[^}]*\} (\S+)$", body, re.M)
        dropped = re.findall(
            r'^kwatt_http_connections_dropped_total\{node="\w+",reason="(\w+)"\} (\S+)$',
            body, re.M)
        ms = [v * 1000 for v in latencies]
        print(f"{'slowloris':<14} slow_connections={len(held)} (opened in {open_seconds:.1f}s) "
              f"server_open={gauge.group(1) if gauge else '?'} rss={rss0:.1f}->{rss:.1f}MB "
              f"threads={threads0}->{threads} scrape_p50={percentile(ms, 0.5):.0f}ms "
              f"scrape_max={max(ms, default=float('nan')):.0f}ms ok={len(latencies)}/20 "
              f"dropped={dict((r, v) for r, v in dropped if float(v))}")
    finally:
        for sock in held:
            sock.close()
        exporter.stop()


def brute_force(node: SimulatedNode, tmp: Path, hashed: str, seconds: float) -> None:
    exporter = start(node, tmp, None, hashed)
    try:
        counter = [0]

        def guess() -> tuple[int, float]:
            counter[0] += 1
            return Scraper(exporter.port, None, password=f"guess-{counter[0]}").scrape()

        Scraper(exporter.port, None).scrape()  # the verified scraper is cached
        verified: list[float] = []
        stop = threading.Event()

        def scrape_meanwhile() -> None:
            scraper = Scraper(exporter.port, None)
            while not stop.wait(0.5):
                status, latency = scraper.scrape()
                if status == 200:
                    verified.append(latency)

        watcher = threading.Thread(target=scrape_meanwhile)
        watcher.start()
        cpu0, wall0 = proc_cpu_seconds(exporter.proc.pid), time.monotonic()
        _, errors, total = run_for(seconds, 8, guess, ok_status=401)
        cpu, wall = proc_cpu_seconds(exporter.proc.pid) - cpu0, time.monotonic() - wall0
        stop.set()
        watcher.join()
        rss, threads = proc_status(exporter.proc.pid)
        ms = [v * 1000 for v in verified]
        print(f"{'brute-force':<14} guesses={total} (all 401: {errors == 0}) "
              f"exporter_cpu={cpu / wall:.2f} cores rss={rss:.1f}MB threads={threads} "
              f"verified_scrape_p50={percentile(ms, 0.5):.0f}ms "
              f"max={max(ms, default=float('nan')):.0f}ms n={len(ms)}")
    finally:
        exporter.stop()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--slow", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--units", type=int, default=150)
    parser.add_argument("--cost", type=int, default=10)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        (tmp / "certs").mkdir()
        certs = make_test_certs(tmp / "certs")
        node = build_node(tmp / "node", args.pods, args.units)
        hashed = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(args.cost)).decode()
        print(f"bcrypt cost {args.cost}; {os.cpu_count()} CPUs; load generator on the same "
              "machine")
        scrapers(node, tmp, certs, hashed, args.seconds)
        scrapers(node, tmp, None, hashed, args.seconds)
        slowloris(node, tmp, certs, hashed, args.slow)
        brute_force(node, tmp, hashed, args.seconds)


if __name__ == "__main__":
    main()
