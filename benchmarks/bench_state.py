"""What the restart state file costs on a node with about 1,000 workload cgroups.

In-process: the file's size, the time to encode + write + fsync + rename it (each cycle a
scrape was served), a cycle's time with and without it, and the time to restore it.
Whole process, measured from outside: CPU (/proc/<pid>/stat utime+stime) and RSS
(/proc/<pid>/status VmRSS) of the real CLI with and without --state.file, scraped every
cycle.

    .venv/bin/python benchmarks/bench_state.py [--pods 250] [--cycles 200] [--seconds 20]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from exporter_process import ExporterProcess
from kwatt.config import load_config
from kwatt.sampler import Sampler
from kwatt.state import StateFile
from kwatt.statekeeper import StateKeeper
from kwatt.workloads.naming import HostNamer
from simnode import SimulatedNode, container_id, pod_uid

BOOT = "00000000-bench-4000-8000-000000000000"


def build(root: Path, pods: int) -> tuple[SimulatedNode, list[str]]:
    node = SimulatedNode(root, cgroup_version=2, driver="systemd", vcpus=32)
    node.add_intel_server_zones(sockets=2)
    boot = node.procfs / "sys" / "kernel" / "random"
    boot.mkdir(parents=True)
    (boot / "boot_id").write_text(BOOT + "\n")
    paths = []
    for i in range(pods):
        pod = node.add_pod(pod_uid(f"bench-{i}"), ("guaranteed", "burstable", "besteffort")[i % 3],
                           "containerd")
        for j in range(3):
            paths.append(node.add_container(pod, container_id(f"bench-{i}-{j}")).path)
    return node, paths


def advance(node: SimulatedNode, paths: list[str]) -> None:
    for path in paths[::7]:
        node.add_cpu(path, 0.01)
    node.add_energy("0", 50.0)
    node.add_energy("1", 50.0)


def in_process(node: SimulatedNode, paths: list[str], state: Path, cycles: int) -> None:
    config = load_config(["--path.sysfs", str(node.sysfs), "--path.procfs", str(node.procfs),
                          "--kubernetes", "off", "--gpu", "off", "--node-name", "bench"],
                         env={})
    boot_id = str(node.procfs / "sys" / "kernel" / "random" / "boot_id")
    for keep in (False, True):
        sampler = Sampler(config, HostNamer())
        keeper = StateKeeper(StateFile(str(state)), boot_id, sampler)
        keeper.restore()
        if keep:
            sampler.on_cycle = keeper.cycle_done
        cycle_s, write_s = [], []
        for _ in range(cycles):
            advance(node, paths)
            started = time.process_time()
            sampler.sample()
            cycle_s.append(time.process_time() - started)
            keeper.served(sampler.snapshot())
            if keep:
                write_s.append(keeper.last_write_seconds)
        print(f"state file {'on ' if keep else 'off'}: cycle CPU median "
              f"{statistics.median(cycle_s) * 1e3:.1f} ms")
        if keep:
            write_s.sort()
            print(f"  {len(sampler.export_counters().cgroup_usage)} cgroups in the file, "  # type: ignore[union-attr]
                  f"{keeper.last_write_bytes:,} bytes; encode+write+fsync+rename (wall) "
                  f"median {statistics.median(write_s) * 1e3:.2f} ms, "
                  f"p99 {write_s[int(len(write_s) * 0.99) - 1] * 1e3:.2f} ms "
                  f"on {state.parent}")
    restored = Sampler(config, HostNamer())
    started = time.perf_counter()
    StateKeeper(StateFile(str(state)), boot_id, restored).restore()
    print(f"  restore at start: {(time.perf_counter() - started) * 1e3:.1f} ms")


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def whole_process(node: SimulatedNode, paths: list[str], state: Path, seconds: float) -> None:
    for extra in ((), ("--state.file", str(state))):
        exporter = ExporterProcess(node, *extra, interval="1s",
                                   log_path=state.parent / "bench-exporter.log")
        try:
            exporter.wait_for_cycle()
            pid = exporter.proc.pid
            cpu0, t0 = _cpu_seconds(pid), time.monotonic()
            while time.monotonic() - t0 < seconds:
                advance(node, paths)
                with urllib.request.urlopen(f"http://127.0.0.1:{exporter.port}/metrics",
                                            timeout=10) as response:
                    response.read()
                time.sleep(1.0)
            cpu = (_cpu_seconds(pid) - cpu0) / (time.monotonic() - t0)
            rss = _rss_mb(pid)
        finally:
            exporter.stop()
        print(f"CLI {'with' if extra else 'without'} --state.file (1 s interval, scraped "
              f"every second): CPU {cpu * 100:.1f}% of a core, RSS {rss:.1f} MB")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--pods", type=int, default=250)
    parser.add_argument("--cycles", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=20.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        node, paths = build(Path(tmp) / "node", args.pods)
        state = Path(tmp) / "state.json"
        in_process(node, paths, state, args.cycles)
        whole_process(node, paths, state, args.seconds)


if __name__ == "__main__":
    main()
