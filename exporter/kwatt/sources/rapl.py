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

from kwatt.faults import Fault, reason_for_oserror

SOURCE = "rapl"
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
            max_range = None  # wraps then cannot be corrected; see energy_delta_uj
        zones.append(RaplZone(label, index, kind, os.path.join(zone_dir, "energy_uj"), max_range))
    return zones, faults


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


def energy_delta_uj(previous: int, current: int, max_range: int | None) -> int | None:
    """Energy between two readings, correcting one wraparound; None if it cannot be known.

    A counter that went down has wrapped (at most once: the sampling interval is far
    shorter than the wrap period, minutes at full power). Without ``max_energy_range_uj``
    the size of the wrap is unknown, so the interval is dropped rather than guessed.
    """
    if current >= previous:
        return current - previous
    if max_range is None or previous > max_range:
        return None
    return max_range - previous + current


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
    """Turns successive raw readings into per-zone joule deltas, wrap-corrected."""

    def __init__(self) -> None:
        self._previous: dict[RaplZone, int] = {}

    def readings(self) -> dict[RaplZone, int]:
        """The raw values the next deltas start from (for the restart state file)."""
        return dict(self._previous)

    def seed(self, values: Mapping[RaplZone, int]) -> None:
        """Start the next deltas from values read before a restart."""
        self._previous.update(values)

    def advance(self, reading: RaplReading) -> tuple[dict[RaplZone, float], list[Fault]]:
        deltas: dict[RaplZone, float] = {}
        faults: list[Fault] = []
        for zone, value in reading.energy_uj.items():
            previous = self._previous.get(zone)
            self._previous[zone] = value
            if previous is None:
                continue
            delta = energy_delta_uj(previous, value, zone.max_energy_range_uj)
            if delta is None:
                faults.append(Fault(SOURCE, "parse", f"{zone.zone} energy_uj",
                                    f"counter went from {previous} to {value} with no "
                                    "max_energy_range_uj to correct the wrap"))
                continue
            deltas[zone] = delta / 1e6
        # A zone that failed must be re-baselined when it comes back: a delta spanning
        # the outage would add energy already covered by the fallback estimate.
        for zone in list(self._previous):
            if zone not in reading.energy_uj:
                del self._previous[zone]
        return deltas, faults
