"""The platform stage: a whole-node meter minus cpu, dram and gpu -> the `other` component.

Run by the sampler after every other stage, with what they booked in the same cycle
(``CycleEnergy``). Each meter's ``latest()`` never blocks (slow meters poll on their own
thread), so this stage costs microseconds.

- The platform total is the energy of the first meter, in the order given, that measured
  anything; every meter's readings are also kept raw per sensor
  (kwatt_platform_energy_joules_total).
- ``other = platform - (cpu + dram + gpu)`` over the cycles the meter's new readings cover:
  a meter that refreshes less often than the sampler (a BMC) books `other` when it
  refreshes, against the components of the cycles since its last refresh.
- A negative remainder (the meter lags or averages over a longer window) books 0 and is
  counted as ``negative_remainder``; the shortfall is taken from the following intervals'
  `other` (until the meter is re-baselined), so over time `other` adds up to the meter
  minus the components instead of gaining what clamping cut off.
- Attribution (kwatt.attribution.attribute_other): the idle part is a learned baseline
  (only at low utilisation) or ``attribution.idle_watts.other``; the active part follows
  each workload's share of the cpu+dram+gpu energy charged in the same cycles.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

from kwatt.attribution import (
    ComponentEnergy,
    ComponentSplit,
    WorkloadActivity,
    active_weights,
    attribute_other,
    platform_remainder,
)
from kwatt.baseline import IdleBaseline
from kwatt.config import Config
from kwatt.faults import Fault
from kwatt.sampler import CycleEnergy, StageResult
from kwatt.sources.meter import PlatformMeter
from kwatt.stages.meter_energy import MeterIntegrator, SensorEnergy

COMPONENT = "other"


@dataclass
class _Pending:
    """The components' energy of the cycles a meter refresh has not covered yet."""

    splits: list[ComponentSplit[Hashable]] = field(default_factory=list)
    seconds: float = 0.0
    busy_seconds: float = 0.0  # utilisation x seconds, for the covered span's utilisation
    utilisation_known: bool = True
    activities: list[WorkloadActivity[Hashable]] = field(default_factory=list)


class PlatformStage:
    def __init__(self, meters: Sequence[PlatformMeter], config: Config) -> None:
        self._meters = tuple(meters)
        self._config = config
        self._integrator = MeterIntegrator(config.platform.ceiling_watts)
        attribution = config.attribution
        self._baseline = IdleBaseline(attribution.idle_learn_window_seconds,
                                      attribution.idle_learn_max_utilisation)
        self._pending = _Pending()
        # Joules by which the meter read less than the components in earlier intervals,
        # taken from the next positive remainders, so that over time `other` adds up to
        # the meter minus the components and clamping adds no energy of its own.
        self._deficit = 0.0
        self._last_watts: dict[tuple[str, str], float] = {}
        self.remainders = 0  # intervals booked, for the simulations' figures
        self.negative_remainders = 0

    @property
    def meters(self) -> tuple[PlatformMeter, ...]:
        return self._meters

    def close(self) -> None:
        for meter in self._meters:
            meter.close()

    def sample(self, now: float, cycle: CycleEnergy) -> StageResult:
        faults: list[Fault] = []
        source_up: dict[str, bool] = {}
        energies: list[SensorEnergy] = []
        # The meter whose readings are the node's total: the first one already read
        # before this cycle, so this cycle's interval lies inside its readings.
        primary = next((m.source for m in self._meters
                        if self._integrator.has_baseline(m.source)), None)
        for meter in self._meters:
            samples, meter_faults = meter.latest()
            faults.extend(meter_faults)
            source_up[meter.source] = source_up.get(meter.source, True) and not meter_faults
            if meter_faults and not samples:
                self._integrator.forget(meter.source)
            found, step_faults = self._integrator.advance(samples)
            faults.extend(step_faults)
            energies.extend(found)
        raw: dict[tuple[str, str], float] = {}
        for energy in energies:
            key = (energy.source, energy.sensor)
            raw[key] = raw.get(key, 0.0) + energy.joules

        if primary is None:
            self._pending = _Pending()
            self._deficit = 0.0
        elif cycle.dt is not None and cycle.dt > 0:
            pending = self._pending
            pending.splits.extend(cycle.splits)
            pending.seconds += cycle.dt
            if cycle.utilisation is None:
                pending.utilisation_known = False
            else:
                pending.busy_seconds += cycle.utilisation * cycle.dt
            pending.activities = list(cycle.activities)
        chosen = primary if any(e.source == primary for e in energies) else None

        splits: list[ComponentSplit[Hashable]] = []
        if chosen is not None:
            mine = [e for e in energies if e.source == chosen]
            split, fault = self._book(chosen, mine, now)
            if fault is not None:
                faults.append(fault)
            if split is not None:
                splits.append(split)
        if not any(self._integrator.has_baseline(m.source) for m in self._meters):
            self._last_watts = {}  # every meter failed: no stale gauge
        # Between refreshes of a slow meter the node's power gauge keeps its last value.
        watts = dict(self._last_watts)
        return StageResult(splits=splits, faults=faults, source_up=source_up, watts=watts,
                           platform_energy=raw)

    def _book(self, source: str, energies: list[SensorEnergy], now: float
              ) -> tuple[ComponentSplit[Hashable] | None, Fault | None]:
        pending, self._pending = self._pending, _Pending()
        if pending.seconds <= 0:
            return None, None  # the first readings: a baseline only
        platform = sum(e.joules for e in energies)
        span = max(e.end for e in energies) - min(e.start for e in energies)
        inside = sum(s.joules for s in pending.splits)
        other, shortfall = platform_remainder(platform, inside + self._deficit)
        self._deficit = shortfall
        self.remainders += 1
        fault = None
        if platform < inside:
            self.negative_remainders += 1
            fault = Fault(source, "negative_remainder", COMPONENT,
                          f"meter read {platform:.1f} J over {span:.3g} s, "
                          f"{inside - platform:.1f} J less than cpu+dram+gpu "
                          f"({inside:.1f} J); other is 0 for this interval and the "
                          "difference is taken from the next intervals' other")
        watts = other / pending.seconds
        # The gauge: the meter's average power minus the components' over their cycles, so
        # that kwatt_node_power_watts adds up to the meter exactly (while it reads more).
        gauge = (max(platform / span - inside / pending.seconds, 0.0) if span > 0
                 else watts)
        utilisation = (pending.busy_seconds / pending.seconds
                       if pending.utilisation_known else None)
        configured = self._config.attribution.idle_watts_other
        baseline = configured if configured is not None else self._baseline.watts()
        if configured is None and utilisation is not None:
            self._baseline.observe(now, watts, utilisation)
        energy = ComponentEnergy(COMPONENT, source, other,
                                 None if baseline is None else baseline * pending.seconds)
        self._last_watts = {(COMPONENT, source): gauge}
        if utilisation is None:
            # Without node CPU time nothing can be split: book it, charge nobody.
            return ComponentSplit(COMPONENT, source, other, {}, 0.0, other), fault
        weights, total = active_weights(pending.splits)
        split = attribute_other(energy, utilisation, weights, total, pending.activities,
                                self._config.attribution.idle_policy)
        return split, fault
