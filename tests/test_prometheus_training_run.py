"""A training run's kWh as one increase() over one series, seen by a real Prometheus.

A TrainJob (TrainJob -> JobSet -> Job -> Pod, served by the fake API server and named by
the real owner resolver) runs for six simulated hours: two worker pods whose containers
restart every 40 minutes, pods replaced every 2 hours, and a 4-second checkpoint pod every
minute. A Deployment runs beside it. The real ledger books each container's energy
every 5 s cycle; every 30 s the real exposition is rendered and timestamped into
OpenMetrics, ``promtool tsdb create-blocks-from openmetrics`` makes TSDB blocks of it, and
the real Prometheus answers: increase() of the run's workload counter over the run must
equal the energy its containers were attributed, within 1%.
"""

from __future__ import annotations

import random
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import require_tool
from fake_kube_api import FakeKubeApi, make_pod, owner_uid, write_kubeconfig
from kubetest import kube_config
from kwatt.ledger import EnergyLedger, WorkloadLabels
from kwatt.metrics import KwattCollector, StaticInfo
from kwatt.workloads.kubernetes import api_client_for
from kwatt.workloads.podindex import pod_record
from kwatt.workloads.podwatch import DEFAULT_WATCH_SETTINGS, ApiOwnerResolver
from prometheus_client import CollectorRegistry
from prometheus_client.openmetrics.exposition import generate_latest
from prometheus_client.registry import Collector
from tsdb_prometheus import OpenMetricsRecording, TsdbPrometheus

pytestmark = pytest.mark.slow

NS = "ml"
RUN = "llama-ft-0412"
RUN_S = 6 * 3600
WARMUP_S = 600
CYCLE_S = 5
SCRAPE_S = 30
FAMILIES = ("kwatt_container_energy_joules", "kwatt_workload_energy_joules")


class Only(Collector):
    def __init__(self, inner: KwattCollector) -> None:
        self.inner = inner

    def collect(self) -> Iterator[Any]:
        return (family for family in self.inner.collect() if family.name in FAMILIES)


@dataclass
class Container:
    key: str
    labels: WorkloadLabels
    start: float
    end: float
    watts: float
    booked_until: float


def resolved_labels(api: FakeKubeApi, url: str, tmp_path: Path) -> dict[str, WorkloadLabels]:
    """pod name -> labels of its 'main' container, resolved by the real owner resolver
    against the fake API (metadata-only owner GETs)."""
    config = kube_config(write_kubeconfig(tmp_path / "kubeconfig", url))
    resolver = ApiOwnerResolver(api_client_for(config), DEFAULT_WATCH_SETTINGS, time.monotonic,
                                lambda fault: None)
    out: dict[str, WorkloadLabels] = {}
    for pod in api.pods.values():
        record = pod_record(pod, resolver, ())
        assert record is not None
        out[record.name] = WorkloadLabels(record.namespace, record.name, "main",
                                          record.workload, record.workload_kind)
    return out


def the_run(start: int, rng: random.Random) -> list[tuple[str, str, float, float, float]]:
    """(pod, job, start, end, watts) of every container instance of the run."""
    pieces: list[tuple[str, str, float, float, float]] = []
    run_start = start + WARMUP_S
    for worker in range(2):
        job = f"{RUN}-node-{worker}"
        for generation in range(RUN_S // 7200):  # the Job replaces its pod every 2 h
            pod = f"{job}-0-g{generation}"
            pod_start = run_start + generation * 7200
            for restart in range(3):  # the container restarts every 40 min
                begin = pod_start + restart * 2400 + (5 if restart else 0)
                pieces.append((pod, job, float(begin), float(pod_start + (restart + 1) * 2400),
                               rng.uniform(250.0, 350.0)))
    for index in range(RUN_S // 60):  # a 4 s checkpoint pod every minute
        begin = run_start + index * 60 + rng.uniform(0, 30)
        pieces.append((f"{RUN}-ckpt-0-c{index}", f"{RUN}-ckpt-0", begin, begin + 4.0, 400.0))
    return pieces


def simulate(out: Path, start: int, labels: dict[str, WorkloadLabels],
             pieces: list[tuple[str, str, float, float, float]]
             ) -> tuple[float, float, float]:
    """Write the scrapes to ``out``; return (last scrape, joules booked to the run's
    containers, of which to its 4-second pods)."""
    ledger = EnergyLedger(300.0, 10000)
    snap = ledger.snapshot()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Only(KwattCollector(lambda: snap, StaticInfo(
        "gpu-node-7", CYCLE_S, None, None, "", 1.0))))
    containers = [Container(f"{pod}#{i}", labels[pod], begin, end, watts, begin)
                  for i, (pod, _, begin, end, watts) in enumerate(pieces)]
    web = WorkloadLabels("serving", "api-7d9f-abcde", "api", "api", "Deployment")
    containers.append(Container("api", web, start, start + WARMUP_S + RUN_S + 1800, 50.0,
                                float(start)))
    recording = OpenMetricsRecording()
    booked_run = booked_short = 0.0
    end = float(start + WARMUP_S + RUN_S + 1800)
    now = float(start)
    step = 0
    while now < end:
        step += 1
        now = float(start + step * CYCLE_S)
        present: dict[object, WorkloadLabels | None] = {}
        for c in containers:
            # A container is seen by a cycle only while its cgroup exists at that sample.
            if c.start <= now <= c.end:
                joules = c.watts * (now - c.booked_until)
                c.booked_until = now
                for component, share in (("gpu", 0.8), ("cpu", 0.2)):
                    ledger.add_workload(c.key, component, joules * share)
                if c.labels.workload == RUN:
                    booked_run += joules
                    if c.end - c.start <= 4.0:
                        booked_short += joules
                present[c.key] = c.labels
        ledger.observe_workloads(present, now)
        snap = ledger.snapshot()
        if step % (SCRAPE_S // CYCLE_S):
            continue
        recording.add(generate_latest(registry).decode(), now)
    recording.write(out)
    return now, booked_run, booked_short


def test_a_training_runs_kwh_is_one_increase_over_one_series(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    prometheus = require_tool("prometheus")
    start = (int(time.time()) // 3600 - 12) * 3600
    rng = random.Random(4)
    pieces = the_run(start, rng)
    api = FakeKubeApi()
    api.add_owner("TrainJob", RUN, NS)
    api.add_owner("JobSet", RUN, NS, owner=("TrainJob", RUN, owner_uid("TrainJob", RUN, NS)))
    for job in {job for _, job, _, _, _ in pieces}:
        api.add_owner("Job", job, NS, owner=("JobSet", RUN, owner_uid("JobSet", RUN, NS)))
    for pod in {(pod, job) for pod, job, _, _, _ in pieces}:
        api.add(make_pod(pod[0], namespace=NS, node="gpu-node-7",
                         owner=("Job", pod[1], owner_uid("Job", pod[1], NS)),
                         labels={"jobset.sigs.k8s.io/jobset-name": RUN}))
    with api.serve() as url:
        labels = resolved_labels(api, url, tmp_path)
    assert {(v.workload, v.workload_kind) for v in labels.values()} == {(RUN, "TrainJob")}
    exposition = tmp_path / "run.om.txt"
    end, booked, booked_short = simulate(exposition, start, labels, pieces)
    short = [p for p in pieces if p[3] - p[2] <= 4.0]
    assert len(short) == RUN_S // 60 and booked > 0
    tsdb = tmp_path / "tsdb"
    subprocess.run([promtool, "tsdb", "create-blocks-from", "openmetrics", str(exposition),
                    str(tsdb)], check=True, capture_output=True, timeout=300)
    run_end = start + WARMUP_S + RUN_S
    window = f"{RUN_S + 600}s"  # the run, plus slack on both sides: the series is the run
    selector = f'{{workload="{RUN}",workload_kind="TrainJob"}}'
    server = TsdbPrometheus(prometheus, tsdb, tmp_path, None)
    try:
        at = run_end + 300
        series = server.value(f"count(kwatt_workload_energy_joules_total{selector})", at)
        workload = server.value("sum(increase(kwatt_workload_energy_joules_total"
                                f"{selector}[{window}]))", at)
        per_container = server.value("sum(increase(kwatt_container_energy_joules_total"
                                     f"{selector}[{window}]))", at)
    finally:
        server.stop()
    print(f"run booked {booked / 3.6e6:.3f} kWh ({100 * booked_short / booked:.1f}% in "
          f"4-second pods); increase() over the workload counter "
          f"{workload / 3.6e6:.3f} kWh ({100 * workload / booked:.3f}%), over container "
          f"series {100 * per_container / booked:.3f}%; end {end:.0f}")
    assert series == 2  # one series per component (cpu, gpu) for the whole run
    assert abs(workload / booked - 1) <= 0.01
    # The 4-second pods carry a visible share, which per-container series lose (a new
    # series' first sample is never counted by increase()); the workload counter keeps it.
    assert booked_short / booked > 0.01
    assert per_container / booked < 1 - booked_short / booked / 2
