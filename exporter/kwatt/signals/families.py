"""The carbon-intensity and price gauges, shared by static config and fetched sources."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import GaugeMetricFamily, Metric

CARBON_METRIC = "kwatt_carbon_intensity_grams_per_kwh"
PRICE_METRIC = "kwatt_energy_price_per_kwh"


@dataclass(frozen=True)
class SignalReading:
    """What one cycle publishes for one signal."""

    value: float
    zone: str
    kind: str
    currency: str


def carbon_family(node: str, readings: Iterable[SignalReading]) -> Metric:
    family = GaugeMetricFamily(
        CARBON_METRIC, "Grid carbon intensity (g CO2e per kWh) of the node's zone, from the "
        "configured source (static, electricitymaps, ukgrid, file).",
        labels=("node", "zone", "source"))
    for reading in readings:
        family.add_metric((node, reading.zone, reading.kind), reading.value)
    return family


def price_family(node: str, readings: Iterable[SignalReading]) -> Metric:
    family = GaugeMetricFamily(
        PRICE_METRIC, "Energy price per kWh now (time of use), from the configured source "
        "(static, http, file).", labels=("node", "currency", "zone", "source"))
    for reading in readings:
        family.add_metric((node, reading.currency, reading.zone, reading.kind), reading.value)
    return family


def renderer(node: str, family: Callable[[str, Iterable[SignalReading]], Metric]
             ) -> Callable[[object | None], Iterator[Metric]]:
    """A StageRenderer: nothing at all while no current value is held (never a 0)."""
    def render(snapshot: object | None) -> Iterator[Metric]:
        if isinstance(snapshot, SignalReading):
            yield family(node, (snapshot,))
    return render
