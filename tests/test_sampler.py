"""The sampler on a simulated node: exact joules for hand-computed scenarios."""

from __future__ import annotations

import pytest
from conftest import FakeClock, node_config
from kwatt.ledger import LedgerSnapshot, WorkloadLabels
from kwatt.sampler import Sampler
from kwatt.workloads.naming import HostNamer
from simnode import SimulatedNode, container_id, pod_uid


def _containers(snap: LedgerSnapshot) -> dict[tuple[str, str], dict[str, float]]:
    return {(r.labels.pod, r.labels.container): dict(r.energy) for r in snap.containers}


def _unattributed(snap: LedgerSnapshot) -> dict[tuple[str, str], float]:
    return {(c, r): j for c, r, j in snap.unattributed}


def _node(snap: LedgerSnapshot) -> dict[tuple[str, str], float]:
    return {(c, s): j for c, s, j in snap.node_energy}


def test_rapl_energy_split_by_cpu_time(sim, clock: FakeClock) -> None:
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    node.add_rapl_zone("0:0", "core")
    node.add_rapl_zone("0:1", "dram")
    pod = node.add_pod(pod_uid("a"), "burstable", "containerd")
    web = node.add_container(pod, container_id("web"))
    db = node.add_container(pod, container_id("db"))
    sampler = Sampler(node_config(node), HostNamer(), clock=clock)
    sampler.sample()

    # 10 s interval on 4 vCPUs = 40 s of CPU: 20 busy (web 12, db 4, system 4), 20 idle.
    node.add_cpu(web.path, 12)
    node.add_cpu(db.path, 4)
    node.add_node_cpu(busy_seconds=4, idle_seconds=20)
    node.add_energy("0", 200.0)
    node.add_energy("0:0", 150.0)
    node.add_energy("0:1", 40.0)
    clock.advance(10)
    sampler.sample()
    snap = sampler.snapshot()

    assert _node(snap) == {("cpu", "rapl"): 200.0, ("dram", "rapl"): 40.0}
    # No idle baseline yet: active = E * u = E * 0.5; shares 12/20, 4/20, system 4/20.
    got = _containers(snap)
    assert got[(pod.uid, web.container_id[:12])] == pytest.approx({"cpu": 60.0, "dram": 12.0})
    assert got[(pod.uid, db.container_id[:12])] == pytest.approx({"cpu": 20.0, "dram": 4.0})
    unattributed = _unattributed(snap)
    assert unattributed[("cpu", "idle")] == pytest.approx(100.0)
    assert unattributed[("cpu", "system")] == pytest.approx(20.0)
    assert unattributed[("dram", "idle")] == pytest.approx(20.0)
    zones = {(z, i): j for z, i, j in snap.zone_energy}
    assert zones == {("package-0", "0"): 200.0, ("core-0", "0:0"): 150.0,
                     ("dram-0", "0:1"): 40.0}
    power = {(c, s): w for c, s, w in snap.node_power}
    assert power == {("cpu", "rapl"): 20.0, ("dram", "rapl"): 4.0}


def test_wrapped_counter_is_corrected(sim, clock: FakeClock) -> None:
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0", max_range_uj=1_000_000_000, energy_uj=999_000_000)
    sampler = Sampler(node_config(node), HostNamer(), clock=clock)
    sampler.sample()
    node.add_node_cpu(busy_seconds=1, idle_seconds=1)
    node.add_energy("0", 5.0)  # 999 J + 5 J wraps past 1000 J to 4 J
    assert node.zones["0"].energy_uj < 999_000_000
    clock.advance(1)
    sampler.sample()
    assert _node(sampler.snapshot())[("cpu", "rapl")] == pytest.approx(5.0, abs=1e-6)


def test_configured_idle_baseline_and_even_idle_policy(sim, clock: FakeClock) -> None:
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    pod = node.add_pod(pod_uid("p"), "guaranteed", "cri-o")
    a = node.add_container(pod, container_id("a"))
    b = node.add_container(pod, container_id("b"))
    config = node_config(node, env={"KWATT_ATTRIBUTION_IDLE_WATTS_CPU": "5",
                                    "KWATT_ATTRIBUTION_IDLE_POLICY": "even"})
    sampler = Sampler(config, HostNamer(), clock=clock)
    sampler.sample()
    node.add_cpu(a.path, 3)
    node.add_cpu(b.path, 1)
    node.add_node_cpu(idle_seconds=36)
    node.add_energy("0", 90.0)
    clock.advance(10)
    sampler.sample()
    snap = sampler.snapshot()
    # idle = 5 W * 10 s = 50 J, split evenly over the 3 workloads (a, b and the pod
    # sandbox); active 40 J split 3:1 over a and b, nothing left for system.
    got = _containers(snap)
    assert got[(pod.uid, a.container_id[:12])]["cpu"] == pytest.approx(30 + 50 / 3)
    assert got[(pod.uid, b.container_id[:12])]["cpu"] == pytest.approx(10 + 50 / 3)
    assert got[(pod.uid, "POD")]["cpu"] == pytest.approx(50 / 3)
    assert _unattributed(snap)[("cpu", "idle")] == 0.0


def test_estimated_when_no_rapl(sim, clock: FakeClock) -> None:
    node: SimulatedNode = sim(vcpus=2)
    svc = node.add_unit("/system.slice/nginx.service")
    sampler = Sampler(node_config(node), HostNamer(), clock=clock)
    sampler.sample()
    node.add_cpu(svc, 5)
    node.add_node_cpu(idle_seconds=15)  # u = 5 / 20 = 0.25
    clock.advance(10)
    sampler.sample()
    snap = sampler.snapshot()
    # P = 2 * (0.74 + (3.5 - 0.74) * 0.25) = 2.86 W; idle 1.48 W; 10 s.
    assert _node(snap) == {("cpu", "estimated"): pytest.approx(28.6)}
    assert _containers(snap)[("", "nginx.service")]["cpu"] == pytest.approx(13.8)
    assert _unattributed(snap)[("cpu", "idle")] == pytest.approx(14.8)
    assert dict(snap.source_up) == {"cgroup": True, "model": True, "procfs": True}


def test_pod_residual_goes_to_pod_container_and_removed_container_retained(
        sim, clock: FakeClock) -> None:
    node: SimulatedNode = sim(cgroup_version=1, driver="cgroupfs")
    node.add_rapl_zone("0", "package-0")
    pod = node.add_pod(pod_uid("r"), "besteffort", "docker")
    app = node.add_container(pod, container_id("app"))
    config = node_config(node, "--retention", "30s")
    sampler = Sampler(config, HostNamer(), clock=clock)
    sampler.sample()
    node.add_cpu(app.path, 6)
    node.add_cpu(pod.path, 2)  # the pause container and conmon live in the pod cgroup
    node.add_node_cpu(idle_seconds=12)
    node.add_energy("0", 100.0)
    clock.advance(5)
    sampler.sample()
    got = _containers(sampler.snapshot())
    assert got[(pod.uid, app.container_id[:12])]["cpu"] == pytest.approx(30.0)
    assert got[(pod.uid, "POD")]["cpu"] == pytest.approx(10.0)

    node.remove_cgroup(app.path)
    clock.advance(5)
    sampler.sample()
    assert (pod.uid, app.container_id[:12]) in _containers(sampler.snapshot())
    assert sampler.snapshot().containers_retained == 1
    clock.advance(31)
    sampler.sample()
    assert (pod.uid, app.container_id[:12]) not in _containers(sampler.snapshot())
    assert dict(((n, c), j) for n, c, j in sampler.snapshot().namespace_energy)[("", "cpu")] \
        == pytest.approx(40.0)


def test_short_lived_container_created_between_samples_is_charged(sim, clock) -> None:
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    pod = node.add_pod(pod_uid("s"))
    sampler = Sampler(node_config(node), HostNamer(), clock=clock)
    sampler.sample()
    job = node.add_container(pod, container_id("job"))
    node.add_cpu(job.path, 4)
    node.add_node_cpu(idle_seconds=4)
    node.add_energy("0", 80.0)
    clock.advance(2)
    sampler.sample()
    assert _containers(sampler.snapshot())[(pod.uid, job.container_id[:12])]["cpu"] == \
        pytest.approx(40.0)


def test_unnamed_workload_energy_reaches_namespace_once_named(sim, clock) -> None:
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    pod = node.add_pod(pod_uid("late"))
    c = node.add_container(pod, container_id("late"))

    class LateNamer(HostNamer):
        known = False

        def name(self, identity):  # type: ignore[no-untyped-def]
            if not self.known:
                return None
            return WorkloadLabels("team-a", "late-pod", "main", "late", "Deployment")

    namer = LateNamer()
    sampler = Sampler(node_config(node), namer, clock=clock)
    sampler.sample()
    node.add_cpu(c.path, 4)
    node.add_node_cpu(idle_seconds=4)
    node.add_energy("0", 80.0)
    clock.advance(2)
    sampler.sample()
    snap = sampler.snapshot()
    assert snap.containers == ()  # held, not rendered with placeholder names
    assert snap.namespace_energy == ()
    namer.known = True
    clock.advance(2)
    sampler.sample()
    ns = {(n, c): j for n, c, j in sampler.snapshot().namespace_energy}
    assert ns[("team-a", "cpu")] == pytest.approx(40.0)


def test_idle_baseline_is_learned_only_from_quiet_intervals(sim, clock: FakeClock) -> None:
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    pod = node.add_pod(pod_uid("load"))
    work = node.add_container(pod, container_id("load"))
    sampler = Sampler(node_config(node), HostNamer(), clock=clock)
    sampler.sample()

    def interval(busy: float, idle: float, joules: float) -> dict[tuple[str, str], float]:
        before = _unattributed(sampler.snapshot())
        node.add_cpu(work.path, busy)
        node.add_node_cpu(idle_seconds=idle)
        node.add_energy("0", joules)
        clock.advance(10)
        sampler.sample()
        after = _unattributed(sampler.snapshot())
        return {k: after[k] - before.get(k, 0.0) for k in after}

    # Busy first (u = 0.8, 300 W): nothing is learned, idle is E * (1 - u).
    assert interval(32, 8, 3000)[("cpu", "idle")] == pytest.approx(600.0)
    # Quiet (u = 0.05, 40 W then 35 W): the lowest power seen becomes the baseline. The
    # interval that teaches it still uses the rule in force before it.
    assert interval(2, 38, 400)[("cpu", "idle")] == pytest.approx(380.0)
    assert interval(2, 38, 350)[("cpu", "idle")] == pytest.approx(350.0)  # 40 W known
    # Busy again: idle is the 35 W baseline, not E * (1 - u) = 600 J.
    assert interval(32, 8, 3000)[("cpu", "idle")] == pytest.approx(350.0)
