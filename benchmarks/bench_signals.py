"""Carbon-intensity source benchmark: scrapes and sampler cadence with a healthy, a hanging
and a failing intensity API (issue 11, item 1).

Each scenario starts the real CLI (``python -m kwatt``) on a small simulated node with
``--interval 1s`` and a fake Electricity Maps API on loopback polled every second, then
scrapes ``/metrics`` for ``--seconds`` and reports, measured from outside the process:

* scrape latency p50 / p99 / max (this process's wall clock around each real scrape);
* sampler cycles completed per second (from ``kwatt_sample_duration_seconds_count``);
* the exporter's RSS and threads (/proc/<pid>/status) and CPU seconds (/proc/<pid>/stat).

Scenarios: ``healthy`` (the API answers), ``hanging`` (the API holds every request; the
per-request timeout is 30 s, longer than the run, so the poller thread is stuck the whole
time), ``failing`` (HTTP 500 at once: backoff with jitter).

Target: hanging and failing scrape latency and cadence equal to healthy within noise.

    .venv/bin/python benchmarks/bench_signals.py [--seconds 10]
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_http import proc_cpu_seconds, proc_status
from exporter_process import ExporterProcess
from fake_intensity_api import FakeIntensityApi, serve
from simnode import SimulatedNode

_COUNT = re.compile(r"^kwatt_sample_duration_seconds_count\{[^}]*\} (\S+)$", re.M)


def run(scenario: str, seconds: float) -> str:
    api = FakeIntensityApi()
    if scenario == "hanging":
        api.hang()
    elif scenario == "failing":
        api.fail(500)
    with tempfile.TemporaryDirectory() as tmp, serve(api) as base:
        root = Path(tmp)
        node = SimulatedNode(root / "node")
        node.add_rapl_zone("0", "package-0")
        (root / "token").write_text("em-token\n")
        exporter = ExporterProcess(
            node, "--carbon.source", "electricitymaps", "--carbon.url",
            base + "/v3/carbon-intensity/latest?zone={zone}", "--carbon.zone", "DE",
            "--carbon.token-file", str(root / "token"), "--carbon.period", "1s",
            "--carbon.timeout", "30s", "--carbon.grace", "1m", interval="1s",
            log_path=root / "exporter.log")
        try:
            pid = exporter.proc.pid
            exporter.wait_for_cycle()
            cpu0, start = proc_cpu_seconds(pid), time.monotonic()
            first = int(float(_COUNT.search(exporter.metrics()).group(1)))  # type: ignore
            latencies: list[float] = []
            body = ""
            while time.monotonic() - start < seconds:
                t0 = time.monotonic()
                status, body = exporter.get("/metrics")
                latencies.append(time.monotonic() - t0)
                assert status == 200
                time.sleep(0.05)
            elapsed = time.monotonic() - start
            last = int(float(_COUNT.search(body).group(1)))  # type: ignore[union-attr]
            cpu = proc_cpu_seconds(pid) - cpu0
            rss, threads = proc_status(pid)
        finally:
            api.release()
            exporter.stop()
    latencies.sort()
    p99 = latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))]
    return (f"{scenario:8s} scrapes={len(latencies):4d} "
            f"p50={statistics.median(latencies) * 1000:6.1f}ms p99={p99 * 1000:6.1f}ms "
            f"max={latencies[-1] * 1000:6.1f}ms cycles/s={(last - first) / elapsed:4.2f} "
            f"cpu={cpu / elapsed * 100:4.1f}% rss={rss:5.1f}MB threads={threads} "
            f"api_requests={len(api.requests)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    for scenario in ("healthy", "hanging", "failing"):
        print(run(scenario, args.seconds), flush=True)


if __name__ == "__main__":
    main()
