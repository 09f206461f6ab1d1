"""Core benchmark: a simulated node with 110 pods / 330 containers.

Reports medians of sampler-cycle CPU time and /metrics scrape latency, and resident memory
after 1,000 cycles (and its growth between cycle 500 and 1,000), then what dominates a cycle.

    .venv/bin/python benchmarks/bench_core.py [--cycles 1000]

Targets on the 2-core CI machine: cycle <= 15 ms, scrape <= 25 ms, RSS <= 80 MB, no growth.
"""

from __future__ import annotations

import argparse
import gc
import random
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kwatt.config import load_config
from kwatt.metrics import KwattCollector, StaticInfo
from kwatt.sampler import Sampler
from kwatt.web import build_app, start_server
from kwatt.workloads.naming import HostNamer
from measure import profile_cycles, rss_mb
from prometheus_client import CollectorRegistry, generate_latest
from simnode import SimulatedNode, container_id, pod_uid


def build(root: Path, pods: int) -> tuple[SimulatedNode, list[str]]:
    node = SimulatedNode(root, cgroup_version=2, driver="systemd", vcpus=32, noise_files=True)
    node.add_intel_server_zones(sockets=2)
    paths = []
    for i in range(pods):
        pod = node.add_pod(pod_uid(f"bench-{i}"), ("guaranteed", "burstable", "besteffort")[i % 3],
                           "containerd")
        for j in range(3):
            paths.append(node.add_container(pod, container_id(f"bench-{i}-{j}")).path)
    for unit in ("kubelet", "containerd", "sshd", "systemd-journald"):
        node.add_unit(f"/system.slice/{unit}.service")
    return node, paths


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--pods", type=int, default=110)
    args = parser.parse_args()
    rng = random.Random(7)
    with tempfile.TemporaryDirectory() as tmp:
        node, paths = build(Path(tmp), args.pods)
        config = load_config(["--path.sysfs", str(node.sysfs), "--path.procfs",
                              str(node.procfs), "--kubernetes", "off", "--gpu", "off",
                              "--node-name", "bench"], env={})
        now = [0.0]
        sampler = Sampler(config, HostNamer(), clock=lambda: now[0])
        registry = CollectorRegistry(auto_describe=False)
        registry.register(KwattCollector(sampler.snapshot, StaticInfo(
            "bench", 5.0, 300.0, 0.2, "USD", 1.1)))

        cycle_cpu: list[float] = [0.0] * args.cycles  # preallocated: no growth of our own
        cycle_wall: list[float] = [0.0] * args.cycles
        rss_at: dict[int, float] = {}
        for cycle in range(1, args.cycles + 1):
            for path in rng.sample(paths, 20):  # the node moves on between cycles
                node.add_cpu(path, rng.randint(1, 50) / 100)
            node.add_node_cpu(busy_seconds=1, idle_seconds=10)
            node.add_energy("0", rng.uniform(100, 900))
            node.add_energy("0:2", rng.uniform(10, 90))
            now[0] += 5.0
            cpu0, wall0 = time.process_time(), time.perf_counter()
            sampler.sample()
            cycle_cpu[cycle - 1] = time.process_time() - cpu0
            cycle_wall[cycle - 1] = time.perf_counter() - wall0
            if cycle in (500, args.cycles):
                gc.collect()
                rss_at[cycle] = rss_mb()

        scrape_inproc = []
        for _ in range(200):
            t0 = time.perf_counter()
            body = generate_latest(registry)
            scrape_inproc.append(time.perf_counter() - t0)
        server, _ = start_server(build_app(registry, lambda: (True, "ok")), "127.0.0.1", 0)
        port = server.server_address[1]
        scrape_http = []
        for _ in range(100):
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
                response.read()
            scrape_http.append(time.perf_counter() - t0)
        server.shutdown()

        def cycle() -> None:
            now[0] += 5.0
            sampler.sample()

        profile = profile_cycles(cycle, 100, 8)

    series = body.count(b"\n") - body.count(b"\n#")
    ms = 1000.0
    print(f"node: {args.pods} pods, {len(paths)} containers, {len(node.zones)} RAPL zones, "
          f"{series} exposed samples ({len(body) / 1024:.0f} KiB)")
    print(f"sampler cycle CPU time   median {statistics.median(cycle_cpu) * ms:6.2f} ms  "
          f"p95 {sorted(cycle_cpu)[int(len(cycle_cpu) * .95)] * ms:6.2f} ms  (target <= 15)")
    print(f"sampler cycle wall time  median {statistics.median(cycle_wall) * ms:6.2f} ms")
    print(f"scrape (in process)      median {statistics.median(scrape_inproc) * ms:6.2f} ms")
    print(f"scrape (HTTP /metrics)   median {statistics.median(scrape_http) * ms:6.2f} ms  "
          "(target <= 25)")
    last = max(rss_at)
    print(f"RSS after {last} cycles    {rss_at[last]:6.1f} MB  (target <= 80); "
          f"growth 500->{last}: {rss_at[last] - rss_at.get(500, rss_at[last]):+.1f} MB")
    print("what dominates a cycle (top functions by own time, 100 cycles):")
    print(profile)


if __name__ == "__main__":
    main()
