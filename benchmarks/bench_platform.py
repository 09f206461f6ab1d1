"""CPU sampling cadence with a platform meter whose every poll takes 5 s (a slow BMC).

Runs the real sampler loop (``Sampler.run``) on a simulated node in a child process, once
without a platform meter and once with ``SlowMeter``: a fake ``PlatformMeter`` whose poll
blocks 5 s on its own thread, as a Redfish BMC that answers in 5 s would. Prints, per run,
the cycles completed, the mean and worst gap between cycles against ``--interval``, the
drift of the last cycle from its schedule, how often `other` was booked, and the child's
RSS and CPU time read from outside it (/proc/<pid>/status and /proc/<pid>/stat).

    .venv/bin/python benchmarks/bench_platform.py [seconds] [interval]

Target: the cycle gaps with the slow meter match those without it (within 5 % of the
interval), i.e. a slow meter never delays CPU sampling.
"""

from __future__ import annotations

import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from kwatt.config import load_config, parse_duration
from kwatt.faults import Fault
from kwatt.ledger import LedgerSnapshot
from kwatt.sampler import Sampler
from kwatt.sources.meter import MeterSample
from kwatt.stages.platform import PlatformStage
from kwatt.workloads.naming import HostNamer
from simnode import SimulatedNode, container_id, pod_uid

POLL_SECONDS = 5.0
METER_WATTS = 400.0
CONTAINERS = 20


class SlowMeter:
    """A meter read on its own thread, each read taking ``POLL_SECONDS``."""

    source = "slowbmc"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._latest: list[MeterSample] = []
        self._stop = threading.Event()
        self._generation = 0
        self.polls = 0
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.is_set():
            if self._stop.wait(POLL_SECONDS):  # the request: 5 s until the BMC answers
                return
            self._generation += 1
            sample = MeterSample(self.source, "chassis", time.monotonic(), METER_WATTS, None,
                                 self._generation)
            with self._lock:
                self._latest = [sample]
                self.polls += 1

    def latest(self) -> tuple[list[MeterSample], list[Fault]]:
        with self._lock:
            return list(self._latest), []

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=1)


def child(mode: str, seconds: float, interval: str, out: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        node = SimulatedNode(Path(tmp), vcpus=16, noise_files=True)
        node.add_intel_server_zones(2)
        paths = [node.add_container(node.add_pod(pod_uid(f"p{i}")), container_id(f"c{i}")).path
                 for i in range(CONTAINERS)]
        config = load_config(["--path.sysfs", str(node.sysfs), "--path.procfs",
                              str(node.procfs), "--kubernetes", "off", "--gpu", "off",
                              "--node-name", "bench", "--interval", interval], env={})
        meter = SlowMeter() if mode == "slow" else None
        stage = PlatformStage([meter], config) if meter is not None else None
        sampler = Sampler(config, HostNamer(), platform=stage)
        stamps: list[float] = []
        other: list[float] = []

        def cycle_done(snapshot: LedgerSnapshot) -> None:
            stamps.append(time.monotonic())
            other.append(sum(j for c, _, j in snapshot.node_energy if c == "other"))

        sampler.on_cycle = cycle_done
        stop = threading.Event()

        def feed() -> None:
            last = time.monotonic()
            while not stop.wait(0.1):
                now = time.monotonic()
                dt, last = now - last, now
                for index in ("0", "1"):
                    node.add_energy(index, 100.0 * dt)
                    node.add_energy(f"{index}:2", 15.0 * dt)
                for path in paths:
                    node.add_cpu(path, 0.2 * dt)
                node.add_node_cpu(idle_seconds=12.0 * dt)

        threads = [threading.Thread(target=sampler.run, args=(stop,), daemon=True),
                   threading.Thread(target=feed, daemon=True)]
        for thread in threads:
            thread.start()
        time.sleep(seconds)
        stop.set()
        for thread in threads:
            thread.join(timeout=POLL_SECONDS + 2)
        if meter is not None:
            meter.close()
        bookings = sum(1 for a, b in itertools.pairwise(other) if b > a)
        Path(out).write_text(json.dumps({
            "stamps": stamps, "bookings": bookings, "other_joules": other[-1] if other else 0,
            "polls": meter.polls if meter is not None else 0}))
        sys.stdin.read()  # the parent reads /proc/<pid> now, then closes stdin


def _proc(pid: int) -> tuple[float, float]:
    """(RSS MiB, CPU seconds) of another process, from outside it."""
    with open(f"/proc/{pid}/status") as status:  # the benchmark's child, not an input
        rss = next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    return rss, (int(fields[11]) + int(fields[12])) / ticks


def run(mode: str, seconds: float, interval: str) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        proc = subprocess.Popen([sys.executable, __file__, "--child", mode, str(seconds),
                                 interval, str(out)], stdin=subprocess.PIPE, text=True)
        while not out.exists() or not out.read_text():
            if proc.poll() is not None:
                raise SystemExit(f"child {mode} exited with {proc.returncode}")
            time.sleep(0.1)
        rss, cpu = _proc(proc.pid)
        assert proc.stdin is not None
        proc.stdin.close()
        proc.wait(timeout=10)
        result = json.loads(out.read_text())
    stamps = result["stamps"]
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    period = parse_duration("interval", interval)
    drift = (stamps[-1] - stamps[0]) - period * (len(stamps) - 1)
    return {"cycles": len(stamps), "mean_gap": statistics.fmean(gaps),
            "worst_gap": max(gaps), "p99_gap": sorted(gaps)[int(0.99 * (len(gaps) - 1))],
            "drift": drift, "bookings": result["bookings"], "polls": result["polls"],
            "rss_mb": rss, "cpu_s": cpu, "period": period}


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 20.0
    interval = sys.argv[2] if len(sys.argv) > 2 else "500ms"
    print(f"{seconds:g} s per run, --interval {interval}, meter poll {POLL_SECONDS:g} s, "
          f"{CONTAINERS} containers")
    print(f"{'meter':<8} {'cycles':>6} {'mean gap':>9} {'p99 gap':>8} {'worst':>8} "
          f"{'drift':>8} {'polls':>5} {'other booked':>12} {'RSS MiB':>8} {'CPU s':>6}")
    for mode in ("none", "slow"):
        r = run(mode, seconds, interval)
        print(f"{mode:<8} {r['cycles']:>6} {r['mean_gap']:>8.3f}s {r['p99_gap']:>7.3f}s "
              f"{r['worst_gap']:>7.3f}s {r['drift']:>+7.3f}s {r['polls']:>5.0f} "
              f"{r['bookings']:>12.0f} {r['rss_mb']:>8.1f} {r['cpu_s']:>6.2f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], float(sys.argv[3]), sys.argv[4], sys.argv[5])
    else:
        main()
