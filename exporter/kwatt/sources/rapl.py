"""RAPL energy counters read from the powercap sysfs tree.

Zones live at ``<sysfs>/class/powercap/intel-rapl:N`` (package, psys, sometimes dram) and
``intel-rapl:N:M`` (core, uncore, dram). AMD Zen uses the same driver and names, without
dram. ``intel-rapl-mmio:N`` zones repeat the package counter through MMIO and are dropped,
or the package would be counted twice.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kwatt.counters import CounterLimits, ceiling_from_limits, checked_step
from kwatt.faults import Fault, reason_for_oserror

SOURCE = "rapl"
# The highest average power a zone can honestly show when powercap states no limit for it
# (see kwatt.counters). Today's largest server sockets are rated 500 W (AMD EPYC 9005,
# Intel Xeon 6900P); 3x that leaves room for turbo above TDP and for parts to come. DRAM:
# 12 channels x 2 DIMMs at ~20 W is ~500 W per socket; 2x that. psys is the whole
# platform. A glitch that looks like a wrap implies hundreds of kW, far above any of them.
BOUND_WATTS = {"package": 1500.0, "core": 1500.0, "uncore": 1500.0, "dram": 1000.0,
               "psys": 5000.0}
UNKNOWN_ZONE_BOUND_WATTS = 5000.0
# max_energy_range_uj is 2^32 energy units; the coarsest unit RAPL's ESU field allows is
# 1 J, so no honest range exceeds 2^32 J. A range under 1 J would wrap many times per
# interval and cannot be corrected either.
MAX_ENERGY_RANGE_UJ = (1_000_000, 2**32 * 1_000_000)
_CONSTRAINT_FILE = re.compile(r"^constraint_\d+_(max_power_uw|power_limit_uw)$")
_ZONE_DIR = re.compile(r"^intel-rapl:(\d+)(?::(\d+))?$")
_TRAILING_INDEX = re.compile(r"-\d+$")


@dataclass(frozen=True)
class RaplZone:
    """One powercap zone: its label, its sysfs index, what it measures and its wrap point."""

    zone: str  # package-0, core-0, uncore-0, dram-0, psys
    index: str  # sysfs id: "0" or "0:2"
    kind: str  # package, core, uncore, dram, psys, or the raw name for unknown zones
    energy_path: str
    max_energy_range_uj: int | None
    ceiling_watts: float = UNKNOWN_ZONE_BOUND_WATTS  # see kwatt.counters

    def current_ceiling(self) -> float:
        """The ceiling from the zone's power limits as they are now (they can be raised at
        runtime); read only when a step was rejected for its power."""
        return zone_ceiling(os.path.dirname(self.energy_path), self.kind)


@dataclass(frozen=True)
class RaplReading:
    """Raw ``energy_uj`` values of the zones that could be read, plus what failed."""

    energy_uj: Mapping[RaplZone, int]
    faults: tuple[Fault, ...]


def _read_int(path: str) -> int:
    with open(path, "rb") as handle:
        text = handle.read(64).decode("ascii", "replace").strip()
    value = int(text)
    if value < 0:
        raise ValueError(f"negative value {value}")
    return value


def discover_rapl_zones(sysfs: str) -> tuple[list[RaplZone], list[Fault]]:
    """List the usable zones under ``sysfs``; zones whose metadata cannot be read are faults."""
    root = os.path.join(sysfs, "class", "powercap")
    try:
        names = sorted(os.listdir(root))
    except FileNotFoundError:
        return [], []
    except OSError as exc:
        return [], [Fault(SOURCE, reason_for_oserror(exc), root, exc.strerror or str(exc))]
    zones: list[RaplZone] = []
    faults: list[Fault] = []
    for name in names:
        match = _ZONE_DIR.match(name)
        if match is None:  # intel-rapl (control type), intel-rapl-mmio:N (duplicates), others
            continue
        zone_dir = os.path.join(root, name)
        index = match.group(1) if match.group(2) is None else f"{match.group(1)}:{match.group(2)}"
        try:
            with open(os.path.join(zone_dir, "name"), encoding="ascii", errors="replace") as f:
                raw_name = f.read().strip()
        except OSError as exc:
            faults.append(Fault(SOURCE, reason_for_oserror(exc), f"{name}/name",
                                exc.strerror or str(exc)))
            continue
        if not raw_name or not re.fullmatch(r"[A-Za-z0-9_-]+", raw_name):
            faults.append(Fault(SOURCE, "parse", f"{name}/name", f"bad zone name {raw_name!r}"))
            continue
        kind = _TRAILING_INDEX.sub("", raw_name)
        if _TRAILING_INDEX.search(raw_name):
            label = raw_name
        elif kind == "psys":
            label = "psys" if match.group(1) == "0" else f"psys-{match.group(1)}"
        else:  # core, uncore, dram: say which package they belong to
            label = f"{kind}-{match.group(1)}"
        max_range: int | None
        try:
            max_range = _read_int(os.path.join(zone_dir, "max_energy_range_uj")) or None
        except (OSError, ValueError):
            max_range = None  # wraps then cannot be corrected; see kwatt.counters
        if max_range is not None and not (
                MAX_ENERGY_RANGE_UJ[0] <= max_range <= MAX_ENERGY_RANGE_UJ[1]):
            faults.append(Fault(SOURCE, "implausible", f"{label} max_energy_range_uj",
                                f"{max_range} is outside {MAX_ENERGY_RANGE_UJ[0]}.."
                                f"{MAX_ENERGY_RANGE_UJ[1]}; wraps will not be corrected"))
            max_range = None
        zones.append(RaplZone(label, index, kind, os.path.join(zone_dir, "energy_uj"),
                              max_range, zone_ceiling(zone_dir, kind)))
    return zones, faults


def zone_ceiling(zone_dir: str, kind: str) -> float:
    """Twice the highest power limit the zone states, at most the documented bound."""
    return ceiling_from_limits(_power_limits_watts(zone_dir),
                               BOUND_WATTS.get(kind, UNKNOWN_ZONE_BOUND_WATTS))


def _power_limits_watts(zone_dir: str) -> list[float]:
    """Every power limit and maximum the zone's powercap constraints state, in watts."""
    try:
        names = os.listdir(zone_dir)
    except OSError:
        return []
    out: list[float] = []
    for name in names:
        if _CONSTRAINT_FILE.match(name):
            try:
                out.append(_read_int(os.path.join(zone_dir, name)) / 1e6)
            except (OSError, ValueError):
                continue  # an unreadable limit only means the generous bound applies
    return out


def read_rapl_zones(zones: Iterable[RaplZone]) -> RaplReading:
    """Read every zone's ``energy_uj``; an unreadable or garbled zone is a fault, never 0."""
    values: dict[RaplZone, int] = {}
    faults: list[Fault] = []
    for zone in zones:
        try:
            values[zone] = _read_int(zone.energy_path)
        except OSError as exc:
            faults.append(Fault(SOURCE, reason_for_oserror(exc), f"{zone.zone} energy_uj",
                                exc.strerror or str(exc)))
        except ValueError as exc:
            faults.append(Fault(SOURCE, "parse", f"{zone.zone} energy_uj", str(exc)))
    return RaplReading(values, tuple(faults))


def component_energy_joules(zones: Iterable[RaplZone],
                            deltas_j: Mapping[RaplZone, float]) -> dict[str, float]:
    """Non-overlapping node components from zone deltas: cpu (packages, else psys), dram.

    A component is reported only when every zone that makes it up has a delta, so a zone
    that failed this interval never makes the node look cheaper than it is.
    """
    by_kind: dict[str, list[RaplZone]] = {}
    for zone in zones:
        by_kind.setdefault(zone.kind, []).append(zone)
    out: dict[str, float] = {}
    cpu_zones = by_kind.get("package") or by_kind.get("psys") or []
    for component, members in (("cpu", cpu_zones), ("dram", by_kind.get("dram", []))):
        if members and all(zone in deltas_j for zone in members):
            out[component] = sum(deltas_j[zone] for zone in members)
    return out


class RaplCounters:
    """Turns successive raw readings into per-zone joule deltas that pass the plausibility
    rule of ``kwatt.counters`` (wrap-aware, power ceiling)."""

    def __init__(self) -> None:
        self._previous: dict[RaplZone, int] = {}
        # Ceilings re-derived after discovery because a power limit was raised at runtime.
        self._ceilings: dict[RaplZone, float] = {}

    def readings(self) -> dict[RaplZone, int]:
        """The raw values the next deltas start from (for the restart state file)."""
        return dict(self._previous)

    def seed(self, values: Mapping[RaplZone, int]) -> None:
        """Start the next deltas from values read before a restart."""
        self._previous.update(values)

    def advance(self, reading: RaplReading, dt: float | None
                ) -> tuple[dict[RaplZone, float], list[Fault]]:
        """``dt``: seconds since the previous reading (None: unknown, nothing is booked)."""
        deltas: dict[RaplZone, float] = {}
        faults: list[Fault] = []
        for zone, value in reading.energy_uj.items():
            previous = self._previous.get(zone)
            # Re-baselined on every reading, plausible or not: a counter that really
            # jumped (a reset, a new baseline) is measured again from the next interval.
            self._previous[zone] = value
            if previous is None:
                continue
            limits = CounterLimits(1e-6, self._ceilings.get(zone, zone.ceiling_watts),
                                   zone.max_energy_range_uj)
            step, self._ceilings[zone] = checked_step(previous, value, dt, limits,
                                                      zone.current_ceiling)
            if step.problem is not None:
                faults.append(Fault(SOURCE, "implausible", f"{zone.zone} energy_uj",
                                    step.problem))
            elif step.joules is not None:
                deltas[zone] = step.joules
        # A zone that failed must be re-baselined when it comes back: a delta spanning
        # the outage would add energy already covered by the fallback estimate.
        for zone in list(self._previous):
            if zone not in reading.energy_uj:
                del self._previous[zone]
        return deltas, faults
