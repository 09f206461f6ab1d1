"""MIG at the real cost of NVML: 8 GPUs x 7 MIG instances, every call on a MIG device (and
each call of a MIG enumeration on its parent) sleeping 50 ms.

The exporter runs in a child process (the real ``kwatt.exporter.Exporter``: sampler thread,
GPU thread, HTTP server, host mode) with a fake NVML whose GPUs draw 300 W each; this
process feeds the simulated node's RAPL and cgroup counters and measures from outside:

- when /metrics first answers, and its response time throughout (scraped every 25 ms);
- the times at which the CPU figure on /metrics changes, against ``--interval``;
- when each GPU's ``kwatt_gpu_energy_joules_total`` is first above zero, and the longest
  gap between its changes;
- GPU conservation at the end (containers + unattributed == node);
- the child's CPU time and RSS from /proc/<pid>/stat and /proc/<pid>/status;
- in the child: NVML calls per GPU reading, GPU reading time, overruns, and the
  sampler's publish times (its own clock).

    .venv/bin/python benchmarks/bench_mig.py [--seconds 40] [--intervals 1,5]

Targets: CPU figures change every interval within 5 %; /metrics answers within 10 s of
start and in < 1 s throughout; each GPU's energy refreshed at least every 10 s; conserved.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

GPUS = 8
INSTANCES = 7
CALL_SECONDS = 0.05
GPU_WATTS = 300.0


def _pid(gpu: int, instance: int) -> int:
    return 1000 + 10 * gpu + instance


# ------------------------------------------------------------------------------ the child


def serve(root: Path, interval: str, port_file: Path, stats_file: Path) -> None:
    from kwatt.config import load_config
    from kwatt.exporter import Exporter
    from kwatt.sources.nvml import MigInstance
    from nvml_fake import FakeGpu, FakeNvml

    started = time.monotonic()

    class SlowMigNvml(FakeNvml):
        """50 ms per call on a MIG device and per call of a MIG enumeration; energy from
        the wall clock at GPU_WATTS."""

        def total_energy_mj(self, uuid: str) -> int:
            super().total_energy_mj(uuid)
            return int((time.monotonic() - started) * GPU_WATTS * 1000) + 1

        def mig_layout(self, uuid: str) -> list[MigInstance]:
            out = super().mig_layout(uuid)
            # Its own calls (slot count + 5 per instance): layouts may run side by side.
            time.sleep(CALL_SECONDS * (1 + 5 * len(out)))
            return out

        def instance_pids(self, instance_uuid: str) -> list[int]:
            time.sleep(CALL_SECONDS)
            return super().instance_pids(instance_uuid)

    gpus = [FakeGpu(f"GPU-{g}", model="NVIDIA A100-SXM4-80GB", mig_enabled=True, instances=[
        MigInstance(f"MIG-{g}-{i}", i + 1, 1, "1g.10gb", (_pid(g, i),))
        for i in range(INSTANCES)]) for g in range(GPUS)]
    fake = SlowMigNvml(gpus)
    config = load_config(["--path.sysfs", str(root / "sys"), "--path.procfs",
                          str(root / "proc"), "--kubernetes", "off", "--gpu", "on",
                          "--interval", interval, "--web.listen-address", "127.0.0.1:0",
                          "--node-name", "bench"], env={})
    exporter = Exporter(config, gpu_backend_factory=lambda: fake)
    published: list[float] = []
    exporter.sampler.on_cycle = lambda _snap: published.append(time.monotonic())
    server = exporter.serve()
    port_file.write_text(str(server.server_address[1]))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    poller = exporter._gpu_stage._poller if exporter._gpu_stage else None  # benchmark only
    midpoint: list[int] = []

    def mark(*_: object) -> None:  # steady state from here on: layouts are known
        midpoint[:] = [fake.calls, poller.completed if poller else 0]
    signal.signal(signal.SIGUSR1, mark)
    sampler = threading.Thread(target=exporter.sampler.run, args=(stop,), daemon=True)
    sampler.start()
    stop.wait()
    stats_file.write_text(json.dumps({
        "calls": fake.calls, "readings": poller.completed if poller else 0,
        "midpoint": midpoint,
        "overruns": poller.overruns if poller else 0,
        "last_read_seconds": poller.last_seconds if poller else None,
        "published": published}))
    server.shutdown(timeout=1.0)


# ----------------------------------------------------------------------------- the parent


def _scrape(port: int) -> tuple[str | None, float]:
    started = time.monotonic()
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return r.read().decode(), time.monotonic() - started
    except OSError:
        return None, time.monotonic() - started


def _figures(text: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == "kwatt_node_energy_joules_total":
                out[f"node:{s.labels['component']}"] = s.value
            elif s.name == "kwatt_gpu_energy_joules_total":
                out[f"gpu:{s.labels['uuid']}"] = s.value
            elif s.name == "kwatt_container_energy_joules_total" and \
                    s.labels.get("component") == "gpu":
                out["gpu_containers"] = out.get("gpu_containers", 0.0) + s.value
            elif s.name == "kwatt_unattributed_energy_joules_total" and \
                    s.labels.get("component") == "gpu":
                out["gpu_unattributed"] = out.get("gpu_unattributed", 0.0) + s.value
            elif s.name == "kwatt_gpu_read_duration_seconds":
                out["read_seconds"] = s.value
            elif s.name == "kwatt_gpu_read_overruns_total":
                out["overruns"] = s.value
    return out


def _proc(pid: int) -> tuple[float, float]:
    """CPU seconds and RSS MiB of ``pid``, from /proc (the benchmark's view from outside)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    rss = float("nan")
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1]) / 1024
    return cpu, rss


def run(interval: float, seconds: float) -> None:
    from simnode import SimulatedNode, container_id, pod_uid

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        node = SimulatedNode(root, vcpus=32)
        node.add_intel_server_zones(2)
        paths = []
        for g in range(GPUS):
            for i in range(INSTANCES):
                pod = node.add_pod(pod_uid(f"mig-{g}-{i}"))
                path = node.add_container(pod, container_id(f"mig-{g}-{i}")).path
                paths.append(path)
                proc = node.procfs / str(_pid(g, i))
                proc.mkdir(parents=True, exist_ok=True)
                (proc / "cgroup").write_text(f"0::{path}\n")
        stop = threading.Event()

        def feed() -> None:
            last = time.monotonic()
            while not stop.wait(0.1):
                now = time.monotonic()
                dt, last = now - last, now
                for zone in ("0", "1"):
                    node.add_energy(zone, 100.0 * dt)
                for path in paths[:8]:
                    node.add_cpu(path, 0.5 * dt)
                node.add_node_cpu(busy_seconds=4 * dt, idle_seconds=28 * dt)

        feeder = threading.Thread(target=feed, daemon=True)
        feeder.start()
        port_file, stats_file = root / "port", root / "stats.json"
        spawned = time.monotonic()
        child = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(root), "--interval", f"{interval}s",
             "--port-file", str(port_file), "--stats-file", str(stats_file)],
            env={**os.environ, "PYTHONPATH": str(HERE.parent / "exporter")})
        while not port_file.exists() or not port_file.read_text():
            time.sleep(0.01)
        port = int(port_file.read_text())
        first_answer: float | None = None
        latencies: list[float] = []
        cpu_changes: list[float] = []
        gpu_changes: dict[str, list[float]] = {}
        first_energy: dict[str, float] = {}  # when each GPU's energy is first above zero
        last: dict[str, float] = {}
        figures: dict[str, float] = {}
        read_seconds: list[float] = []
        marked = False
        while time.monotonic() - spawned < seconds:
            if not marked and time.monotonic() - spawned > seconds / 2:
                child.send_signal(signal.SIGUSR1)
                marked = True
            text, latency = _scrape(port)
            now = time.monotonic()
            if text is None:
                time.sleep(0.025)
                continue
            if first_answer is None:
                first_answer = now - spawned
            latencies.append(latency)
            figures = _figures(text)
            if "read_seconds" in figures:
                read_seconds.append(figures["read_seconds"])
            for key, value in figures.items():
                if key.startswith("gpu:") and value > 0:
                    first_energy.setdefault(key, now)
                if key.startswith(("node:cpu", "gpu:")) and last.get(key) != value:
                    if key in last:
                        if key == "node:cpu":
                            cpu_changes.append(now)
                        else:
                            gpu_changes.setdefault(key, []).append(now)
                    last[key] = value
            time.sleep(0.025)
        cpu_s, rss = _proc(child.pid)
        child.send_signal(signal.SIGTERM)
        child.wait(timeout=30)
        stop.set()
        feeder.join()
        stats = json.loads(stats_file.read_text())

    gaps = [b - a for a, b in itertools.pairwise(cpu_changes)][1:]
    published = stats["published"]
    own = [b - a for a, b in itertools.pairwise(published)][1:]
    gpu_gaps = [max([b - a for a, b in itertools.pairwise(c)] or [math.inf])
                for c in gpu_changes.values()]
    first_gpu = [t - spawned for t in first_energy.values()]
    node_gpu = figures.get("node:gpu", 0.0)
    split = figures.get("gpu_containers", 0.0) + figures.get("gpu_unattributed", 0.0)
    gpu_total = sum(v for k, v in figures.items() if k.startswith("gpu:"))
    print(f"--interval {interval:g}s, {seconds:g} s, {GPUS} GPUs x {INSTANCES} MIG instances, "
          f"{1000 * CALL_SECONDS:.0f} ms per MIG call")
    print(f"  /metrics first answer {first_answer:.2f} s after spawn; response max "
          f"{1000 * max(latencies):.1f} ms, median {1000 * statistics.median(latencies):.1f} ms"
          f" ({len(latencies)} scrapes)")
    if gaps:
        worst = max(abs(g - interval) for g in gaps) / interval
        print(f"  CPU figure changes seen from outside (25 ms polling): {len(gaps)} gaps, "
              f"mean {statistics.mean(gaps):.3f} s, min {min(gaps):.3f}, max {max(gaps):.3f}, "
              f"worst deviation {100 * worst:.1f} %")
    if own:
        worst_own = max(abs(g - interval) for g in own) / interval
        print(f"  sampler publish times in-process: mean {statistics.mean(own):.4f} s, "
              f"worst deviation {100 * worst_own:.2f} %")
    calls, readings = stats["calls"], stats["readings"]
    if stats["midpoint"]:
        calls, readings = calls - stats["midpoint"][0], readings - stats["midpoint"][1]
    print(f"  GPU thread: {stats['readings']} readings, {calls / max(readings, 1):.1f} NVML "
          f"calls per reading in the second half, read time last "
          f"{stats['last_read_seconds'] or 0:.2f} s, max on /metrics "
          f"{max(read_seconds or [0]):.2f} s, overruns {stats['overruns']}")
    print(f"  GPU energy: first above zero {min(first_gpu or [math.inf]):.1f}-"
          f"{max(first_gpu or [math.inf]):.1f} s after spawn; longest gap between changes "
          f"{max(gpu_gaps or [math.inf]):.2f} s")
    print("  GPU energy first above zero, per GPU (s after spawn): " + ", ".join(
        f"{key[4:]} {t - spawned:.1f}" for key, t in sorted(first_energy.items())))
    print(f"  conservation: node gpu {node_gpu:.3f} J, containers+unattributed {split:.3f} J,"
          f" sum of GPUs {gpu_total:.3f} J, diff {abs(node_gpu - split):.2e} J")
    print(f"  child process (from /proc): CPU {cpu_s:.2f} s over {seconds:g} s "
          f"({100 * cpu_s / seconds:.1f} % of a core), RSS {rss:.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--serve")
    parser.add_argument("--interval", default="5s")
    parser.add_argument("--port-file")
    parser.add_argument("--stats-file")
    parser.add_argument("--seconds", type=float, default=40.0)
    parser.add_argument("--intervals", default="1,5")
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve), args.interval, Path(args.port_file), Path(args.stats_file))
        return
    for interval in (float(x) for x in args.intervals.split(",")):
        run(interval, args.seconds)


if __name__ == "__main__":
    main()
