"""--metrics.level: the exporter aggregates before exposing; energy is conserved at every
level, aggregated series never go backwards, and the real CLI exposes the coarser labels."""

from __future__ import annotations

from collections.abc import Hashable
from pathlib import Path

from exporter_process import ExporterProcess
from hypothesis import given, settings
from hypothesis import strategies as st
from kwatt.ledger import METRIC_LEVELS, EnergyLedger, WorkloadLabels, project_labels
from prometheus_client.parser import text_string_to_metric_families
from simnode import SimulatedNode, container_id, pod_uid
from test_ledger_series import container_values, cycle, workload_values

NAMES = st.builds(WorkloadLabels, st.sampled_from(["shop", "ml", ""]),
                  st.sampled_from(["web-0", "web-1", "train-0"]),
                  st.sampled_from(["app", "sidecar", "POD"]),
                  st.sampled_from(["web", "train", ""]),
                  st.sampled_from(["Deployment", "Job", ""]))
CYCLES = st.lists(st.dictionaries(st.integers(0, 7),
                                  st.tuples(NAMES, st.floats(0.0, 50.0)), max_size=6),
                  min_size=1, max_size=6)


def _totals(rows: list[tuple[tuple[str, ...], float]]) -> dict[tuple[str, ...], float]:
    out: dict[tuple[str, ...], float] = {}
    for labels, value in rows:
        out[labels] = out.get(labels, 0.0) + value
    return out


@settings(max_examples=60, deadline=None)
@given(CYCLES)
def test_every_level_conserves_energy_and_is_the_sum_of_the_finer_series(
        cycles: list[dict[int, tuple[WorkloadLabels, float]]]) -> None:
    # Keys keep the name they first had (a container's labels do not change).
    names: dict[int, WorkloadLabels] = {}
    for step in cycles:
        for key, (name, _) in step.items():
            names.setdefault(key, name)
    ledgers = {level: EnergyLedger(1e9, 10000, level=level) for level in METRIC_LEVELS}
    snaps = {}
    for level, ledger in ledgers.items():
        for index, step in enumerate(cycles):
            present: dict[Hashable, tuple[WorkloadLabels | None, float]] = {
                key: (names[key], joules) for key, (_, joules) in step.items()}
            snaps[level] = cycle(ledger, 10.0 * index, present)
    finest = container_values(snaps["container"])
    booked = sum(j for step in cycles for _, j in step.values())
    for level in METRIC_LEVELS:
        rows = container_values(snaps[level])
        assert abs(sum(v for _, v in rows) - booked) <= 1e-6 * max(booked, 1.0)
        # Each aggregated series is exactly the sum of the container series it stands for.
        want: dict[tuple[str, ...], float] = {}
        for labels, value in finest:
            projected = project_labels(WorkloadLabels(*labels[:5]), level)
            key = (projected.namespace, projected.pod, projected.container,
                   projected.workload, projected.workload_kind, labels[5])
            want[key] = want.get(key, 0.0) + value
        got = _totals(rows)
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert abs(got[key] - value) <= 1e-6 * max(value, 1.0)
        assert len(rows) == len(got)  # one series per label set
        assert snaps[level].namespace_energy == snaps["container"].namespace_energy
        workloads = workload_values(snaps[level])
        assert abs(sum(workloads.values()) - booked) <= 1e-6 * max(booked, 1.0)


def test_a_pod_series_does_not_go_backwards_when_a_container_ages_out() -> None:
    ledger = EnergyLedger(30.0, 10000, level="pod")
    first = WorkloadLabels("shop", "web-0", "init", "web", "Deployment")
    main = WorkloadLabels("shop", "web-0", "app", "web", "Deployment")
    cycle(ledger, 0.0, {1: (first, 5.0), 2: (main, 1.0)})
    values = []
    for step in range(1, 12):  # the init container is gone; retention 30 s passes
        snap = cycle(ledger, 10.0 * step, {2: (main, 1.0)})
        ((labels, value),) = container_values(snap)
        assert labels[:3] == ("shop", "web-0", "")
        values.append(value)
    assert values == sorted(values) and values[-1] == 5.0 + 12 * 1.0


def test_cli_exposes_pod_level_series(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node")
    node.add_intel_server_zones(sockets=1)
    pods = [node.add_pod(pod_uid(f"p{i}"), "burstable") for i in range(2)]
    paths = [node.add_container(pod, container_id(f"p{i}-c{j}")).path
             for i, pod in enumerate(pods) for j in range(3)]
    exporter = ExporterProcess(node, "--metrics.level=pod", interval="200ms")
    try:
        count = exporter.wait_for_cycle(after=0)
        for path in paths:
            node.add_cpu(path, 0.5)
        node.add_node_cpu(busy_seconds=4, idle_seconds=4)
        node.add_energy("0", 40.0)
        exporter.wait_for_cycle(after=count + 1)
        text = exporter.metrics()
    finally:
        exporter.stop()
    samples = [s for f in text_string_to_metric_families(text)
               if f.name == "kwatt_container_energy_joules" for s in f.samples]
    assert samples
    assert {s.labels["container"] for s in samples} == {""}
    per_pod = [(s.labels["pod"], s.labels["component"]) for s in samples]
    assert sorted(per_pod) == sorted(set(per_pod))  # one series per pod and component
    assert {pod for pod, _ in per_pod} == {pod_uid(f"p{i}") for i in range(2)}
