"""Every energy counter passes one plausibility rule before it becomes joules: glitches,
truncated reads, absurd values and absurd wrap points are counted faults that book nothing,
through the real Sampler on a fixture sysfs tree."""

from __future__ import annotations

import pytest
from conftest import FakeClock, node_config
from kwatt.counters import CounterLimits, ceiling_from_limits, counter_step
from kwatt.ledger import LedgerSnapshot
from kwatt.sampler import Sampler
from kwatt.sources.rapl import BOUND_WATTS, discover_rapl_zones
from kwatt.workloads.naming import HostNamer
from simnode import SimulatedNode, container_id, pod_uid

RANGE = 262_143_328_850


def _node(snap: LedgerSnapshot) -> dict[tuple[str, str], float]:
    return {(c, s): j for c, s, j in snap.node_energy}


def _errors(snap: LedgerSnapshot) -> dict[tuple[str, str], int]:
    return {(s, r): n for s, r, n in snap.source_errors}


def _busy_node(sim, **zone: int) -> tuple[SimulatedNode, str]:
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0", **zone)
    pod = node.add_pod(pod_uid("a"))
    ctr = node.add_container(pod, container_id("a"))
    return node, ctr.path


def _step(node: SimulatedNode, path: str, clock: FakeClock, sampler: Sampler,
          joules: float | None = 100.0, content: str | None = None) -> LedgerSnapshot:
    node.add_cpu(path, 1.0)
    node.add_node_cpu(idle_seconds=3.0)
    if joules is not None:
        node.add_energy("0", joules)
    if content is not None:
        node.set_zone_content("0", content)
    clock.advance(1.0)
    sampler.sample()
    return sampler.snapshot()


def _cpu_total(snap: LedgerSnapshot) -> float:
    return sum(j for c, _, j in snap.node_energy if c == "cpu")


@pytest.mark.parametrize("bad", [
    pytest.param(lambda v: str(v - 1), id="1uJ-below"),
    pytest.param(lambda v: str(v)[:4], id="truncated"),
    pytest.param(lambda v: "1" + "0" * 26, id="1e26"),
])
def test_implausible_reading_books_nothing_and_is_counted(sim, clock: FakeClock, bad) -> None:
    node, path = _busy_node(sim, energy_uj=50_000_000_000)
    sampler = Sampler(node_config(node), HostNamer(), clock=clock)
    sampler.sample()
    snap = _step(node, path, clock, sampler)
    assert _node(snap)[("cpu", "rapl")] == pytest.approx(100.0)

    good = node.zones["0"].energy_uj
    snap = _step(node, path, clock, sampler, joules=None, content=bad(good) + "\n")
    # Nothing from RAPL this interval: the estimate stands in, as after a failed read.
    assert _node(snap)[("cpu", "rapl")] == pytest.approx(100.0)
    assert _cpu_total(snap) <= 100.0 + BOUND_WATTS["package"] * 1.0
    assert ("cpu", "estimated") in _node(snap)
    assert _errors(snap)[("rapl", "implausible")] == 1

    # The counter comes back to its true value: at most one more interval is lost, and
    # measuring resumes; the counter never got stuck at an absurd baseline.
    node.set_zone_content("0", f"{good}\n")
    snap = _step(node, path, clock, sampler)
    snap = _step(node, path, clock, sampler)
    before = _node(snap)[("cpu", "rapl")]
    snap = _step(node, path, clock, sampler, joules=42.0)
    assert _node(snap)[("cpu", "rapl")] - before == pytest.approx(42.0)
    assert _cpu_total(snap) < 1000.0


def test_absurd_max_energy_range_is_rejected_at_discovery(sim, clock: FakeClock) -> None:
    node, path = _busy_node(sim, max_range_uj=10**30, energy_uj=5_000_000_000)
    zones, faults = discover_rapl_zones(str(node.sysfs))
    assert zones[0].max_energy_range_uj is None
    assert [(f.source, f.reason) for f in faults] == [("rapl", "implausible")]
    sampler = Sampler(node_config(node), HostNamer(), clock=clock)
    sampler.sample()
    assert _errors(sampler.snapshot())[("rapl", "implausible")] == 1
    _step(node, path, clock, sampler)
    # Without a plausible range a lower reading cannot be a known wrap: nothing booked.
    snap = _step(node, path, clock, sampler, joules=None, content="1000\n")
    assert _node(snap)[("cpu", "rapl")] == pytest.approx(100.0)
    assert _errors(snap)[("rapl", "implausible")] == 2


def test_honest_wrap_is_still_booked(sim, clock: FakeClock) -> None:
    node, path = _busy_node(sim, energy_uj=RANGE - 30_000_000)
    sampler = Sampler(node_config(node), HostNamer(), clock=clock)
    sampler.sample()
    snap = _step(node, path, clock, sampler, joules=100.0)  # wraps at RANGE
    assert node.zones["0"].energy_uj < 100_000_000
    assert _node(snap)[("cpu", "rapl")] == pytest.approx(100.0)
    assert ("rapl", "implausible") not in _errors(snap)


def test_ceiling_comes_from_the_zones_own_power_limits(sim, clock: FakeClock) -> None:
    node, path = _busy_node(sim)
    zone_dir = node.sysfs / "class" / "powercap" / "intel-rapl:0"
    (zone_dir / "constraint_0_power_limit_uw").write_text("80000000\n")  # PL1 80 W
    (zone_dir / "constraint_1_power_limit_uw").write_text("100000000\n")  # PL2 100 W
    (zone_dir / "constraint_0_max_power_uw").write_text("0\n")  # unset: ignored
    zones, _ = discover_rapl_zones(str(node.sysfs))
    assert zones[0].ceiling_watts == pytest.approx(200.0)
    sampler = Sampler(node_config(node), HostNamer(), clock=clock)
    sampler.sample()
    snap = _step(node, path, clock, sampler, joules=190.0)
    assert _node(snap)[("cpu", "rapl")] == pytest.approx(190.0)
    snap = _step(node, path, clock, sampler, joules=250.0)
    assert _node(snap)[("cpu", "rapl")] == pytest.approx(190.0)
    assert _errors(snap)[("rapl", "implausible")] == 1


def test_power_limit_raised_at_runtime_is_honoured(sim, clock: FakeClock) -> None:
    """A step above the discovery-time ceiling re-reads the zone's limits once: an
    administrator who raised PL1 must not lose measurement for good."""
    node, path = _busy_node(sim)
    zone_dir = node.sysfs / "class" / "powercap" / "intel-rapl:0"
    (zone_dir / "constraint_0_power_limit_uw").write_text("80000000\n")
    sampler = Sampler(node_config(node), HostNamer(), clock=clock)
    sampler.sample()
    (zone_dir / "constraint_0_power_limit_uw").write_text("300000000\n")  # raised to 300 W
    snap = _step(node, path, clock, sampler, joules=250.0)
    assert _node(snap)[("cpu", "rapl")] == pytest.approx(250.0)
    snap = _step(node, path, clock, sampler, joules=590.0)  # under the new 600 W ceiling
    assert _node(snap)[("cpu", "rapl")] == pytest.approx(840.0)
    snap = _step(node, path, clock, sampler, joules=700.0)  # above it: still implausible
    assert _node(snap)[("cpu", "rapl")] == pytest.approx(840.0)
    assert _errors(snap)[("rapl", "implausible")] == 1


def test_zone_without_limits_uses_the_documented_bound(sim) -> None:
    node, _ = _busy_node(sim)
    node.add_rapl_zone("0:0", "dram")
    zones, _ = discover_rapl_zones(str(node.sysfs))
    assert {z.kind: z.ceiling_watts for z in zones} == {
        "package": BOUND_WATTS["package"], "dram": BOUND_WATTS["dram"]}


@pytest.mark.parametrize(("previous", "current", "dt", "wrap_at", "joules"), [
    (100, 250, 1.0, 1000, 150e-6),
    (900, 50, 1.0, 1000, 150e-6),  # one honest wrap
    (900, 50, 1.0, None, None),  # went back, no wrap point: never guessed
    (1500, 50, 1.0, 1000, None),  # previous beyond the wrap point
    (100, 1001, 1.0, 1000, None),  # reading above the wrap point
    (7, 7, 1.0, 1000, 0.0),
    (0, 10**9, 1.0, None, None),  # 1000 J in 1 s: above a 500 W ceiling
    (0, 10**9, 2.5, None, 1000.0),  # the same over 2.5 s is 400 W
    (0, 10, None, None, None),  # no time known: nothing to check, nothing booked
])
def test_counter_step(previous: int, current: int, dt: float | None, wrap_at: int | None,
                      joules: float | None) -> None:
    step = counter_step(previous, current, dt, CounterLimits(1e-6, 500.0, wrap_at))
    assert step.joules == (None if joules is None else pytest.approx(joules))


def test_ceiling_from_limits_never_exceeds_the_bound() -> None:
    assert ceiling_from_limits([], 1500.0) == 1500.0
    assert ceiling_from_limits([0.0, 125.0], 1500.0) == 250.0
    assert ceiling_from_limits([1e12], 1500.0) == 1500.0  # a misread limit opens nothing
    assert ceiling_from_limits([1000.0], 1500.0) == 1500.0
