"""What every platform power meter hands the platform stage: hwmon, Redfish, IPMI, ...

A meter is read on its own cadence (a BMC answers in seconds, hwmon in microseconds) and
keeps its newest sample; the stage takes whatever is newest each cycle and never waits.
Each sample carries the time it was read, so power is integrated over the meter's own
interval, not the sampler's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from kwatt.faults import Fault


@dataclass(frozen=True)
class MeterSample:
    """One reading of one sensor.

    ``source``: the kwatt_source_up name of the meter kind ("hwmon", "redfish", "ipmi").
    ``sensor``: which sensor of that source, stable across restarts (an hwmon chip and
    channel, a Redfish chassis id); a label value, so short and never a secret.
    ``read_at``: monotonic seconds when the value was taken (the reply's arrival for a
    remote meter).
    ``watts``: instantaneous or averaged power, when the sensor reports power.
    ``energy_joules``: the sensor's cumulative energy counter, as read, when it has one;
    differences pass kwatt.counters' plausibility rule before they become joules.
    ``generation``: increases with every new reading, so a consumer can tell a fresh
    sample from the one it already used.
    """

    source: str
    sensor: str
    read_at: float
    watts: float | None
    energy_joules: float | None
    generation: int


class PlatformMeter(Protocol):
    """A whole-node meter. ``latest`` never blocks on I/O: slow meters poll on a thread."""

    source: str

    def latest(self) -> tuple[Sequence[MeterSample], Sequence[Fault]]:
        """The newest sample of each sensor, and the faults since the previous call."""
        ...

    def close(self) -> None:
        """Stop any polling thread and release handles."""
        ...
