"""A sampler cycle that fails half-way: its fault is published, nothing of it is booked,
and the next good cycle books the whole span once."""

from __future__ import annotations

import threading
from collections.abc import Mapping

import pytest
from conftest import FakeClock, node_config
from kwatt.ledger import LedgerSnapshot, WorkloadLabels
from kwatt.sampler import Sampler, StageResult
from kwatt.workloads.cgroups import CgroupIdentity
from kwatt.workloads.naming import HostNamer
from simnode import SimulatedNode


class FailingStage:
    """Fails when told to, after the CPU and DRAM energy of the cycle has been booked."""

    def __init__(self, stop: threading.Event) -> None:
        self.fail = False
        self.stop = stop

    def sample(self, now: float,
               workloads: Mapping[CgroupIdentity, WorkloadLabels | None]) -> StageResult:
        if self.fail:
            self.stop.set()
            raise RuntimeError("injected failure")
        return StageResult()


def totals(snap: LedgerSnapshot) -> dict[str, float]:
    return {
        "node": sum(j for _, _, j in snap.node_energy),
        "containers": sum(j for row in snap.containers for _, j in row.energy),
        "unattributed": sum(j for _, _, j in snap.unattributed),
        "namespaces": sum(j for _, _, j in snap.namespace_energy),
        "workloads": sum(j for *_, j in snap.workload_energy),
    }


def test_failed_cycle_publishes_its_fault_and_books_nothing_twice(
        sim, clock: FakeClock) -> None:
    node: SimulatedNode = sim(vcpus=2)
    node.add_rapl_zone("0", "package-0")
    svc = node.add_unit("/system.slice/nginx.service")
    stop = threading.Event()
    stage = FailingStage(stop)
    sampler = Sampler(node_config(node), HostNamer(), clock=clock,
                      stages=[stage])
    sampler.sample()
    node.add_cpu(svc, 5)
    node.add_node_cpu(idle_seconds=5)
    node.add_energy("0", 100.0)
    clock.advance(5)
    sampler.sample()
    good = sampler.snapshot()
    assert totals(good)["node"] == pytest.approx(100.0)

    node.add_cpu(svc, 5)
    node.add_node_cpu(idle_seconds=5)
    node.add_energy("0", 100.0)
    clock.advance(5)
    stage.fail = True
    sampler.run(stop)  # one cycle: it fails after booking CPU energy, and the loop stops
    failed = sampler.snapshot()
    assert ("sampler", "api", 1) in failed.source_errors  # published although it failed
    assert totals(failed) == totals(good)  # no half cycle is visible
    assert failed.cycles == good.cycles

    stage.fail = False
    node.add_cpu(svc, 5)
    node.add_node_cpu(idle_seconds=5)
    node.add_energy("0", 100.0)
    clock.advance(5)
    sampler.sample()
    after = totals(sampler.snapshot())
    # The failed interval is booked once, by the next good cycle: nothing lost, nothing
    # twice, and conservation holds.
    assert after["node"] == pytest.approx(300.0)
    assert after["containers"] + after["unattributed"] == pytest.approx(300.0)
    assert after["containers"] == after["namespaces"] == pytest.approx(after["workloads"])


def test_a_namer_failing_on_one_workload_costs_only_that_workload(sim, clock) -> None:
    node: SimulatedNode = sim(vcpus=2)
    node.add_rapl_zone("0", "package-0")
    good = node.add_unit("/system.slice/good.service")
    bad = node.add_unit("/system.slice/bad.service")

    class BrokenForOne(HostNamer):
        def name(self, identity):  # type: ignore[no-untyped-def]
            if identity.name == "bad.service":
                raise RecursionError("maximum recursion depth exceeded")
            return super().name(identity)

    sampler = Sampler(node_config(node), BrokenForOne(), clock=clock)
    sampler.sample()
    node.add_cpu(good, 2)
    node.add_cpu(bad, 2)
    node.add_node_cpu(idle_seconds=6)
    node.add_energy("0", 100.0)
    clock.advance(5)
    sampler.sample()
    snap = sampler.snapshot()
    assert [row.labels.container for row in snap.containers] == ["good.service"]
    assert dict(((s, r), n) for s, r, n in snap.source_errors)[("cgroup", "parse")] >= 1
    assert ("sampler", "api") not in {(s, r) for s, r, _ in snap.source_errors}
    # The unnamed workload's energy is held, not lost: it reaches namespace "" on expiry.
    assert sampler.ledger.unnamed_energy()["cpu"] > 0
