"""A day of short-lived pods, seen by a real Prometheus: does increase() recover their energy?

The real ledger and collector run through a simulated day (fake clock, 5 s cycles) of one
new pod per second, each living a few seconds, in three workloads. Every 30 s the real
exposition is rendered and timestamped into OpenMetrics; ``promtool tsdb
create-blocks-from openmetrics`` turns it into TSDB blocks and the real Prometheus answers
the shipped recording rules' expressions over them. The workload and namespace views must
recover at least 99% of the energy booked in the day; the per-container view shows why the
workload rules do not use it (a new series' first sample is never counted by increase()).
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_tool
from dashboard_model import RULES_FILE
from kwatt.ledger import EnergyLedger, WorkloadLabels
from kwatt.metrics import KwattCollector, StaticInfo
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.registry import Collector
from tsdb_prometheus import OpenMetricsRecording, TsdbPrometheus

pytestmark = pytest.mark.slow

HOURS = 24  # the window the daily rules look at
WARMUP_S = 600  # history before the window, so every series is known when it opens
CYCLE_S = 5
SCRAPE_S = 30
POD_WATTS = 10.0
WORKLOADS = (("batch", "etl", "CronJob"), ("batch", "report", "CronJob"),
             ("web", "api", "Deployment"))
FAMILIES = ("kwatt_container_energy_joules", "kwatt_workload_energy_joules",
            "kwatt_namespace_energy_joules")


class Only(Collector):
    def __init__(self, inner: KwattCollector) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Any]:
        return (family for family in self.inner.collect() if family.name in FAMILIES)


def rule_expr(record: str) -> str:
    rules = yaml.safe_load(RULES_FILE.read_text())
    return next(r["expr"] for g in rules["groups"] for r in g["rules"]
                if r.get("record") == record)


def simulate(out: Path, start: int) -> tuple[float, dict[float, float]]:
    """Write the day's scrapes to ``out``; return the last scrape time and the energy
    booked up to each scrape time."""
    rng = random.Random(12)
    ledger = EnergyLedger(300.0, 10000)
    snap = ledger.snapshot()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Only(KwattCollector(lambda: snap, StaticInfo(
        "sim", CYCLE_S, None, None, "", 1.0))))
    recording = OpenMetricsRecording()
    booked = 0.0
    booked_at: dict[float, float] = {}
    pods: list[tuple[float, float, str, WorkloadLabels]] = []  # start, end, key, labels
    seen: dict[str, float] = {}  # key -> when its energy was last booked
    total_s = HOURS * 3600 + WARMUP_S
    now = float(start)
    for step in range(1, total_s // CYCLE_S + 1):
        previous, now = now, float(start + step * CYCLE_S)
        for second in range(int(previous), int(now)):  # one new pod per second
            namespace, workload, kind = WORKLOADS[second % len(WORKLOADS)]
            life = rng.uniform(2.0, 6.0)
            pod = f"{workload}-{second}"
            pods.append((float(second), second + life, pod,
                         WorkloadLabels(namespace, pod, "main", workload, kind)))
        present: dict[object, WorkloadLabels | None] = {}
        for pod_start, pod_end, key, labels in pods:
            if pod_start <= now <= pod_end:
                joules = POD_WATTS * (now - seen.get(key, pod_start))
                seen[key] = now
                ledger.add_workload(key, "cpu", joules)
                booked += joules
                present[key] = labels
        pods = [p for p in pods if p[1] >= now]
        ledger.observe_workloads(present, now)
        snap = ledger.snapshot()
        if step % (SCRAPE_S // CYCLE_S) == 0:
            booked_at[now] = booked
            recording.add(generate_latest(registry).decode(), now)
    recording.write(out)
    return now, booked_at


def test_a_day_of_short_lived_pods_is_recovered_by_increase(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    prometheus = require_tool("prometheus")
    # Whole hours, a few days back: inside Prometheus' default 15 d retention.
    start = (int(time.time()) // 3600 - HOURS - 4) * 3600
    exposition = tmp_path / "day.om.txt"
    end, booked_at = simulate(exposition, start)
    booked = booked_at[end] - booked_at[end - HOURS * 3600]
    tsdb = tmp_path / "tsdb"
    subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(exposition),
                    str(tsdb)], check=True, capture_output=True, timeout=300)
    prometheus_server = TsdbPrometheus(prometheus, tsdb, tmp_path, None)
    try:
        views = {
            "workload": prometheus_server.value("sum(" + rule_expr(
                "workload:kwatt_energy_joules:increase1d") + ")", end),
            "namespace": prometheus_server.value("sum(" + rule_expr(
                "node_namespace:kwatt_energy_joules:increase1d") + ")", end),
            "container": prometheus_server.value(
                "sum(increase(kwatt_container_energy_joules_total[1d]))", end),
        }
    finally:
        prometheus_server.stop()
    recovered = {view: value / booked for view, value in views.items()}
    print(f"booked {booked:.0f} J in {HOURS} h; recovered by increase() at a {SCRAPE_S} s "
          "scrape: " + ", ".join(f"{v} {100 * r:.3f}%" for v, r in recovered.items()))
    assert 0.99 <= recovered["workload"] <= 1.01
    assert 0.99 <= recovered["namespace"] <= 1.01
    # Why the workload rules moved off container series: most of it is lost there.
    assert recovered["container"] < 0.5
