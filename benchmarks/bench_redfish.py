"""A BMC that takes 5 s to answer must not move CPU sampling.

Runs the real Sampler on a simulated node (RAPL, 30 pods / 90 containers) on a fixed
cadence, once alone and once with a RedfishMeter polling a loopback HTTPS BMC whose every
reply takes 5 s (the meter's thread, as the platform stage would run it; each cycle also
calls ``latest()`` as the stage does). Reports, for both runs: how late each cycle started
against its schedule (median, p99, max), the sampler cycle time, the longest ``latest()``
call, how many BMC readings arrived, and the whole process's CPU time and RSS read from
outside it (/proc/<pid>/stat and /status of the child that runs each case).

    .venv/bin/python benchmarks/bench_redfish.py [--seconds 30] [--interval 1] [--bmc-delay 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))
sys.path.insert(0, str(HERE))


def child(seconds: float, interval: float, bmc_delay: float, with_bmc: bool) -> None:
    from kwatt.config import load_config
    from kwatt.sampler import Sampler
    from kwatt.sources.redfish import RedfishMeter, RedfishSettings
    from kwatt.workloads.naming import HostNamer
    from redfish_bmc import PASSWORD, USERNAME, FaultyBmc, copy_mockup, make_pki
    from simnode import SimulatedNode, container_id, pod_uid

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        node = SimulatedNode(tmp / "node", vcpus=32)
        node.add_intel_server_zones(sockets=2)
        paths = []
        for i in range(30):
            pod = node.add_pod(pod_uid(f"b{i}"), "burstable", "containerd")
            for j in range(3):
                paths.append(node.add_container(pod, container_id(f"b{i}-{j}")).path)
        config = load_config(["--path.sysfs", str(node.sysfs), "--path.procfs",
                              str(node.procfs), "--kubernetes", "off", "--gpu", "off",
                              "--node-name", "bench"], env={})
        sampler = Sampler(config, HostNamer())
        meter = bmc = None
        if with_bmc:
            pki = make_pki(tmp / "pki")
            bmc = FaultyBmc(copy_mockup("environment-metrics", tmp / "mockup"), pki)
            bmc.delay_seconds = bmc_delay
            (tmp / "u").write_text(USERNAME)
            (tmp / "p").write_text(PASSWORD)
            meter = RedfishMeter(RedfishSettings(
                base_url=bmc.url, username_file=str(tmp / "u"), password_file=str(tmp / "p"),
                ca_file=str(pki.ca), interval_seconds=interval,
                timeout_seconds=bmc_delay * 2))
            meter.start()
        lateness, cycle, latest_calls, readings = [], [], [], 0
        start = time.monotonic()
        n = 0
        while True:
            scheduled = start + n * interval
            if scheduled - start > seconds:
                break
            now = time.monotonic()
            if scheduled > now:
                time.sleep(scheduled - now)
            began = time.monotonic()
            lateness.append(began - scheduled)
            for k, path in enumerate(paths):
                node.add_cpu(path, 0.01 * (k % 7 + 1))
            node.add_energy("0", 50.0)
            node.add_energy("1", 50.0)
            sampler.sample()
            cycle.append(time.monotonic() - began)
            if meter is not None:
                t = time.monotonic()
                samples, _ = meter.latest()
                latest_calls.append(time.monotonic() - t)
                readings = max([s.generation for s in samples], default=0)
            n += 1
        if meter is not None:
            meter.close()
        if bmc is not None:
            bmc.close()

    def ms(values: list[float], q: float) -> float:
        ordered = sorted(values)
        return 1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    print(json.dumps({
        "cycles": len(cycle),
        "late_median_ms": 1000 * statistics.median(lateness),
        "late_p99_ms": ms(lateness, 0.99), "late_max_ms": 1000 * max(lateness),
        "cycle_median_ms": 1000 * statistics.median(cycle),
        "latest_max_ms": 1000 * max(latest_calls) if latest_calls else None,
        "bmc_readings": readings,
    }), flush=True)
    # Stay alive until the parent has read /proc/<pid>/stat and /status.
    sys.stdin.read()


def proc_figures(pid: int) -> tuple[float, float]:
    """(CPU seconds, RSS MB) of a process, read from outside it."""
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = (int(fields[11]) + int(fields[12])) / ticks  # utime + stime
    with open(f"/proc/{pid}/status") as status:
        rss = next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))
    return cpu, rss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=1.0)
    parser.add_argument("--bmc-delay", type=float, default=5.0)
    parser.add_argument("--child", choices=("alone", "bmc"))
    args = parser.parse_args()
    if args.child:
        child(args.seconds, args.interval, args.bmc_delay, args.child == "bmc")
        return
    print(f"sampler every {args.interval:g} s for {args.seconds:g} s; BMC replies take "
          f"{args.bmc_delay:g} s")
    print(f"{'case':<14}{'cycles':>7}{'late med':>10}{'p99':>8}{'max':>8}{'cycle med':>11}"
          f"{'latest() max':>14}{'BMC reads':>11}{'CPU s':>8}{'RSS MB':>8}")
    for case in ("alone", "bmc"):
        proc = subprocess.Popen(
            [sys.executable, __file__, "--child", case, "--seconds", str(args.seconds),
             "--interval", str(args.interval), "--bmc-delay", str(args.bmc_delay)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdin is not None
        result = json.loads(proc.stdout.readline())
        cpu, rss = proc_figures(proc.pid)
        proc.stdin.close()
        proc.wait()
        latest = result["latest_max_ms"]
        print(f"{case:<14}{result['cycles']:>7}{result['late_median_ms']:>9.2f}m"
              f"{result['late_p99_ms']:>7.1f}m{result['late_max_ms']:>7.1f}m"
              f"{result['cycle_median_ms']:>10.2f}m"
              f"{(f'{latest:.3f} ms' if latest is not None else '-'):>14}"
              f"{result['bmc_readings']:>11}{cpu:>8.2f}{rss:>8.1f}")
    print("late = cycle start minus its schedule (m = ms); CPU and RSS of the whole child "
          "process from /proc/<pid>/stat and /status")


if __name__ == "__main__":
    main()
