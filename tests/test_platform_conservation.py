"""`other` is conserved like every component: containers + unattributed == node."""

from __future__ import annotations

import tempfile
from pathlib import Path

from conftest import FakeClock, node_config
from hwmon_sim import install_hwmon, set_hwmon
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kwatt.attribution import (
    ComponentEnergy,
    ComponentSplit,
    WorkloadActivity,
    active_weights,
    attribute_other,
    platform_remainder,
)
from kwatt.sampler import Sampler
from kwatt.sources.hwmon import build_hwmon_meters
from kwatt.stages.platform import PlatformStage
from kwatt.workloads.naming import HostNamer
from simnode import SimulatedNode, container_id, pod_uid
from test_conservation import _counters, _totals

REL = 1e-9
joules = st.floats(min_value=0, max_value=1e6, allow_nan=False)


@given(
    platform=joules, inside=joules,
    idle=st.one_of(st.none(), joules),
    utilisation=st.floats(min_value=0, max_value=1),
    splits=st.lists(st.tuples(joules, joules, st.lists(joules, max_size=5)), max_size=4),
    requests=st.lists(st.floats(min_value=0, max_value=64), max_size=5),
    policy=st.sampled_from(["unattributed", "even", "cpu-request"]),
)
def test_other_split_conserves_energy(platform, inside, idle, utilisation, splits, requests,
                                      policy) -> None:
    other, shortfall = platform_remainder(platform, inside)
    assert other >= 0 and shortfall >= 0
    assert abs((other - shortfall) - (platform - inside)) <= REL * max(platform, inside, 1.0)
    booked: list[ComponentSplit[int]] = []
    for total, idle_part, shares in splits:
        booked.append(ComponentSplit("cpu", "rapl", total + idle_part + sum(shares),
                                     dict(enumerate(shares)), idle_part, total))
    weights, weights_total = active_weights(booked)
    activities = [WorkloadActivity(i, 1.0, r) for i, r in enumerate(requests)]
    split = attribute_other(ComponentEnergy("other", "hwmon", other, idle), utilisation,
                            weights, weights_total, activities, policy)
    parts = [*split.to_workloads.values(), split.idle, split.system]
    assert all(p >= 0 for p in parts)
    assert abs(sum(parts) - other) <= REL * max(other, 1.0)


step = st.fixed_dictionaries({
    "meter_watts": st.integers(min_value=0, max_value=3000),
    "package": st.floats(min_value=0, max_value=3000),
    "dram": st.floats(min_value=0, max_value=300),
    "cpu": st.lists(st.integers(min_value=0, max_value=800), min_size=4, max_size=4),
    "idle": st.integers(min_value=0, max_value=2000),
    "restart": st.lists(st.integers(min_value=0, max_value=3), max_size=2),
    "dt": st.floats(min_value=0.5, max_value=10),
    "unreadable": st.booleans(),
})


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(step, min_size=1, max_size=8),
       policy=st.sampled_from(["unattributed", "even", "cpu-request"]))
def test_sampler_conserves_other_through_lag_faults_and_churn(steps, policy) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        node = SimulatedNode(Path(tmp), vcpus=8)
        node.add_rapl_zone("0", "package-0")
        node.add_rapl_zone("0:0", "dram")
        install_hwmon(node, "acpi-power-meter")
        config_file = Path(tmp) / "c.yaml"
        config_file.write_text(f"attribution:\n  idle_policy: {policy}\n")
        slots: dict[int, tuple[object, str]] = {}
        serial = 0

        def start(slot: int) -> None:
            nonlocal serial
            serial += 1
            pod = node.add_pod(pod_uid(f"p{serial}"))
            ctr = node.add_container(pod, container_id(f"c{serial}"))
            slots[slot] = (pod, ctr.path)

        for slot in range(4):
            start(slot)
        clock = FakeClock()
        config = node_config(node, "--retention", "24h", "--config", str(config_file))
        sampler = Sampler(config, HostNamer(), clock=clock,
                          platform=PlatformStage(build_hwmon_meters(config, clock), config))
        sampler.sample()
        previous = _counters(sampler.snapshot())
        meter = "hwmon1/device/power1_average"
        for s in steps:
            for slot in s["restart"]:
                node.remove_pod(slots.pop(slot)[0])  # type: ignore[arg-type]
                start(slot)
            for slot, centis in enumerate(s["cpu"]):
                node.add_cpu(slots[slot][1], centis / 100)
            node.add_node_cpu(idle_seconds=s["idle"] / 100)
            node.add_energy("0", s["package"])
            node.add_energy("0:0", s["dram"])
            if s["unreadable"]:
                (node.sysfs / "class" / "hwmon" / meter).write_text("garbage\n")
            else:
                set_hwmon(node, meter, s["meter_watts"] * 1_000_000)
            clock.advance(s["dt"])
            sampler.sample()
            snap = sampler.snapshot()
            for component, parts in _totals(snap).items():
                node_j = parts.get("node", 0.0)
                got = parts.get("containers", 0.0) + parts.get("unattributed", 0.0)
                assert abs(got - node_j) <= REL * max(node_j, 1.0), (component, parts)
            current = _counters(snap)
            for key, value in previous.items():
                if key in current:
                    assert current[key] >= value, key
            previous = current
