"""The CPU stage: RAPL, else hwmon (Grace, amd_energy), else the model -> cpu/dram splits.

The sampler reads node CPU time and every workload cgroup once per cycle (all stages use
them) and hands them here; this stage owns the energy side: RAPL discovery, its counters
(wrap-aware, through kwatt.counters), the CPU-socket hwmon meter where there is no RAPL,
the estimation model where there is neither, the idle baselines, and the split of each
component by cgroup CPU time (kwatt.attribution). Where RAPL has no ``cpu`` the hwmon
meter supplies it with ``source="hwmon"``; an interval it cannot measure (a failed read,
the first interval after one) falls back to the model, as for RAPL.

RAPL is read in ``read`` right after ``/proc/stat``, before the cgroup scan, so the energy
and CPU-time windows line up; the split follows in ``split`` once CPU time is known.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from kwatt.attribution import (
    ComponentEnergy,
    ComponentSplit,
    WorkloadActivity,
    attribute_component,
)
from kwatt.baseline import IdleBaseline
from kwatt.config import Config
from kwatt.faults import Fault
from kwatt.sources import model as estimation
from kwatt.sources.hwmon import SOURCE as HWMON
from kwatt.sources.meter import PlatformMeter
from kwatt.sources.procfs import NodeCpuTimes
from kwatt.sources.rapl import (
    RaplCounters,
    RaplZone,
    component_energy_joules,
    discover_rapl_zones,
    read_rapl_zones,
)
from kwatt.stages.meter_energy import MeterIntegrator
from kwatt.state import StateRejected

log = logging.getLogger("kwatt.sampler")

# Highest average power one CPU-socket hwmon meter may show (all sockets together): a
# 2-socket Grace or EPYC node draws well under 2 kW in CPUs.
CPU_HWMON_CEILING_WATTS = 4000.0


@dataclass(frozen=True)
class CpuReading:
    """This cycle's raw energy: RAPL zone deltas and the hwmon CPU meter's joules."""

    rapl_in_use: bool
    zone_deltas: Mapping[RaplZone, float] = field(default_factory=dict)
    hwmon_joules: float | None = None
    faults: tuple[Fault, ...] = ()
    hwmon_failed: bool = False


@dataclass(frozen=True)
class CpuResult:
    """cpu/dram for one interval: ``splits`` to book, and ``unsplit`` energy (no node CPU
    time this cycle: booked to the node and ``system``, charged to nobody)."""

    splits: tuple[ComponentSplit[Hashable], ...] = ()
    unsplit: tuple[ComponentEnergy, ...] = ()
    zone_joules: tuple[tuple[str, str, float], ...] = ()  # zone, index, joules


class CpuStage:
    def __init__(self, config: Config, hwmon_cpu: PlatformMeter | None = None) -> None:
        self._config = config
        self._hwmon = hwmon_cpu
        self._zones: list[RaplZone] = []
        self._counters = RaplCounters()
        self._integrator = MeterIntegrator(CPU_HWMON_CEILING_WATTS)
        self._baselines = {
            component: IdleBaseline(config.attribution.idle_learn_window_seconds,
                                    config.attribution.idle_learn_max_utilisation)
            for component in ("cpu", "dram")}
        self._configured_idle = {"cpu": config.attribution.idle_watts_cpu,
                                 "dram": config.attribution.idle_watts_dram}

    @property
    def uses_hwmon(self) -> bool:
        return self._hwmon is not None

    # -- setup ----------------------------------------------------------------------------

    def discover(self) -> list[Fault]:
        """Find the RAPL zones (and say at startup what CPU energy will come from); returns
        the faults found, which the sampler counts."""
        cfg = self._config
        zones, faults = discover_rapl_zones(cfg.sysfs)
        reading = read_rapl_zones(zones)
        readable = [z.zone for z in zones if z in reading.energy_uj]
        by_design = bool(zones) and not readable and all(
            f.reason == "permission" for f in reading.faults)
        if by_design:
            # Every zone is root-only (non-root mode, kernels since CVE-2020-8694): kwatt
            # decides here not to use RAPL. That is a choice, not an outage, so it is said
            # once and RAPL is neither read, nor counted, nor exported as down afterwards.
            log.warning("RAPL is not used: every energy_uj is unreadable for this user "
                        "(permission); run as root to measure", extra={
                            "zones": ",".join(z.zone for z in zones)})
            zones = []
        else:
            faults.extend(reading.faults)
        self._zones = zones
        if readable:
            self._hwmon = None  # RAPL measures the CPU: the hwmon meter is not read
            log.info("reading RAPL energy counters", extra={"zones": ",".join(readable)})
        elif self._hwmon is not None:
            log.info("no readable RAPL: CPU energy from hwmon; node series carry "
                     "source=hwmon")
        else:
            why = ("no RAPL zone is readable for this user" if by_design
                   else "no powercap intel-rapl zones" if not zones
                   else "no RAPL zone is readable (" + faults[0].reason + ")")
            log.warning(
                "energy is estimated: %s under %s; using the linear per-vCPU model "
                "(%.2f-%.2f W per vCPU); node series carry source=estimated",
                why, cfg.sysfs, cfg.model.cpu_watts_idle_per_vcpu,
                cfg.model.cpu_watts_max_per_vcpu)
        return faults

    # -- one cycle ------------------------------------------------------------------------

    def read(self, dt: float | None) -> CpuReading:
        """Read RAPL and the hwmon CPU meter; ``dt``: seconds since the last cycle."""
        faults: list[Fault] = []
        deltas: dict[RaplZone, float] = {}
        if self._zones:
            reading = read_rapl_zones(self._zones)
            faults.extend(reading.faults)
            deltas, wrap_faults = self._counters.advance(reading, dt)
            faults.extend(wrap_faults)
        hwmon_joules, hwmon_faults = self._read_hwmon()
        faults.extend(hwmon_faults)
        return CpuReading(bool(self._zones), deltas, hwmon_joules, tuple(faults),
                          bool(hwmon_faults))

    def _read_hwmon(self) -> tuple[float | None, list[Fault]]:
        if self._hwmon is None:
            return None, []
        samples, faults = self._hwmon.latest()
        if faults and not samples:
            self._integrator.forget(self._hwmon.source)
        energies, step_faults = self._integrator.advance(samples)
        faults = [*faults, *step_faults]
        if not energies:
            return None, list(faults)
        return sum(e.joules for e in energies), list(faults)

    def split(self, reading: CpuReading, now: float, dt: float,
              cpu_times: NodeCpuTimes | None, utilisation: float | None,
              node_busy_seconds: float, activities: list[WorkloadActivity[Hashable]],
              memory_bytes: int | None) -> CpuResult:
        """The interval's cpu/dram energy split among workloads, idle and system."""
        energies = self._components(reading, cpu_times, utilisation, memory_bytes, dt, now)
        zones = tuple((z.zone, z.index, j) for z, j in reading.zone_deltas.items())
        if utilisation is None:
            return CpuResult((), tuple(energies), zones)
        splits = tuple(attribute_component(energy, utilisation, node_busy_seconds, activities,
                                           self._config.attribution.idle_policy)
                       for energy in energies)
        return CpuResult(splits, (), zones)

    def _components(self, reading: CpuReading, cpu_times: NodeCpuTimes | None,
                    utilisation: float | None, memory_bytes: int | None, dt: float,
                    now: float) -> list[ComponentEnergy]:
        measured = {c: (j, "rapl") for c, j in component_energy_joules(
            self._zones, dict(reading.zone_deltas)).items()}
        if "cpu" not in measured and reading.hwmon_joules is not None:
            measured["cpu"] = (reading.hwmon_joules, HWMON)
        out: list[ComponentEnergy] = []
        for component, (joules, source) in measured.items():
            watts = joules / dt
            baseline = self._configured_idle.get(component)
            if baseline is None:
                baseline = self._baselines[component].watts()
                if utilisation is not None:
                    self._baselines[component].observe(now, watts, utilisation)
            out.append(ComponentEnergy(component, source, joules,
                                       None if baseline is None else baseline * dt))
        missing = [c for c in ("cpu", "dram") if c not in measured]
        if missing and cpu_times is not None and utilisation is not None:
            for estimate in estimation.estimate_node_power(
                    cpu_times.vcpus, utilisation, memory_bytes, self._config.model):
                if estimate.component in missing:
                    out.append(ComponentEnergy(estimate.component, estimation.SOURCE,
                                               estimate.watts * dt, estimate.idle_watts * dt))
        return out

    # -- failed cycles and restarts -------------------------------------------------------

    def cursor(self) -> object:
        """Where the counters stand before a cycle (restored when the cycle fails)."""
        return copy.deepcopy((self._counters, self._integrator))

    def set_cursor(self, cursor: object) -> None:
        self._counters, self._integrator = cursor  # type: ignore[misc]

    def export_rapl(self) -> dict[str, int]:
        return {zone.index: value for zone, value in self._counters.readings().items()}

    def restore_rapl(self, saved: Mapping[str, int]) -> None:
        """Continue from RAPL readings saved before a restart; ``StateRejected`` (nothing
        seeded) when a counter is lower now (a wrap in the gap cannot be told from a
        foreign file)."""
        by_index = {zone.index: zone for zone in self._zones}
        seeds = {by_index[i]: v for i, v in saved.items() if i in by_index}
        now = read_rapl_zones(seeds).energy_uj
        lower = sorted(z.zone for z, v in seeds.items() if z in now and now[z] < v)
        if lower:
            raise StateRejected("inconsistent: RAPL counter lower now than saved ("
                                + ",".join(lower) + ")")
        self._counters.seed(seeds)
