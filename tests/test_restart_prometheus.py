"""A restart under a real Prometheus: how much of the node's energy increase() misses.

Two simulated nodes are fed the same constant power; each runs the real CLI, one with
--state.file and one without. Both exporters are stopped (SIGTERM), left down for GAP_S,
and started again on the same port, so Prometheus sees one series with a counter reset.

To measure exactly, the feed pauses twice, before and after the restart: the counters are
then flat and every exporter has sampled and been scraped at rest, so the energy fed between
the pauses (known to the microjoule) is what Prometheus should record between them. What
Prometheus recorded is the reset-aware sum of its raw samples between the pauses (what
increase() computes before extrapolating to the window's ends); increase() itself over a
window ending in the second pause is printed next to it.
"""

from __future__ import annotations

import itertools
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from conftest import require_tool
from exporter_process import ExporterProcess
from simnode import SimulatedNode
from test_prometheus_integration import Prometheus, free_port

pytestmark = pytest.mark.slow

PACKAGE_W = 100.0
GAP_S = 5.0
INTERVAL = "1s"
SCRAPE = "2s"  # slower than sampling: the last cycles before a stop may never be scraped
BOOT = "c0ffee00-1234-4567-89ab-0123456789ab"
TICK_S = 0.05
SERIES = 'kwatt_node_energy_joules_total{component="cpu",instance="%s"}'


class Feeder(threading.Thread):
    """Constant power into every node while running; nothing while paused."""

    def __init__(self, nodes: list[SimulatedNode]) -> None:
        super().__init__(daemon=True)
        self.nodes = nodes
        self.paused = threading.Event()
        self.stop_event = threading.Event()
        self.lock = threading.Lock()
        self.fed_uj = 0  # what every node's package zone gained

    def run(self) -> None:
        last = time.monotonic()
        while not self.stop_event.wait(TICK_S):
            now = time.monotonic()
            dt, last = now - last, now
            if self.paused.is_set():
                continue
            uj = round(PACKAGE_W * dt * 1e6)
            with self.lock:
                for node in self.nodes:
                    node.add_energy("0", uj / 1e6)
                    node.add_cpu("/system.slice/app.service", 0.5 * dt)
                    node.add_node_cpu(busy_seconds=0.1 * dt, idle_seconds=3.4 * dt)
                self.fed_uj += uj

    def pause(self) -> int:
        with self.lock:
            self.paused.set()
            return self.fed_uj

    def resume(self) -> None:
        self.paused.clear()


def _node(root: Path) -> SimulatedNode:
    node = SimulatedNode(root, cgroup_version=2, vcpus=4)
    node.add_rapl_zone("0", "package-0")
    node.add_unit("/system.slice/app.service")
    boot = node.procfs / "sys" / "kernel" / "random"
    boot.mkdir(parents=True)
    (boot / "boot_id").write_text(BOOT + "\n")
    return node


@dataclass
class Target:
    name: str
    node: SimulatedNode
    port: int
    extra: tuple[str, ...]
    log: Path
    process: ExporterProcess | None = None

    def start(self) -> None:
        self.process = ExporterProcess(self.node, "--web.listen-address",
                                       f"127.0.0.1:{self.port}", *self.extra,
                                       interval=INTERVAL, log_path=self.log)

    def stop(self) -> str:
        assert self.process is not None
        return self.process.stop()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[tuple[Prometheus, list[Target]]]:
    binary = require_tool("prometheus")
    targets = [
        Target("with_state", _node(tmp_path / "a"), free_port(),
               ("--state.file", str(tmp_path / "a-state.json")), tmp_path / "a.log"),
        Target("without_state", _node(tmp_path / "b"), free_port(), (), tmp_path / "b.log"),
    ]
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump({
        # A scrape that times out after kwatt rendered it counts as seen by kwatt but is
        # not stored: the longest timeout keeps a loaded test machine from doing that.
        "global": {"scrape_interval": SCRAPE, "scrape_timeout": SCRAPE},
        "scrape_configs": [{"job_name": "kwatt", "static_configs": [
            {"targets": [f"127.0.0.1:{t.port}" for t in targets]}]}],
    }))
    log = open(tmp_path / "prometheus.log", "w")
    proc = subprocess.Popen(
        [binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{port}"], stdout=log, stderr=subprocess.STDOUT)
    try:
        yield Prometheus(f"http://127.0.0.1:{port}"), targets
    finally:
        proc.terminate()
        proc.wait(timeout=20)
        log.close()
        for target in targets:
            if target.process is not None and target.process.proc.poll() is None:
                target.stop()


def _recorded(prometheus: Prometheus, instance: str, start: float, end: float) -> float:
    """Reset-aware sum of the raw samples in [start, end], as increase() sums them."""
    window = int(end - start) + 1
    result = prometheus.query(f"{SERIES % instance}[{window}s]", at=end)
    assert len(result) == 1, result
    values = [float(v) for t, v in result[0]["values"] if float(t) >= start]
    total = 0.0
    for before, after in itertools.pairwise(values):
        total += after - before if after >= before else after
    return total


def _node_cpu(metrics: str) -> float:
    for line in metrics.splitlines():
        if line.startswith("kwatt_node_energy_joules_total{") and 'component="cpu"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"no node cpu energy in {metrics[:2000]}")


def _settle(prometheus: Prometheus, targets: list[Target],
            timeout: float = 60.0) -> dict[str, float]:
    """While the feed is paused: until every exporter has sampled at rest and Prometheus
    holds that value. Returns each target's timestamp of that at-rest sample (polling,
    not sleeping: a loaded machine only makes it slower)."""
    stamps: dict[str, float] = {}
    for target in targets:
        process = target.process
        assert process is not None
        process.wait_for_cycle()
        process.wait_for_cycle()  # a whole cycle that began after the pause
        at_rest = _node_cpu(process.metrics())  # harmless to the state: nothing changes
        deadline = time.monotonic() + timeout
        while True:
            result = prometheus.query(SERIES % f"127.0.0.1:{target.port}" + "[30s]")
            samples = result[0]["values"] if result else []
            if samples and abs(float(samples[-1][1]) - at_rest) < 1e-6:
                stamps[target.name] = float(samples[-1][0])
                break
            assert time.monotonic() < deadline, (target.name, at_rest, samples[-3:])
            time.sleep(0.2)
    return stamps


def test_restart_with_state_file_loses_under_one_percent_of_the_gap(prometheus) -> None:
    prom, targets = prometheus
    feeder = Feeder([t.node for t in targets])
    feeder.start()
    try:
        for target in targets:
            target.start()
        time.sleep(20)  # a counter well above the gap's energy, so the reset is visible
        fed_before = feeder.pause()
        window_start = _settle(prom, targets)
        feeder.resume()
        time.sleep(3.3)
        for target in targets:
            target.stop()
        stopped = time.monotonic()
        time.sleep(GAP_S)
        for target in targets:
            target.start()
        gap_s = time.monotonic() - stopped  # down time, as seen from outside
        time.sleep(6)
        fed_after = feeder.pause()
        _settle(prom, targets)
        window_end = time.time()
    finally:
        feeder.stop_event.set()
        feeder.join(5)
    fed = (fed_after - fed_before) / 1e6
    gap_j = PACKAGE_W * gap_s
    loss = {}
    for target in targets:
        instance = f"127.0.0.1:{target.port}"
        start = window_start[target.name]
        recorded = _recorded(prom, instance, start, window_end)
        increase = prom.value(f"increase({SERIES % instance}"
                              f"[{int(window_end - start)}s])", at=window_end)
        loss[target.name] = fed - recorded
        print(f"{target.name}: fed {fed:.1f} J, recorded {recorded:.1f} J, "
              f"increase() {increase:.1f} J, lost {fed - recorded:.1f} J = "
              f"{100 * (fed - recorded) / gap_j:.1f}% of the gap's {gap_j:.0f} J "
              f"({gap_s:.1f} s down)")
    logs = {t.name: t.log.read_text() for t in targets}
    assert "restart state restored" in logs["with_state"], logs["with_state"]
    assert abs(loss["with_state"]) <= 0.01 * gap_j, loss
    # Without the file the gap and the first interval after it are lost (and whatever
    # was sampled after the last scrape before the stop).
    assert loss["without_state"] >= gap_j, loss
