"""Issue 13's node benchmark: a 110-pod node (330 containers) with 8 GPUs, near the floor.

    .venv/bin/python benchmarks/bench_node.py [--cycles 1000] [--rss-cycles 10000]
        [--process-seconds 60] [--cgroups real|fixture]

What it measures, each as a median:
- sampler cycle CPU (thread CPU time of the sampling thread, fake clock, fake NVML GPUs);
- scrape CPU through the real WSGI app (gzip, as Prometheus asks), the first scrape of a
  cycle (renders it) and a repeated one (served from the cycle's cache);
- the installed ``kwatt-exporter`` as a separate process: CPU from /proc/<pid>/stat and RSS
  from /proc/<pid>/status, at a 1 s interval with two scrapers every 3 s (the default 5 s /
  15 s, five times faster), projected to CPU-seconds per hour at the default;
- RSS of this process over ``--rss-cycles`` cycles with churn (a pod replaced every 10
  cycles);
- Debian's prometheus-node-exporter (rapl, cpu and meminfo collectors) on the same fixture
  tree, scraped in the same run, CPU per scrape from /proc/<pid>/stat.

``--cgroups real`` (default when run as root on a cgroup v2 mount) builds the 330 container
cgroups on this machine's real cgroupfs (a scratch subtree, removed at the end) and points
the fixture's sysfs/fs/cgroup at it, so the held-descriptor path runs against kernfs. A
sleeping helper process is moved through the containers so they accrue CPU time. RAPL,
/proc/stat and meminfo come from the fixture tree.

Targets (issue 13): cycle <= 6 ms CPU; scrape <= 5 ms CPU; <= 10 CPU-s/h at 5 s with two
15 s scrapers; RSS <= 80 MB, flat over 10,000 cycles.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import gzip
import io
import logging
import os
import pstats
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from kwatt.config import load_config
from kwatt.exporter import Exporter
from kwatt.ledger import METRIC_LEVELS, WorkloadLabels
from kwatt.metrics import KwattCollector, StaticInfo
from kwatt.sampler import Sampler
from kwatt.workloads.cgroups import CgroupIdentity
from measure import rss_mb
from nvml_fake import FakeGpu, FakeNvml
from prometheus_client import CollectorRegistry, generate_latest
from simnode import SimulatedNode, container_id, pod_uid

TICKS = os.sysconf("SC_CLK_TCK")
GPUS = 8
V2_MOUNTS = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")


def proc_cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def proc_rss_mb(pid: int) -> float:
    for row in Path(f"/proc/{pid}/status").read_text().splitlines():
        if row.startswith("VmRSS:"):
            return int(row.split()[1]) / 1024
    return float("nan")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Node:
    """The fixture tree, with its cgroups either in the fixture or on the real cgroupfs."""

    def __init__(self, root: Path, pods: int, real_base: Path | None) -> None:
        self.fixture = SimulatedNode(root, cgroup_version=2, driver="systemd", vcpus=32)
        self.fixture.add_intel_server_zones(sockets=2)
        self.real: Path | None = None
        self.mover: subprocess.Popen[bytes] | None = None
        if real_base is not None:
            self.real = real_base / f"kwatt-bench-{os.getpid()}"
            self.real.mkdir()
            link = self.fixture.sysfs / "fs" / "cgroup"
            shutil.rmtree(link)
            link.symlink_to(self.real)
            self.mover = subprocess.Popen([sys.executable, "-c",
                                           "import time\nwhile True: time.sleep(0.0005)"])
        self.containers: list[str] = []
        self.pods: list[tuple[str, list[str]]] = []
        # Kubernetes names for --metrics.level: 10 namespaces, 30 Deployments of ~4 pods.
        self.labels: dict[tuple[str, str], WorkloadLabels] = {}
        self.serial = 0
        for _ in range(pods):
            self.add_pod()
        self.gpu_clock = time.monotonic()

    def visit_all(self) -> None:
        """Every container uses some CPU, so that every one has series."""
        for path in self.containers:
            if self.real is None:
                self.fixture.add_cpu(path, 0.01)
            else:
                assert self.mover is not None
                (self.real / path.lstrip("/") / "cgroup.procs").write_text(f"{self.mover.pid}\n")
                time.sleep(0.003)  # several wakeups: every container accrues some CPU

    def _mkdir(self, path: str) -> None:
        assert self.real is not None
        (self.real / path.lstrip("/")).mkdir(parents=True, exist_ok=True)

    def add_pod(self) -> None:
        self.serial += 1
        uid = pod_uid(f"bench-{self.serial}")
        qos = ("guaranteed", "burstable", "besteffort")[self.serial % 3]
        if self.real is None:
            pod = self.fixture.add_pod(uid, qos, "containerd")
            paths = [self.fixture.add_container(pod, container_id(f"b-{self.serial}-{j}")).path
                     for j in range(3)]
            pod_path = pod.path
        else:
            pod_path = self.fixture.pod_path(uid, qos)
            self._mkdir(pod_path)
            paths = []
            for j in range(3):
                path = f"{pod_path}/cri-containerd-{container_id(f'b-{self.serial}-{j}')}.scope"
                self._mkdir(path)
                paths.append(path)
        namespace, workload = f"team-{self.serial % 10}", f"app-{self.serial % 30}"
        pod_name = f"{workload}-{self.serial}"
        self.labels[(uid, "")] = WorkloadLabels(namespace, pod_name, "POD", workload,
                                                "Deployment")
        for j in range(3):
            self.labels[(uid, container_id(f"b-{self.serial}-{j}"))] = WorkloadLabels(
                namespace, pod_name, ("main", "sidecar", "proxy")[j], workload, "Deployment")
        self.pods.append((pod_path, paths))
        self.containers.extend(paths)

    def replace_pod(self, rng: random.Random) -> None:
        pod_path, paths = self.pods.pop(rng.randrange(len(self.pods)))
        for path in paths:
            self.containers.remove(path)
        if self.real is None:
            self.fixture.remove_cgroup(pod_path)
        else:
            assert self.mover is not None
            (self.real / "cgroup.procs").write_text(f"{self.mover.pid}\n")
            for path in paths:
                (self.real / path.lstrip("/")).rmdir()
            (self.real / pod_path.lstrip("/")).rmdir()
        self.add_pod()

    def use_cpu(self, rng: random.Random) -> None:
        for path in rng.sample(self.containers, 20 if self.real is None else 5):
            if self.real is None:
                self.fixture.add_cpu(path, rng.randint(1, 50) / 100)
            else:
                assert self.mover is not None
                (self.real / path.lstrip("/") / "cgroup.procs").write_text(f"{self.mover.pid}\n")
                time.sleep(0.0006)  # a wakeup or two of the mover in here

    def advance(self, rng: random.Random, gpus: list[FakeGpu], seconds: float) -> None:
        self.use_cpu(rng)
        self.fixture.add_node_cpu(busy_seconds=seconds * 4, idle_seconds=seconds * 28)
        for zone in ("0", "1"):
            self.fixture.add_energy(zone, rng.uniform(100, 200) * seconds)
        for zone in ("0:0", "1:0"):  # core, inside the package
            self.fixture.add_energy(zone, rng.uniform(50, 100) * seconds)
        for zone in ("0:2", "1:2"):  # dram
            self.fixture.add_energy(zone, rng.uniform(10, 30) * seconds)
        # The GPU stage stamps its readings with the real clock: energy follows it.
        elapsed, self.gpu_clock = time.monotonic() - self.gpu_clock, time.monotonic()
        for gpu in gpus:
            # 100-300 W: well under the 1,400 W plausibility ceiling even when the stage's
            # reading interval is shorter than the interval this energy was added over.
            gpu.power_mw = rng.randint(100_000, 300_000)
            gpu.energy_mj += int(gpu.power_mw * elapsed)
            gpu.utilisation_percent = rng.randint(0, 100)

    def close(self) -> None:
        if self.mover is not None:
            self.mover.send_signal(signal.SIGKILL)
            self.mover.wait()
        if self.real is not None and self.real.exists():
            for sub in sorted((p for p in self.real.rglob("*") if p.is_dir()),
                              key=lambda p: len(p.parts), reverse=True):
                sub.rmdir()
            self.real.rmdir()


class BenchNamer:
    """Names the benchmark's pods as the Kubernetes namer would."""

    def __init__(self, node: Node) -> None:
        self._labels = node.labels

    def name(self, identity: CgroupIdentity) -> WorkloadLabels | None:
        return self._labels.get((identity.pod_uid, identity.container_id))

    def cpu_request(self, identity: CgroupIdentity) -> float:
        return 0.0


def series_per_level(node: Node) -> dict[str, tuple[int, int]]:
    """Per --metrics.level: (kwatt_* series, of which kwatt_container_energy_joules_total)."""
    out: dict[str, tuple[int, int]] = {}
    rng = random.Random(3)
    for level in METRIC_LEVELS:
        config = load_config(["--path.sysfs", str(node.fixture.sysfs), "--path.procfs",
                              str(node.fixture.procfs), "--kubernetes", "off", "--gpu", "off",
                              "--node-name", "bench", "--metrics.level", level], env={})
        now = [0.0]
        sampler = Sampler(config, BenchNamer(node), clock=lambda now=now: now[0],
                          include_host_units=False)
        sampler.sample()
        node.visit_all()
        node.advance(rng, [], 5.0)
        now[0] += 5.0
        sampler.sample()
        registry = CollectorRegistry(auto_describe=False)
        registry.register(KwattCollector(sampler.snapshot, StaticInfo(
            "bench", 5.0, None, None, "USD", 1.0)))
        rows = [r for r in generate_latest(registry).decode().splitlines()
                if r.startswith("kwatt_")]
        out[level] = (len(rows), sum(1 for r in rows
                                     if r.startswith("kwatt_container_energy_joules_total")))
    return out


def wsgi_scrape(app: Callable[..., Any]) -> tuple[float, bytes]:
    """CPU seconds of one /metrics through the real app (gzip accepted), and the body."""
    environ = {"REQUEST_METHOD": "GET", "PATH_INFO": "/metrics", "QUERY_STRING": "",
               "HTTP_ACCEPT": "text/plain;version=0.0.4;q=1,*/*;q=0.1",
               "HTTP_ACCEPT_ENCODING": "gzip", "wsgi.input": io.BytesIO(),
               "wsgi.url_scheme": "http", "REMOTE_ADDR": "127.0.0.1"}
    started = time.thread_time()
    body = b"".join(app(environ, lambda status, headers, exc_info=None: None))
    return time.thread_time() - started, body


def in_process(node: Node, cycles: int, rss_cycles: int) -> dict[str, Any]:
    rng = random.Random(7)
    gpus = [FakeGpu(f"GPU-{i:02d}", utilisation_percent=50) for i in range(GPUS)]
    config = load_config(["--path.sysfs", str(node.fixture.sysfs), "--path.procfs",
                          str(node.fixture.procfs), "--kubernetes", "off", "--gpu", "on",
                          "--node-name", "bench"], env={})
    now = [1000.0]
    exporter = Exporter(config, gpu_backend_factory=lambda: FakeNvml(gpus))
    sampler = exporter.sampler
    sampler._clock = lambda: now[0]  # type: ignore[attr-defined]  # fake time, real reads
    app = exporter.app()

    def cycle() -> float:
        node.advance(rng, gpus, 5.0)
        now[0] += 5.0
        started = time.thread_time()
        sampler.sample()
        return time.thread_time() - started

    cycle()
    node.visit_all()
    for _ in range(3):
        cycle()
    cycle_cpu = [cycle() for _ in range(cycles)]
    first, again = [], []
    for _ in range(50):
        cycle()
        cpu, body = wsgi_scrape(app)
        first.append(cpu)
        again.append(wsgi_scrape(app)[0])
    text = gzip.decompress(body).decode()
    series = sum(1 for row in text.splitlines() if row and not row.startswith("#"))
    kwatt_series = sum(1 for row in text.splitlines() if row.startswith("kwatt_"))
    profiler = cProfile.Profile()
    for _ in range(100):
        node.advance(rng, gpus, 5.0)
        now[0] += 5.0
        profiler.enable()
        sampler.sample()
        profiler.disable()
    report = io.StringIO()
    pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(14)
    profile = "\n".join(report.getvalue().splitlines()[6:21])
    gc.collect()
    rss: dict[int, float] = {0: rss_mb()}
    for index in range(1, rss_cycles + 1):
        if index % 10 == 0:
            node.replace_pod(rng)
        cycle()
        if index % 50 == 0:
            wsgi_scrape(app)
        if index in (1000, rss_cycles // 2, rss_cycles):
            gc.collect()
            rss[index] = rss_mb()
    return {"cycle": cycle_cpu, "first": first, "again": again, "series": series,
            "kwatt_series": kwatt_series, "gzip_kib": len(body) / 1024,
            "text_kib": len(text) / 1024, "profile": profile, "rss": rss,
            "walks": getattr(_reader(config), "walks", None)}


def _reader(config: object) -> object:
    """The exporter's cgroup reader (host mode: host units included)."""
    from kwatt.workloads import cgroups
    return next((r for (_, host), r in cgroups._READERS.items() if host), None)


def scrape_loop(url: str, every: float, stop: threading.Event, headers: dict[str, str]) -> None:
    while not stop.wait(every):
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers),
                                        timeout=10) as response:
                response.read()
        except OSError:
            pass


def whole_process(node: Node, seconds: float) -> dict[str, float]:
    binary = shutil.which("kwatt-exporter", path=str(Path(sys.executable).parent)) \
        or shutil.which("kwatt-exporter")
    assert binary, "kwatt-exporter is not installed in this environment"
    port = free_port()
    proc = subprocess.Popen([binary, "--path.sysfs", str(node.fixture.sysfs), "--path.procfs",
                             str(node.fixture.procfs), "--kubernetes", "off", "--gpu", "off",
                             "--interval", "1s", "--web.listen-address", f"127.0.0.1:{port}",
                             "--node-name", "bench", "--log.level", "warn"])
    rng = random.Random(11)
    stop = threading.Event()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        time.sleep(3)  # the first cycles, imports settled
        scrapers = [threading.Thread(target=scrape_loop, args=(
            f"http://127.0.0.1:{port}/metrics", 3.0, stop,
            {"Accept-Encoding": "gzip"})) for _ in range(2)]
        cpu0, wall0 = proc_cpu_seconds(proc.pid), time.monotonic()
        rss0 = proc_rss_mb(proc.pid)
        for scraper in scrapers:
            scraper.start()
        while time.monotonic() - wall0 < seconds:
            node.advance(rng, [], 1.0)
            time.sleep(1.0)
        cpu, wall = proc_cpu_seconds(proc.pid) - cpu0, time.monotonic() - wall0
        rss1 = proc_rss_mb(proc.pid)
    finally:
        stop.set()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    # `wall` seconds at 1 s / 3 s stand for 5 * wall seconds at the default 5 s / 15 s.
    return {"cpu": cpu, "wall": wall, "per_hour": cpu / (5 * wall) * 3600,
            "rss0": rss0, "rss1": rss1}


def node_exporter(node: Node, scrapes: int) -> dict[str, float] | None:
    binary = shutil.which("prometheus-node-exporter") or shutil.which("node_exporter")
    if binary is None:
        return None
    port = free_port()
    proc = subprocess.Popen([binary, "--collector.disable-defaults", "--collector.rapl",
                             "--collector.cpu", "--collector.meminfo",
                             f"--path.sysfs={node.fixture.sysfs}",
                             f"--path.procfs={node.fixture.procfs}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url, timeout=2).read()
                break
            except OSError:
                time.sleep(0.1)
        request = urllib.request.Request(url, headers={"Accept-Encoding": "gzip"})
        for _ in range(10):
            urllib.request.urlopen(request, timeout=10).read()
        cpu0 = proc_cpu_seconds(proc.pid)
        for _ in range(scrapes):
            urllib.request.urlopen(request, timeout=10).read()
        cpu = proc_cpu_seconds(proc.pid) - cpu0
        rss = proc_rss_mb(proc.pid)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    return {"per_scrape": cpu / scrapes, "rss": rss}


class FaultTally(logging.Handler):
    """Counts the faults the sampler logs, so the figures say what they include."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.seen: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        key = f"{getattr(record, 'source', '?')}/{getattr(record, 'reason', '?')}: " \
              f"{getattr(record, 'detail', record.getMessage())[:80]}"
        self.seen[key] = self.seen.get(key, 0) + 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cycles", type=int, default=1000)
    parser.add_argument("--rss-cycles", type=int, default=10000)
    parser.add_argument("--process-seconds", type=float, default=60.0)
    parser.add_argument("--pods", type=int, default=110)
    parser.add_argument("--cgroups", choices=("real", "fixture"), default=None)
    args = parser.parse_args()
    tally = FaultTally()
    logging.getLogger("kwatt").addHandler(tally)
    logging.getLogger("kwatt").propagate = False
    # Stopped early: still remove the scratch cgroups and the helper process.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    real_base = None
    if args.cgroups != "fixture":
        real_base = next((Path(m) for m in V2_MOUNTS if (Path(m) / "cgroup.controllers")
                          .exists() and os.access(m, os.W_OK)), None)
        if args.cgroups == "real" and real_base is None:
            sys.exit("--cgroups real needs a writable cgroup v2 mount (root)")
    with tempfile.TemporaryDirectory() as tmp:
        node = Node(Path(tmp) / "node", args.pods, real_base)
        try:
            levels = series_per_level(node)
            inproc = in_process(node, args.cycles, args.rss_cycles)
            whole = whole_process(node, args.process_seconds)
            peer = node_exporter(node, 300)
        finally:
            node.close()
    ms = 1000.0
    load = os.getloadavg()[0]
    print(f"node: {args.pods} pods, {len(node.containers)} containers, {GPUS} fake-NVML GPUs, "
          f"cgroups on {'the real cgroupfs' if real_base else 'the fixture tree'}; "
          f"{inproc['series']} series ({inproc['kwatt_series']} kwatt_*), "
          f"{inproc['text_kib']:.0f} KiB, {inproc['gzip_kib']:.0f} KiB gzipped")
    print(f"machine: {os.cpu_count()} CPUs shared with other work, load average {load:.1f}; "
          "CPU figures are thread/process CPU time, less sensitive to load than wall time")
    cycle = statistics.median(inproc["cycle"]) * ms
    first = statistics.median(inproc["first"]) * ms
    again = statistics.median(inproc["again"]) * ms
    print(f"sampler cycle CPU        median {cycle:6.2f} ms  p95 "
          f"{sorted(inproc['cycle'])[int(len(inproc['cycle']) * .95)] * ms:6.2f} ms  "
          "(target <= 6)")
    print(f"scrape CPU, new cycle    median {first:6.2f} ms  (renders the cycle; "
          "target <= 5)")
    print(f"scrape CPU, same cycle   median {again:6.2f} ms  (cached)")
    projected = (720 * cycle + 480 * first) / ms
    print(f"projected, in process    {projected:6.2f} CPU-s/h at 5 s with two 15 s scrapers "
          "(every scrape a new cycle; target <= 10)")
    print(f"kwatt-exporter process   {whole['per_hour']:6.2f} CPU-s/h projected "
          f"({whole['cpu']:.2f} CPU-s in {whole['wall']:.0f} s at 1 s / two 3 s scrapers, "
          f"/proc/<pid>/stat, no GPUs); RSS {whole['rss0']:.1f} -> {whole['rss1']:.1f} MB")
    rss = inproc["rss"]
    last = max(rss)
    print("RSS (this process)       " + ", ".join(
        f"{value:.1f} MB at {cycles}" for cycles, value in sorted(rss.items()))
          + f" cycles with churn (target <= 80, flat up to {last})")
    if peer is None:
        print("node_exporter            not installed (apt-get install prometheus-node-exporter)")
    else:
        print(f"node_exporter            {peer['per_scrape'] * ms:6.2f} ms CPU per scrape "
              f"(rapl, cpu, meminfo on the same fixture tree; /proc/<pid>/stat over 300 "
              f"scrapes); RSS {peer['rss']:.1f} MB; "
              f"{(peer['per_scrape'] * 240):.2f} CPU-s/h at one 15 s scrape")
    print(f"tree walks during the RSS run: {inproc['walks']}")
    print("kwatt_* series per --metrics.level (kwatt_container_energy_joules_total of them; "
          "10 namespaces, 30 Deployments, 110 pods, no GPUs):")
    for level, (total, containers) in levels.items():
        print(f"  {level:<10} {total:5d} ({containers})")
    print(f"faults logged: {len(tally.seen)} distinct" + "".join(
        f"\n  {key} (x{count})" for key, count in sorted(tally.seen.items())[:10]))
    print("what dominates a cycle (top functions by own time, 100 cycles):")
    print(inproc["profile"])


if __name__ == "__main__":
    main()
