"""Meter samples -> joules per sensor, over each sensor's own reading times.

A sensor with an energy counter is differenced through kwatt.counters' plausibility rule
(in microjoule units, no known wrap point: a lower reading is a reset, re-baselined and
counted); while it does not move, its baseline stays, so a coarse step is judged over the
whole time it took. A sensor that reports only power is integrated by the trapezoid rule between two
readings, each at its own ``read_at``. Either way a step implying more than the ceiling is
implausible: counted, re-baselined, nothing booked.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

from kwatt.counters import CounterLimits, checked_step
from kwatt.faults import Fault
from kwatt.sources.meter import MeterSample

MICRO = 1e-6


@dataclass(frozen=True)
class SensorEnergy:
    """Energy one sensor measured between two of its readings."""

    source: str
    sensor: str
    joules: float
    start: float  # read_at of the earlier reading
    end: float  # read_at of the later one


class MeterIntegrator:
    def __init__(self, ceiling_watts: float) -> None:
        self._limits = CounterLimits(unit_joules=MICRO, ceiling_watts=ceiling_watts)
        self._last: dict[tuple[str, str], MeterSample] = {}

    def has_baseline(self, source: str) -> bool:
        return any(key[0] == source for key in self._last)

    def forget(self, source: str) -> None:
        """The meter failed: the next reading only sets a new baseline."""
        for key in [k for k in self._last if k[0] == source]:
            del self._last[key]

    def advance(self, samples: Iterable[MeterSample]) -> tuple[list[SensorEnergy], list[Fault]]:
        out: list[SensorEnergy] = []
        faults: list[Fault] = []
        for sample in samples:
            key = (sample.source, sample.sensor)
            previous = self._last.get(key)
            if previous is not None and sample.generation == previous.generation:
                continue  # nothing new since the last cycle (a slow meter)
            if (previous is not None and sample.energy_joules is not None
                    and sample.energy_joules == previous.energy_joules):
                # A counter that moves in coarse steps (a BMC's EnergykWh in 0.01 or 1 kWh):
                # keep the baseline and its time, so the step is judged, and its energy
                # spread, over all the time it took.
                continue
            self._last[key] = sample
            if previous is None:
                continue
            dt = sample.read_at - previous.read_at
            if dt <= 0:
                continue
            joules, problem = self._step(previous, sample, dt)
            if problem is not None:
                faults.append(Fault(sample.source, "implausible", sample.sensor, problem))
                continue
            if joules is not None:
                out.append(SensorEnergy(sample.source, sample.sensor, joules,
                                        previous.read_at, sample.read_at))
        return out, faults

    def _step(self, previous: MeterSample, sample: MeterSample, dt: float
              ) -> tuple[float | None, str | None]:
        if sample.energy_joules is not None and previous.energy_joules is not None:
            if not (math.isfinite(sample.energy_joules)
                    and math.isfinite(previous.energy_joules)):
                return None, "energy counter is not a finite number"
            step, _ = checked_step(round(previous.energy_joules / MICRO),
                                   round(sample.energy_joules / MICRO), dt, self._limits,
                                   lambda: self._limits.ceiling_watts)
            return step.joules, step.problem
        if sample.watts is not None and previous.watts is not None:
            for watts in (previous.watts, sample.watts):
                if not math.isfinite(watts) or watts < 0 or watts > self._limits.ceiling_watts:
                    return None, (f"power reading {watts} W is outside 0 to the "
                                  f"{self._limits.ceiling_watts:.0f} W ceiling")
            return (previous.watts + sample.watts) / 2.0 * dt, None
        return None, None
