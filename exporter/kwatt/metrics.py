"""The Prometheus collector: renders the sampler's latest snapshot, does no I/O.

Metric families are built fresh on every scrape from an immutable snapshot, so finished
workloads simply stop being rendered once the ledger drops them, and no global instrument
holds per-workload series.
"""

from __future__ import annotations

import platform
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from kwatt import __version__
from kwatt.ledger import LedgerSnapshot
from kwatt.signals.families import SignalReading, carbon_family, price_family

CONTAINER_LABELS = ("namespace", "pod", "container", "workload", "workload_kind")


@dataclass(frozen=True)
class StaticInfo:
    """Values that do not change while the exporter runs."""

    node: str
    interval_seconds: float
    carbon_intensity_grams_per_kwh: float | None
    energy_price_per_kwh: float | None
    energy_price_currency: str
    pue: float
    # Zone labels of the static carbon intensity and price (configured; "" when unset).
    carbon_zone: str = ""
    price_zone: str = ""
    # Embodied carbon amortised per second of the hardware's lifetime; None: not configured.
    embodied_grams_per_second: float | None = None


class KwattCollector(Collector):
    def __init__(self, snapshot: Callable[[], LedgerSnapshot], info: StaticInfo) -> None:
        self._snapshot = snapshot
        self._info = info

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        node = self._info.node

        family = CounterMetricFamily(
            "kwatt_node_energy_joules_total",
            "Energy used by the node, by non-overlapping component (cpu, dram, gpu, other: "
            "a platform meter minus the rest) and by where the number comes from (rapl, "
            "nvml, hwmon: measured; estimated: power model).",
            labels=("node", "component", "source"))
        for component, source, joules in snap.node_energy:
            family.add_metric((node, component, source), joules)
        yield family

        gauge = GaugeMetricFamily(
            "kwatt_node_power_watts",
            "Average node power per component over the last sample interval.",
            labels=("node", "component", "source"))
        for component, source, watts in snap.node_power:
            gauge.add_metric((node, component, source), watts)
        yield gauge

        family = CounterMetricFamily(
            "kwatt_rapl_zone_energy_joules_total",
            "Raw RAPL zone energy, wrap-corrected. Zones overlap (core is inside package): "
            "for detail only, never sum them.",
            labels=("node", "zone", "index"))
        for zone, index, joules in snap.zone_energy:
            family.add_metric((node, zone, index), joules)
        yield family

        family = CounterMetricFamily(
            "kwatt_platform_energy_joules_total",
            "Raw energy of each platform meter sensor (hwmon, Redfish, ...), integrated "
            "from its own readings. Detail only: sensors may overlap each other and the "
            "components; the node's `other` component is the meter minus cpu, dram, gpu.",
            labels=("node", "source", "sensor"))
        for source, sensor, joules in snap.platform_energy:
            family.add_metric((node, source, sensor), joules)
        yield family

        family = CounterMetricFamily(
            "kwatt_container_energy_joules_total",
            "Energy attributed to one container (or systemd unit in host mode) by component; "
            "containers with identical labels (a restart) share one series.",
            labels=("node", *CONTAINER_LABELS, "component"))
        for row in snap.containers:
            labels = row.labels
            base = (node, labels.namespace, labels.pod, labels.container, labels.workload,
                    labels.workload_kind)
            for component, joules in row.energy:
                family.add_metric((*base, component), joules)
        yield family

        family = CounterMetricFamily(
            "kwatt_workload_energy_joules_total",
            "Energy attributed to the containers of one workload (Deployment, CronJob, ...); "
            "outlives its pods, for 25 h after the workload's last activity.",
            labels=("node", "namespace", "workload", "workload_kind", "component"))
        for namespace, workload, kind, component, joules in snap.workload_energy:
            family.add_metric((node, namespace, workload, kind, component), joules)
        yield family

        family = CounterMetricFamily(
            "kwatt_namespace_energy_joules_total",
            "Energy attributed to containers of one namespace; keeps the energy of finished "
            "pods for the exporter's lifetime.",
            labels=("node", "namespace", "component"))
        for namespace, component, joules in snap.namespace_energy:
            family.add_metric((node, namespace, component), joules)
        yield family

        family = CounterMetricFamily(
            "kwatt_unattributed_energy_joules_total",
            "Node energy charged to no container: idle (static power), system (processes "
            "outside containers), unallocated (GPUs nobody holds).",
            labels=("node", "component", "reason"))
        for component, reason, joules in snap.unattributed:
            family.add_metric((node, component, reason), joules)
        yield family

        yield from self._health(snap)
        yield from self._static()

    def _health(self, snap: LedgerSnapshot) -> Iterator[Metric]:
        node = self._info.node
        up = GaugeMetricFamily(
            "kwatt_source_up",
            "1 when the source was read without fault in the last sample, else 0.",
            labels=("node", "source"))
        for source, is_up in snap.source_up:
            up.add_metric((node, source), 1.0 if is_up else 0.0)
        yield up

        errors = CounterMetricFamily(
            "kwatt_source_errors_total",
            "Failed reads by source and reason (permission, absent, parse, timeout, api).",
            labels=("node", "source", "reason"))
        for source, reason, count in snap.source_errors:
            errors.add_metric((node, source, reason), count)
        yield errors

        hist = snap.sample_duration
        histogram = HistogramMetricFamily(
            "kwatt_sample_duration_seconds", "Duration of one sampler cycle.",
            labels=("node",))
        histogram.add_metric(
            (node,), [(_bound(b), float(c)) for b, c in hist.buckets], hist.total)
        yield histogram

        retained = GaugeMetricFamily(
            "kwatt_retained_containers",
            "Finished containers whose series are still exposed (retention window).",
            labels=("node",))
        retained.add_metric((node,), snap.containers_retained)
        yield retained

    def _static(self) -> Iterator[Metric]:
        info = self._info
        family = GaugeMetricFamily(
            "kwatt_sample_interval_seconds", "Configured sampling interval.", labels=("node",))
        family.add_metric((info.node,), info.interval_seconds)
        yield family

        family = GaugeMetricFamily(
            "kwatt_build_info", "Build information; always 1.",
            labels=("node", "version", "python_version"))
        family.add_metric((info.node, __version__, platform.python_version()), 1.0)
        yield family

        # Static signals; fetched ones are rendered by their stages (kwatt.signals.stage)
        # with the same families, so either way there is one series per node.
        if info.carbon_intensity_grams_per_kwh is not None:
            yield carbon_family(info.node, (SignalReading(
                info.carbon_intensity_grams_per_kwh, info.carbon_zone, "static", ""),))
        if info.energy_price_per_kwh is not None:
            yield price_family(info.node, (SignalReading(
                info.energy_price_per_kwh, info.price_zone, "static",
                info.energy_price_currency),))
        family = GaugeMetricFamily(
            "kwatt_pue_ratio",
            "Power usage effectiveness from config (facility / IT energy, >= 1).",
            labels=("node",))
        family.add_metric((info.node,), info.pue)
        yield family
        if info.embodied_grams_per_second is not None:
            family = GaugeMetricFamily(
                "kwatt_embodied_grams_per_second",
                "Embodied carbon of the node's hardware from config, amortised over its "
                "lifetime (g CO2e per second).", labels=("node",))
            family.add_metric((info.node,), info.embodied_grams_per_second)
            yield family


def _bound(value: float) -> str:
    return "+Inf" if value == float("inf") else repr(value)
