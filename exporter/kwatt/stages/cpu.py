"""CPU and DRAM energy of one interval: RAPL, else hwmon (Grace, amd_energy), else the model.

The sampler reads the counters and node CPU time once per cycle and asks this module for
the cycle's ``ComponentEnergy`` per component, each with its idle part (configured, learned
only at low utilisation, or the model's); kwatt.attribution then splits them by cgroup CPU
time. Where RAPL has no ``cpu`` (no powercap: an arm64 Grace node, an AMD node with
``amd_energy`` only) the CPU-socket hwmon meter supplies it with ``source="hwmon"``.
"""

from __future__ import annotations

from kwatt.attribution import ComponentEnergy
from kwatt.baseline import IdleBaseline
from kwatt.config import Config
from kwatt.faults import Fault
from kwatt.sources import model as estimation
from kwatt.sources.hwmon import SOURCE as HWMON
from kwatt.sources.meter import PlatformMeter
from kwatt.sources.procfs import NodeCpuTimes
from kwatt.sources.rapl import RaplZone, component_energy_joules
from kwatt.stages.meter_energy import MeterIntegrator

# Highest average power one CPU-socket hwmon meter may show (all sockets together): a
# 2-socket Grace or EPYC node draws well under 2 kW in CPUs.
CPU_HWMON_CEILING_WATTS = 4000.0


class CpuEnergy:
    """Per cycle: the node's cpu and dram energy with their idle parts."""

    def __init__(self, config: Config, hwmon_cpu: PlatformMeter | None = None) -> None:
        self._config = config
        self._hwmon = hwmon_cpu
        self.integrator = MeterIntegrator(CPU_HWMON_CEILING_WATTS)
        self.baselines = {
            component: IdleBaseline(config.attribution.idle_learn_window_seconds,
                                    config.attribution.idle_learn_max_utilisation)
            for component in ("cpu", "dram")}
        self._configured_idle = {"cpu": config.attribution.idle_watts_cpu,
                                 "dram": config.attribution.idle_watts_dram}

    def drop_hwmon(self) -> None:
        """RAPL is readable: it measures the CPU, the hwmon meter is not read."""
        self._hwmon = None

    @property
    def uses_hwmon(self) -> bool:
        return self._hwmon is not None

    def read_hwmon(self) -> tuple[float | None, list[Fault]]:
        """Joules the CPU-socket meter measured since its last reading (None: nothing yet,
        or no such meter). Read every cycle, so that its readings frame the cycle."""
        if self._hwmon is None:
            return None, []
        samples, faults = self._hwmon.latest()
        if faults and not samples:
            self.integrator.forget(self._hwmon.source)
        energies, step_faults = self.integrator.advance(samples)
        faults = [*faults, *step_faults]
        if not energies:
            return None, list(faults)
        return sum(e.joules for e in energies), list(faults)

    def components(self, zones: list[RaplZone], zone_deltas: dict[RaplZone, float],
                   hwmon_joules: float | None, cpu_times: NodeCpuTimes | None,
                   utilisation: float | None, memory_bytes: int | None, dt: float,
                   now: float) -> list[ComponentEnergy]:
        measured = {c: (j, "rapl") for c, j in component_energy_joules(zones,
                                                                       zone_deltas).items()}
        if "cpu" not in measured and hwmon_joules is not None:
            measured["cpu"] = (hwmon_joules, HWMON)
        out: list[ComponentEnergy] = []
        for component, (joules, source) in measured.items():
            watts = joules / dt
            baseline = self._configured_idle.get(component)
            if baseline is None:
                baseline = self.baselines[component].watts()
                if utilisation is not None:
                    self.baselines[component].observe(now, watts, utilisation)
            out.append(ComponentEnergy(component, source, joules,
                                       None if baseline is None else baseline * dt))
        missing = [c for c in ("cpu", "dram") if c not in measured]
        if missing and self._hwmon is not None and "cpu" in missing:
            missing.remove("cpu")  # the hwmon meter has no reading yet: nothing to guess
        if missing and cpu_times is not None and utilisation is not None:
            for estimate in estimation.estimate_node_power(
                    cpu_times.vcpus, utilisation, memory_bytes, self._config.model):
                if estimate.component in missing:
                    out.append(ComponentEnergy(estimate.component, estimation.SOURCE,
                                               estimate.watts * dt, estimate.idle_watts * dt))
        return out
