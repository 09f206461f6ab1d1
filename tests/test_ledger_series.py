"""What Prometheus sees of the ledger: one series per label set, counters that never go
backwards, workload counters that outlive their pods, and a retained count that matches
what is exposed. Rendered through the real collector and parsed by prometheus_client."""

from __future__ import annotations

from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kwatt.ledger import EnergyLedger, LedgerSnapshot, WorkloadLabels
from kwatt.metrics import KwattCollector, StaticInfo
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

WEB = WorkloadLabels("shop", "web-0", "app", "web", "StatefulSet")
OTHER = WorkloadLabels("shop", "web-1", "app", "web", "StatefulSet")
RETENTION = 300.0


def render(snap: LedgerSnapshot) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The exposition of one snapshot, as Prometheus would parse it: family -> samples."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KwattCollector(lambda: snap, StaticInfo("n", 5.0, None, None, "", 1.0)))
    text = generate_latest(registry).decode()
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def container_values(snap: LedgerSnapshot) -> list[tuple[tuple[str, ...], float]]:
    return [(tuple(labels[k] for k in ("namespace", "pod", "container", "workload",
                                       "workload_kind", "component")), value)
            for labels, value in render(snap).get("kwatt_container_energy_joules_total", [])]


def workload_values(snap: LedgerSnapshot) -> dict[tuple[str, ...], float]:
    samples = render(snap).get("kwatt_workload_energy_joules_total", [])
    return {tuple(labels[k] for k in ("namespace", "workload", "workload_kind", "component")):
            value for labels, value in samples}


def retained(snap: LedgerSnapshot) -> float:
    ((_, value),) = render(snap)["kwatt_retained_containers"]
    return value


def cycle(ledger: EnergyLedger, now: float,
          present: dict[Hashable, tuple[WorkloadLabels | None, float]]) -> LedgerSnapshot:
    """One sampler cycle as the sampler books it: energy first, then who is present."""
    for key, (_, joules) in present.items():
        ledger.add_workload(key, "cpu", joules)
    ledger.observe_workloads({k: name for k, (name, _) in present.items()}, now)
    return ledger.snapshot()


def test_restarted_container_is_one_series_that_never_goes_backwards() -> None:
    """A restart gives the container a new cgroup (new id) under the same labels. Two
    series with identical labels would make Prometheus keep one, then see a false reset."""
    ledger = EnergyLedger(RETENTION, 100)
    seen: list[float] = []
    now = 0.0
    for _ in range(3):
        now += 5
        snap = cycle(ledger, now, {"old-id": (WEB, 10.0)})
    seen.append(30.0)
    for step in range(80):  # the restart, then past the old account's retention
        now += 5
        snap = cycle(ledger, now, {"new-id": (WEB, 1.0)})
        values = container_values(snap)
        assert len(values) == 1, values  # one series per label set
        assert values[0][1] >= seen[-1], (step, values, seen[-1])
        seen.append(values[0][1])
    assert seen[-1] == 30.0 + 80.0  # the old container's energy is carried, never dropped


def test_two_accounts_with_one_label_set_are_summed_and_late_rename_keeps_it_monotonic(
        ) -> None:
    ledger = EnergyLedger(RETENTION, 100)
    snap = cycle(ledger, 5, {"a": (WEB, 10.0), "b": (WEB, 5.0)})
    assert container_values(snap) == [(("shop", "web-0", "app", "web", "StatefulSet", "cpu"),
                                       15.0)]
    # "b" turns out to be another pod (its name resolved late): it moves on, WEB keeps
    # what it has shown, and the energy is not shown twice in the new series. This cycle's
    # energy was booked before the new name was known.
    snap = cycle(ledger, 10, {"a": (WEB, 1.0), "b": (OTHER, 2.0)})
    assert dict(container_values(snap)) == {
        ("shop", "web-0", "app", "web", "StatefulSet", "cpu"): 18.0}
    snap = cycle(ledger, 15, {"a": (WEB, 1.0), "b": (OTHER, 2.0)})
    values = dict(container_values(snap))
    assert values == {("shop", "web-0", "app", "web", "StatefulSet", "cpu"): 19.0,
                      ("shop", "web-1", "app", "web", "StatefulSet", "cpu"): 2.0}
    # The namespace counter and the container series agree on the total.
    assert dict(((n, c), j) for n, c, j in snap.namespace_energy)[("shop", "cpu")] == 21.0


def test_workload_counter_outlives_its_pods() -> None:
    """A CronJob's pods come and go; its workload series stays, so increase() sees each
    pod's energy as growth of an existing series instead of a new series' first sample."""
    ledger = EnergyLedger(RETENTION, 100)
    job = "nightly"
    now = 0.0
    total = 0.0
    for run in range(5):
        labels = WorkloadLabels("batch", f"{job}-{run}", "main", job, "CronJob")
        for _ in range(2):
            now += 5
            cycle(ledger, now, {f"pod-{run}": (labels, 7.0)})
            total += 7.0
        for _ in range(100):  # 500 s between runs: longer than the container retention
            now += 5
            snap = cycle(ledger, now, {})
        assert container_values(snap) == []  # the pod's series expired
        assert workload_values(snap) == {("batch", job, "CronJob", "cpu"): total}


def test_energy_held_before_a_name_lands_on_the_workload_counter() -> None:
    ledger = EnergyLedger(RETENTION, 100)
    labels = WorkloadLabels("batch", "j-1", "main", "j", "Job")
    cycle(ledger, 5, {"p": (None, 4.0)})
    snap = cycle(ledger, 10, {"p": (labels, 1.0)})
    assert workload_values(snap) == {("batch", "j", "Job", "cpu"): 5.0}


def test_workload_counters_are_capped_and_expire_after_their_retention() -> None:
    ledger = EnergyLedger(RETENTION, 100, workload_retention_seconds=1000.0,
                          max_workloads=3)
    now = 0.0
    for index in range(5):
        now += 5
        labels = WorkloadLabels("ns", f"p{index}", "c", f"w{index}", "Pod")
        snap = cycle(ledger, now, {index: (labels, 1.0)})
    names = sorted(w for _, w, _, _ in workload_values(snap))
    assert names == ["w2", "w3", "w4"]  # the most recently active ones
    now += 1001
    snap = cycle(ledger, now, {})
    assert workload_values(snap) == {}


def test_retained_containers_counts_exposed_finished_series_only() -> None:
    ledger = EnergyLedger(RETENTION, 100)
    cycle(ledger, 5, {"named": (WEB, 3.0), "unnamed": (None, 2.0), "idle": (OTHER, 0.0),
                      "restarted": (OTHER, 0.0)})
    snap = cycle(ledger, 10, {"restarted-new": (WorkloadLabels(
        "shop", "web-1", "app", "web", "StatefulSet"), 1.0)})
    # Exposed: WEB (finished) and web-1 (running again under a new id). Not exposed: the
    # unnamed account (held by id) and the one that never used energy.
    assert len(container_values(snap)) == 2
    assert retained(snap) == 1


NAMES = [WorkloadLabels(ns, pod, c, wl, "Deployment") for ns in ("a", "b")
         for pod, wl in (("p1", "w1"), ("p2", "w1"), ("p3", "w2")) for c in ("x", "y")]


@given(st.lists(st.dictionaries(
    st.integers(0, 7),
    st.tuples(st.one_of(st.none(), st.sampled_from(NAMES)),
              st.floats(0, 100, allow_nan=False)), max_size=6), min_size=1, max_size=40),
    st.floats(1, 200))
@settings(max_examples=200, deadline=None)
def test_exposed_counters_are_unique_and_never_go_backwards(cycles, step) -> None:
    """Any sequence of accounts appearing, going, being named and renamed onto shared label
    sets: every exposed label set appears once, no exposed counter decreases, and the
    workload and namespace counters hold all named energy."""
    ledger = EnergyLedger(60.0, 3)
    last: dict[tuple[str, ...], float] = {}
    now = 0.0
    for present in cycles:
        now += step
        snap = cycle(ledger, now, present)
        values = container_values(snap)
        assert len({labels for labels, _ in values}) == len(values)
        for labels, value in values:
            assert value >= last.get(labels, 0.0) - 1e-9
        last = dict(values)
        namespaces = sum(j for _, _, j in snap.namespace_energy)
        workloads = sum(j for *_, j in snap.workload_energy)
        assert workloads == pytest.approx(namespaces, abs=1e-6)
