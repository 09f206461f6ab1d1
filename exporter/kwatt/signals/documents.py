"""Pure parsers: an API's JSON body or an operator's file -> a ``SignalDocument``.

Formats (docs/carbon-and-cost.md cites the providers' documentation):

* Electricity Maps ``/v3/carbon-intensity/latest``: an object whose ``carbonIntensity`` is
  g CO2eq/kWh.
* UK National Grid carbon-intensity API: ``{"data": [...]}``; national ``/intensity`` has
  ``data[0].intensity``, regional ``/regional/regionid/<id>`` has
  ``data[0].data[0].intensity``; ``actual`` when the API has it, else ``forecast``.
* kwatt's own document (the ``file`` kinds and the price ``http`` kind): a bare number, or
  a mapping with ``value`` (required), an optional time-of-use ``schedule`` whose first
  matching window wins, ``timezone`` and (prices) ``currency``.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

# Plausibility: the dirtiest grids (lignite) are about 1,100 g/kWh; prices can be negative
# in day-ahead markets but not by thousands per kWh. Anything outside is a broken feed.
CARBON_RANGE = (0.0, 3000.0)
PRICE_RANGE = (-1000.0, 1000.0)

_DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_TIME = re.compile(r"^([01]\d|2[0-4]):([0-5]\d)$")
_DOCUMENT_KEYS = {"value", "schedule", "timezone", "currency"}
_ENTRY_KEYS = {"days", "from", "to", "value"}


class DocumentError(Exception):
    """A body or file that cannot give a value; ``reason`` is a fault reason."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ScheduleEntry:
    """``value`` on ``days`` (0 = Monday) from ``start`` to ``end`` minutes after midnight;
    an ``end`` at or before ``start`` runs past midnight into the next day."""

    days: frozenset[int]
    start: int
    end: int
    value: float

    def matches(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        return (weekday in self.days and minute >= self.start) or (
            (weekday - 1) % 7 in self.days and minute < self.end)


@dataclass(frozen=True)
class SignalDocument:
    """A constant, or a schedule evaluated at the moment the cycle publishes it."""

    default: float
    schedule: tuple[ScheduleEntry, ...] = ()
    timezone: dt.tzinfo = dt.UTC
    currency: str | None = None

    def value_at(self, wall_seconds: float) -> float:
        if not self.schedule:
            return self.default
        local = dt.datetime.fromtimestamp(wall_seconds, self.timezone)
        minute = local.hour * 60 + local.minute
        for entry in self.schedule:
            if entry.matches(local.weekday(), minute):
                return entry.value
        return self.default


def _number(value: object, where: str, bounds: tuple[float, float]) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DocumentError("parse", f"{where}: expected a number, got {_short(value)}")
    number = float(value)
    if not math.isfinite(number) or not bounds[0] <= number <= bounds[1]:
        raise DocumentError("implausible",
                            f"{where}: {number!r} is outside {bounds[0]:g}..{bounds[1]:g}")
    return number


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _mapping(value: object, where: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise DocumentError("parse", f"{where}: expected an object, got {_short(value)}")
    return value


def _first(value: object, where: str) -> object:
    if not isinstance(value, list) or not value:
        raise DocumentError("parse", f"{where}: expected a non-empty list")
    return value[0]


def parse_electricitymaps(body: object, zone: str = "") -> SignalDocument:
    data = _mapping(body, "response")
    if "carbonIntensity" not in data:
        raise DocumentError("parse", "response: no carbonIntensity")
    # The API falls back to the caller's IP location when it does not know the zone: an
    # answer for another zone is not this node's intensity.
    answered = data.get("zone")
    if zone and isinstance(answered, str) and answered != zone:
        raise DocumentError("implausible", f"response is for zone {_short(answered)}, "
                            f"asked for {zone!r}")
    return SignalDocument(_number(data["carbonIntensity"], "carbonIntensity", CARBON_RANGE))


def parse_ukgrid(body: object) -> SignalDocument:
    item = _mapping(_first(_mapping(body, "response").get("data"), "data"), "data[0]")
    where = "data[0]"
    if "intensity" not in item:  # regional: one more level of per-period data
        item = _mapping(_first(item.get("data"), "data[0].data"), "data[0].data[0]")
        where = "data[0].data[0]"
    intensity = _mapping(item.get("intensity"), f"{where}.intensity")
    actual = intensity.get("actual")
    if actual is not None:
        return SignalDocument(_number(actual, f"{where}.intensity.actual", CARBON_RANGE))
    return SignalDocument(
        _number(intensity.get("forecast"), f"{where}.intensity.forecast", CARBON_RANGE))


def _minutes(value: object, where: str) -> int:
    text = value if isinstance(value, str) else ""
    match = _TIME.match(text)
    if not match or (match.group(1) == "24" and match.group(2) != "00"):
        raise DocumentError("parse", f"{where}: expected HH:MM, got {_short(value)}")
    return int(match.group(1)) * 60 + int(match.group(2))


def _days(value: object, where: str) -> frozenset[int]:
    if value is None:
        return frozenset(range(7))
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, Sequence) or not names or not all(
            isinstance(n, str) and n.lower() in _DAYS for n in names):
        raise DocumentError("parse", f"{where}: expected day names out of "
                            f"{', '.join(_DAYS)}, got {_short(value)}")
    return frozenset(_DAYS.index(str(n).lower()) for n in names)


def _entry(raw: object, where: str, bounds: tuple[float, float]) -> ScheduleEntry:
    entry = _mapping(raw, where)
    unknown = set(entry) - _ENTRY_KEYS
    if unknown:
        raise DocumentError("parse", f"{where}: unknown key {sorted(unknown)[0]!r}")
    start = _minutes(entry.get("from"), f"{where}.from")
    end = _minutes(entry.get("to"), f"{where}.to")
    if start == end:
        raise DocumentError("parse", f"{where}: from and to are equal")
    return ScheduleEntry(_days(entry.get("days"), f"{where}.days"), start, end % (24 * 60),
                         _number(entry.get("value"), f"{where}.value", bounds))


def parse_document(body: object, bounds: tuple[float, float],
                   allow_currency: bool) -> SignalDocument:
    """kwatt's own format; ``bounds`` is CARBON_RANGE or PRICE_RANGE."""
    if isinstance(body, int | float) and not isinstance(body, bool):
        return SignalDocument(_number(body, "value", bounds))
    data = _mapping(body, "document")
    allowed = _DOCUMENT_KEYS if allow_currency else _DOCUMENT_KEYS - {"currency"}
    unknown = set(data) - allowed
    if unknown:
        raise DocumentError("parse", f"document: unknown key {sorted(unknown)[0]!r}")
    # Required even with a schedule: the value outside every window, so there is no hour
    # without one.
    if data.get("value") is None:
        raise DocumentError("parse", "document: no value")
    default = _number(data["value"], "value", bounds)
    raw_schedule = data.get("schedule") or []
    if not isinstance(raw_schedule, list):
        raise DocumentError("parse", "schedule: expected a list")
    schedule = tuple(_entry(e, f"schedule[{i}]", bounds) for i, e in enumerate(raw_schedule))
    timezone: dt.tzinfo = dt.UTC
    if data.get("timezone") is not None:
        name = data["timezone"]
        try:
            timezone = ZoneInfo(str(name))
        except (ZoneInfoNotFoundError, ValueError):
            raise DocumentError("parse", f"timezone: unknown zone {_short(name)}") from None
    currency = data.get("currency")
    if currency is not None and (not isinstance(currency, str) or not currency
                                 or len(currency) > 16):
        raise DocumentError("parse", f"currency: expected a short string, got "
                            f"{_short(currency)}")
    return SignalDocument(default, schedule, timezone, currency)
