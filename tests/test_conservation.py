"""Energy is conserved and counters never go backwards, whatever the inputs."""

from __future__ import annotations

import tempfile
from pathlib import Path

from conftest import FakeClock, node_config
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kwatt.attribution import ComponentEnergy, WorkloadActivity, attribute_component
from kwatt.ledger import LedgerSnapshot
from kwatt.sampler import Sampler
from kwatt.sources.rapl import BOUND_WATTS
from kwatt.workloads.naming import HostNamer
from simnode import SimulatedNode, container_id, pod_uid

REL = 1e-9

joules = st.floats(min_value=0, max_value=1e6, allow_nan=False)
seconds = st.floats(min_value=0, max_value=1e4, allow_nan=False)


@given(
    energy=joules,
    idle=st.one_of(st.none(), joules),
    utilisation=st.floats(min_value=0, max_value=1),
    node_busy=seconds,
    cpu=st.lists(st.tuples(seconds, st.floats(min_value=0, max_value=64)), max_size=40),
    policy=st.sampled_from(["unattributed", "even", "cpu-request"]),
)
def test_split_conserves_energy(energy, idle, utilisation, node_busy, cpu, policy) -> None:
    activities = [WorkloadActivity(i, s, r) for i, (s, r) in enumerate(cpu)]
    split = attribute_component(ComponentEnergy("cpu", "rapl", energy, idle), utilisation,
                                node_busy, activities, policy)
    parts = [*split.to_workloads.values(), split.idle, split.system]
    assert all(p >= 0 for p in parts)
    assert abs(sum(parts) - energy) <= REL * max(energy, 1.0)


def _totals(snap: LedgerSnapshot) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for component, _, j in snap.node_energy:
        out.setdefault(component, {}).setdefault("node", 0.0)
        out[component]["node"] += j
    for row in snap.containers:
        for component, j in row.energy:
            out.setdefault(component, {}).setdefault("containers", 0.0)
            out[component]["containers"] += j
    for component, _, j in snap.unattributed:
        out.setdefault(component, {}).setdefault("unattributed", 0.0)
        out[component]["unattributed"] += j
    for _, component, j in snap.namespace_energy:
        out.setdefault(component, {}).setdefault("namespaces", 0.0)
        out[component]["namespaces"] += j
    return out


def _counters(snap: LedgerSnapshot) -> dict[tuple[object, ...], float]:
    values: dict[tuple[object, ...], float] = {}
    for c, s, j in snap.node_energy:
        values[("node", c, s)] = j
    for z, i, j in snap.zone_energy:
        values[("zone", z, i)] = j
    for n, c, j in snap.namespace_energy:
        values[("ns", n, c)] = j
    for c, r, j in snap.unattributed:
        values[("un", c, r)] = j
    for row in snap.containers:
        for c, j in row.energy:
            values[("ctr", row.labels, c)] = j
    for s, r, n in snap.source_errors:
        values[("err", s, r)] = n
    return values


step = st.fixed_dictionaries({
    "package": st.floats(min_value=0, max_value=5000),
    "dram": st.floats(min_value=0, max_value=500),
    "cpu": st.lists(st.integers(min_value=0, max_value=800), min_size=6, max_size=6),
    "system": st.integers(min_value=0, max_value=200),
    "idle": st.integers(min_value=0, max_value=2000),
    "start": st.lists(st.integers(min_value=0, max_value=5), max_size=2),
    "stop": st.lists(st.integers(min_value=0, max_value=5), max_size=2),
    "dt": st.floats(min_value=0.5, max_value=30),
    # What the package counter's file says this interval instead of its true value.
    "glitch": st.sampled_from([None, None, "below", "truncated", "huge", "zero"]),
})

GLITCHES = {"below": lambda v: str(max(v - 1, 0)), "truncated": lambda v: str(v)[:3],
            "huge": lambda v: "1" + "0" * 26, "zero": lambda v: "0"}


def _rapl_joules(snap: LedgerSnapshot) -> dict[str, float]:
    out = {f"zone {z}": j for z, _, j in snap.zone_energy}
    for component, source, j in snap.node_energy:
        if source == "rapl":
            out[component] = j
    return out


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=8),
       version=st.sampled_from([1, 2]), driver=st.sampled_from(["systemd", "cgroupfs"]),
       small_range=st.booleans())
def test_sampler_conserves_energy_through_wraps_and_churn(steps, version, driver,
                                                          small_range) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        node = SimulatedNode(Path(tmp), cgroup_version=version, driver=driver, vcpus=8)
        # A small range makes several steps wrap the counter.
        max_range = 7_000_000_000 if small_range else 262_143_328_850
        node.add_rapl_zone("0", "package-0", max_range_uj=max_range, energy_uj=max_range - 10)
        node.add_rapl_zone("0:0", "dram", max_range_uj=max_range)
        slots: dict[int, tuple[object, str]] = {}
        serial = 0

        def start(slot: int) -> None:
            nonlocal serial
            serial += 1
            pod = node.add_pod(pod_uid(f"p{serial}"), ["guaranteed", "burstable",
                                                       "besteffort"][serial % 3],
                               ["containerd", "cri-o", "docker"][serial % 3])
            ctr = node.add_container(pod, container_id(f"c{serial}"))
            slots[slot] = (pod, ctr.path)

        for slot in range(3):
            start(slot)
        clock = FakeClock()
        sampler = Sampler(node_config(node, "--retention", "24h"), HostNamer(), clock=clock)
        sampler.sample()
        previous = _counters(sampler.snapshot())
        for s in steps:
            for slot in s["stop"]:
                if slot in slots:
                    pod, _ = slots.pop(slot)
                    node.remove_pod(pod)  # type: ignore[arg-type]
            for slot in s["start"]:
                if slot not in slots:
                    start(slot)
            for slot, centis in zip(range(6), s["cpu"], strict=True):
                if slot in slots:
                    node.add_cpu(slots[slot][1], centis / 100)
            node.add_node_cpu(busy_seconds=s["system"] / 100, idle_seconds=s["idle"] / 100)
            node.add_energy("0", s["package"])
            node.add_energy("0:0", s["dram"])
            if s["glitch"] is not None:
                node.set_zone_content("0", GLITCHES[s["glitch"]](node.zones["0"].energy_uj))
            clock.advance(s["dt"])
            before = _rapl_joules(sampler.snapshot())
            sampler.sample()
            snap = sampler.snapshot()
            # Whatever the counters said, no interval books more than the ceiling allows.
            ceiling = {"cpu": BOUND_WATTS["package"], "zone package-0": BOUND_WATTS["package"],
                       "dram": BOUND_WATTS["dram"], "zone dram-0": BOUND_WATTS["dram"]}
            for key, joules in _rapl_joules(snap).items():
                assert joules - before.get(key, 0.0) <= ceiling[key] * s["dt"] * (1 + REL), key
            for component, parts in _totals(snap).items():
                node_j = parts.get("node", 0.0)
                got = parts.get("containers", 0.0) + parts.get("unattributed", 0.0)
                assert abs(got - node_j) <= REL * max(node_j, 1.0), (component, parts)
                unnamed = sampler.ledger.unnamed_energy().get(component, 0.0)
                assert abs(parts.get("namespaces", 0.0) + unnamed
                           - parts.get("containers", 0.0)) <= REL * max(node_j, 1.0)
            current = _counters(snap)
            for key, value in previous.items():
                if key in current:
                    assert current[key] >= value, key
            previous = current
