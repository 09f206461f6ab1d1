"""Platform meters and the `other` component: hand-computed joules on simulated nodes."""

from __future__ import annotations

import pytest
from conftest import FakeClock, node_config
from hwmon_sim import install_hwmon, set_hwmon
from kwatt.config import ConfigError
from kwatt.faults import Fault
from kwatt.ledger import LedgerSnapshot
from kwatt.sampler import Sampler
from kwatt.sources.hwmon import build_hwmon_cpu_meter, build_hwmon_meters, discover_hwmon
from kwatt.sources.meter import MeterSample
from kwatt.stages.platform import PlatformStage
from kwatt.workloads.naming import HostNamer
from simnode import SimContainer, SimulatedNode, container_id, pod_uid


def _node(snap: LedgerSnapshot) -> dict[tuple[str, str], float]:
    return {(c, s): j for c, s, j in snap.node_energy}


def _containers(snap: LedgerSnapshot) -> dict[str, dict[str, float]]:
    return {r.labels.container: dict(r.energy) for r in snap.containers}


def _unattributed(snap: LedgerSnapshot) -> dict[tuple[str, str], float]:
    return {(c, r): j for c, r, j in snap.unattributed}


def _errors(snap: LedgerSnapshot) -> dict[tuple[str, str], int]:
    return {(s, r): n for s, r, n in snap.source_errors}


IDLE = ("--config",)


def _sampler(node: SimulatedNode, clock: FakeClock, tmp_config: str | None = None
             ) -> tuple[Sampler, PlatformStage]:
    config = node_config(node, *((IDLE[0], tmp_config) if tmp_config else ()))
    stage = PlatformStage(build_hwmon_meters(config, clock), config)
    hwmon_cpu, _ = build_hwmon_cpu_meter(config, clock)
    return Sampler(config, HostNamer(), clock=clock, platform=stage,
                   hwmon_cpu=hwmon_cpu), stage


def _two_containers(node: SimulatedNode) -> tuple[SimContainer, SimContainer]:
    pod = node.add_pod(pod_uid("p"), "burstable", "containerd")
    return (node.add_container(pod, container_id("a")),
            node.add_container(pod, container_id("b")))


@pytest.fixture
def idle_config(tmp_path) -> str:  # type: ignore[no-untyped-def]
    path = tmp_path / "kwatt.yaml"
    path.write_text("attribution:\n  idle_watts:\n    cpu: 60\n    dram: 10\n    other: 100\n")
    return str(path)


def test_meter_400w_rapl_180w_other_220w_split_3_to_1(sim, clock: FakeClock,
                                                      idle_config: str) -> None:
    """The issue's scenario: meter 400 W, RAPL cpu 150 W + dram 30 W, no GPU -> other 220 W.

    10 s at 40 % utilisation (4 vCPUs: a 12 s, b 4 s, 24 s idle); configured idle power
    cpu 60 W, dram 10 W, other 100 W.
    cpu 1500 J: idle 600, active 900 -> a 675, b 225 (12:4).
    dram 300 J: idle 100, active 200 -> a 150, b 50.
    other 4000 - 1800 = 2200 J: idle 1000, active 1200 split by the cpu+dram energy charged
    (a 825 J, b 275 J: 3:1) -> a 900, b 300.
    """
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    node.add_rapl_zone("0:1", "dram")
    install_hwmon(node, "acpi-power-meter")
    a, b = _two_containers(node)
    sampler, _ = _sampler(node, clock, idle_config)
    sampler.sample()
    node.add_cpu(a.path, 12)
    node.add_cpu(b.path, 4)
    node.add_node_cpu(busy_seconds=0, idle_seconds=24)
    node.add_energy("0", 1500.0)
    node.add_energy("0:1", 300.0)
    clock.advance(10)
    report = sampler.sample()
    snap = sampler.snapshot()

    assert _node(snap) == pytest.approx({("cpu", "rapl"): 1500.0, ("dram", "rapl"): 300.0,
                                         ("other", "hwmon"): 2200.0})
    got = _containers(snap)
    assert got[a.container_id[:12]] == pytest.approx({"cpu": 675, "dram": 150, "other": 900})
    assert got[b.container_id[:12]] == pytest.approx({"cpu": 225, "dram": 50, "other": 300})
    unattributed = _unattributed(snap)
    assert unattributed[("other", "idle")] == pytest.approx(1000.0)
    assert unattributed[("other", "system")] == pytest.approx(0.0, abs=1e-9)
    assert report.node_watts == pytest.approx({("cpu", "rapl"): 150.0, ("dram", "rapl"): 30.0,
                                               ("other", "hwmon"): 220.0})
    assert sum(report.node_watts.values()) == pytest.approx(400.0)
    platform = {(s, n): j for s, n, j in snap.platform_energy}
    assert platform == pytest.approx({("hwmon", "power_meter/hwmon1"): 4000.0})
    assert dict(snap.source_up)["hwmon"] is True


def test_lagging_meter_books_zero_and_counts_negative_remainder(sim, clock: FakeClock) -> None:
    """The meter still shows last interval's 100 W while RAPL already reads 300 W.

    Interval 1: meter 100 W x 10 s = 1000 J, RAPL 3000 J: the remainder is -2000 J; other
    books 0, negative_remainder is counted and 2000 J are owed.
    Interval 2: the meter catches up to 400 W: trapezoid (100 + 400) / 2 x 10 s = 2500 J,
    RAPL 300 J: remainder 2200 J, minus the 2000 J owed = 200 J.
    Interval 3: 4000 J against 1800 J: 2200 J.
    In all, other = 2400 J = meter 7500 J - RAPL 5100 J: clamping added nothing.
    """
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    install_hwmon(node, "acpi-power-meter")
    set_hwmon(node, "hwmon1/device/power1_average", 100_000_000)
    a, _ = _two_containers(node)
    sampler, stage = _sampler(node, clock)
    sampler.sample()

    def interval(rapl_joules: float, meter_watts: int | None = None) -> LedgerSnapshot:
        if meter_watts is not None:
            set_hwmon(node, "hwmon1/device/power1_average", meter_watts * 1_000_000)
        node.add_cpu(a.path, 10)
        node.add_node_cpu(idle_seconds=30)
        node.add_energy("0", rapl_joules)
        clock.advance(10)
        sampler.sample()
        return sampler.snapshot()

    snap = interval(3000.0)
    assert _node(snap)[("other", "hwmon")] == 0.0
    assert _errors(snap)[("hwmon", "negative_remainder")] == 1
    assert stage.negative_remainders == 1
    snap = interval(300.0, 400)
    assert _node(snap)[("other", "hwmon")] == pytest.approx(200.0)
    snap = interval(1800.0)
    assert _node(snap)[("other", "hwmon")] == pytest.approx(2400.0)
    assert _errors(snap)[("hwmon", "negative_remainder")] == 1
    platform = {(s, n): j for s, n, j in snap.platform_energy}
    assert platform[("hwmon", "power_meter/hwmon1")] == pytest.approx(7500.0)


def test_without_a_meter_nothing_changes(sim, clock: FakeClock) -> None:
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    config = node_config(node)
    assert build_hwmon_meters(config) == []
    sampler = Sampler(config, HostNamer(), clock=clock)
    sampler.sample()
    node.add_node_cpu(busy_seconds=1, idle_seconds=1)
    node.add_energy("0", 10.0)
    clock.advance(1)
    sampler.sample()
    snap = sampler.snapshot()
    assert set(_node(snap)) == {("cpu", "rapl")}
    assert snap.platform_energy == ()
    assert "hwmon" not in dict(snap.source_up)


def test_grace_hopper_cpu_from_hwmon_and_module_as_platform(sim, clock: FakeClock) -> None:
    """GH200 without RAPL: cpu = Grace Power Socket 0 (150 W, source hwmon); the module
    (900 W) is the platform meter; other = 900 - 150 = 750 W (no GPU stage here)."""
    node: SimulatedNode = sim()
    install_hwmon(node, "grace-hopper")
    inventory = discover_hwmon(str(node.sysfs))
    assert [c.sensor for c in inventory.platform] == ["module_power_socket_0"]
    assert [c.sensor for c in inventory.cpu] == ["grace_power_socket_0"]
    a, _ = _two_containers(node)
    sampler, _ = _sampler(node, clock)
    sampler.sample()
    node.add_cpu(a.path, 4)
    node.add_node_cpu(idle_seconds=4)
    clock.advance(2)
    report = sampler.sample()
    snap = sampler.snapshot()
    assert _node(snap) == pytest.approx({("cpu", "hwmon"): 300.0, ("other", "hwmon"): 1500.0})
    assert report.node_watts == pytest.approx({("cpu", "hwmon"): 150.0,
                                               ("other", "hwmon"): 750.0})
    assert "model" not in dict(snap.source_up)


def test_amd_energy_socket_counter_is_cpu_and_a_reset_is_counted(sim, clock: FakeClock
                                                                 ) -> None:
    node: SimulatedNode = sim()
    install_hwmon(node, "amd-energy")
    a, _ = _two_containers(node)
    sampler, _ = _sampler(node, clock)
    sampler.sample()
    node.add_cpu(a.path, 2)
    node.add_node_cpu(idle_seconds=2)
    set_hwmon(node, "hwmon2/energy5_input", 5_000_000_000 + 1_200_000_000)  # +1200 J
    set_hwmon(node, "hwmon2/energy1_input", 9_000_000)  # a core: inside the socket, ignored
    clock.advance(10)
    sampler.sample()
    snap = sampler.snapshot()
    assert _node(snap) == pytest.approx({("cpu", "hwmon"): 1200.0})

    set_hwmon(node, "hwmon2/energy5_input", 1_000_000)  # driver reloaded: counter restarted
    node.add_node_cpu(idle_seconds=4)
    clock.advance(10)
    sampler.sample()
    snap = sampler.snapshot()
    # Nothing booked from the counter for the reset interval: the model stands in, as
    # after an implausible RAPL step (4 vCPUs idle: 4 x 0.74 W x 10 s).
    assert _node(snap) == pytest.approx({("cpu", "hwmon"): 1200.0,
                                         ("cpu", "estimated"): 29.6})
    assert _errors(snap)[("hwmon", "implausible")] == 1

    set_hwmon(node, "hwmon2/energy5_input", 501_000_000)  # +500 J from the new baseline
    node.add_node_cpu(idle_seconds=4)
    clock.advance(10)
    sampler.sample()
    assert _node(sampler.snapshot()) == pytest.approx({("cpu", "hwmon"): 1700.0,
                                                       ("cpu", "estimated"): 29.6})


def test_configured_energy_sensor_resets_without_booking(sim, clock: FakeClock,
                                                         tmp_path) -> None:  # type: ignore[no-untyped-def]
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    install_hwmon(node, "psu-energy")
    path = tmp_path / "c.yaml"
    path.write_text("platform:\n  hwmon:\n    sensors: [psu_meter/energy1]\n")
    sampler, _ = _sampler(node, clock, str(path))
    sampler.sample()
    node.add_node_cpu(idle_seconds=4)
    node.add_energy("0", 100.0)
    set_hwmon(node, "hwmon3/energy1_input", 10_000_000_000 + 300_000_000)
    clock.advance(1)
    sampler.sample()
    assert _node(sampler.snapshot())[("other", "hwmon")] == pytest.approx(200.0)
    set_hwmon(node, "hwmon3/energy1_input", 5)  # reset
    node.add_node_cpu(idle_seconds=4)
    node.add_energy("0", 100.0)
    clock.advance(1)
    sampler.sample()
    snap = sampler.snapshot()
    assert _node(snap)[("other", "hwmon")] == pytest.approx(200.0)
    assert _errors(snap)[("hwmon", "implausible")] == 1


def test_configured_sensor_missing_is_a_config_error(sim, tmp_path) -> None:  # type: ignore[no-untyped-def]
    node: SimulatedNode = sim()
    install_hwmon(node, "acpi-power-meter")
    path = tmp_path / "c.yaml"
    path.write_text("platform:\n  hwmon:\n    sensors: [ipmi_si/power1]\n")
    config = node_config(node, "--config", str(path))
    with pytest.raises(ConfigError, match=r"^platform.hwmon.sensors: 'ipmi_si/power1' not "):
        build_hwmon_meters(config)


def test_auto_detected_meter_missing_is_just_absent(sim) -> None:
    node: SimulatedNode = sim()
    install_hwmon(node, "acpi-power-meter")
    (node.sysfs / "class" / "hwmon" / "hwmon1" / "device" / "power1_average").unlink()
    assert build_hwmon_meters(node_config(node)) == []


def test_grace_cpu_meter_failing_falls_back_to_the_model_like_rapl(sim, clock: FakeClock
                                                                  ) -> None:
    node: SimulatedNode = sim()
    install_hwmon(node, "grace-hopper")
    sampler, _ = _sampler(node, clock)
    sampler.sample()
    node.add_node_cpu(busy_seconds=2, idle_seconds=2)
    clock.advance(1)
    sampler.sample()
    assert _node(sampler.snapshot())[("cpu", "hwmon")] == pytest.approx(150.0)

    (node.sysfs / "class" / "hwmon" / "hwmon1" / "device" / "power1_average").write_text("x\n")
    node.add_node_cpu(busy_seconds=2, idle_seconds=2)
    clock.advance(1)
    sampler.sample()
    snap = sampler.snapshot()
    # 4 vCPUs at 50 %: 4 x (0.74 + (3.5 - 0.74) x 0.5) = 8.48 W for 1 s, from the model.
    assert _node(snap)[("cpu", "estimated")] == pytest.approx(8.48)
    assert _node(snap)[("cpu", "hwmon")] == pytest.approx(150.0)
    assert dict(snap.source_up)["hwmon"] is False
    assert _errors(snap)[("hwmon", "parse")] == 1


def test_a_failed_meter_leaves_no_stale_other_power(sim, clock: FakeClock) -> None:
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    install_hwmon(node, "acpi-power-meter")
    sampler, _ = _sampler(node, clock)
    sampler.sample()
    node.add_node_cpu(idle_seconds=4)
    node.add_energy("0", 100.0)
    clock.advance(1)
    assert sampler.sample().node_watts[("other", "hwmon")] == pytest.approx(300.0)
    (node.sysfs / "class" / "hwmon" / "hwmon1" / "device" / "power1_average").unlink()
    node.add_node_cpu(idle_seconds=4)
    node.add_energy("0", 100.0)
    clock.advance(1)
    report = sampler.sample()
    assert ("other", "hwmon") not in report.node_watts
    assert dict(sampler.snapshot().source_up)["hwmon"] is False


class SteppedMeter:
    """A slow meter (a BMC polled on its own thread): ``latest`` returns whatever sample
    the test last published, the same one again until the next publish."""

    source = "bmc"

    def __init__(self) -> None:
        self.samples: list[MeterSample] = []
        self._generation = 0

    def publish(self, read_at: float, watts: float) -> None:
        self._generation += 1
        self.samples = [MeterSample(self.source, "chassis", read_at, watts, None,
                                    self._generation)]

    def latest(self) -> tuple[list[MeterSample], list[Fault]]:
        return list(self.samples), []

    def close(self) -> None:
        return None


def test_a_slow_meter_books_other_when_it_refreshes(sim, clock: FakeClock) -> None:
    """The meter refreshes every 3 s, the sampler runs every 1 s. Readings of 400 W at
    t=1000 and t=1003: (400 + 400) / 2 x 3 s = 1200 J, against RAPL's 3 x 100 J in the
    three cycles since: other = 900 J, booked in the cycle that sees the refresh; the
    gauge shows 400 - 100 = 300 W from then until the next refresh."""
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    meter = SteppedMeter()
    config = node_config(node)
    sampler = Sampler(config, HostNamer(), clock=clock,
                      platform=PlatformStage([meter], config))
    meter.publish(clock.now, 400.0)
    sampler.sample()
    others = []
    for second in range(1, 7):
        node.add_node_cpu(idle_seconds=4)
        node.add_energy("0", 100.0)
        clock.advance(1)
        if second % 3 == 0:
            meter.publish(clock.now, 400.0)
        report = sampler.sample()
        others.append((_node(sampler.snapshot()).get(("other", "bmc"), 0.0),
                       report.node_watts.get(("other", "bmc"))))
    assert others == [(0.0, None), (0.0, None), (900.0, 300.0),
                      (900.0, 300.0), (900.0, 300.0), (1800.0, 300.0)]


class CoarseCounterMeter(SteppedMeter):
    """A BMC whose energy register moves in 1 kWh steps (3.6 MJ)."""

    def publish_energy(self, read_at: float, joules: float) -> None:
        self._generation += 1
        self.samples = [MeterSample(self.source, "chassis", read_at, None, joules,
                                    self._generation)]


def test_a_coarse_energy_counter_is_judged_over_the_time_its_step_took(sim, clock: FakeClock
                                                                       ) -> None:
    """The register reads 0 kWh for 20 minutes of 30 s polls while the node draws 3 kW,
    then 1 kWh: 3.6 MJ in one 30 s poll would be 120 kW (implausible), but it took the
    whole 1200 s since the register last moved: 3 kW, booked. RAPL read 100 W throughout:
    other = 3.6 MJ - 1200 s x 100 W = 3.48 MJ."""
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    meter = CoarseCounterMeter()
    config = node_config(node, "--interval", "30s")
    sampler = Sampler(config, HostNamer(), clock=clock,
                      platform=PlatformStage([meter], config))
    meter.publish_energy(clock.now, 0.0)
    sampler.sample()
    for step in range(1, 41):
        node.add_node_cpu(idle_seconds=120)
        node.add_energy("0", 3000.0)
        clock.advance(30)
        meter.publish_energy(clock.now, 3_600_000.0 if step == 40 else 0.0)
        sampler.sample()
    snap = sampler.snapshot()
    assert _node(snap)[("other", "bmc")] == pytest.approx(3_480_000.0)
    assert ("bmc", "implausible") not in _errors(snap)
