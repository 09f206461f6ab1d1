"""Optional OTLP push of the same metrics /metrics serves (``pip install kwatt[otlp]``).

For users without Prometheus. Every ``--otlp.interval`` a thread collects the exporter's
registry, the same families a scrape renders, and pushes them over OTLP/HTTP with the
OpenTelemetry SDK's exporter. Names, units and labels are the exposition's: a family
``kwatt_node_energy_joules`` (exposed as ``..._total``) becomes a monotonic cumulative Sum
named ``kwatt_node_energy_joules`` with unit ``J``, and every label becomes a point
attribute. The node is also the resource's ``host.name``. An OpenTelemetry Collector's
Prometheus exporter turns them back into the same series.

The conversion is a pure function of the families; only the pusher does I/O, on its own
thread, so a slow or absent collector never delays sampling or /metrics.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.metrics_core import Metric as Family

from kwatt import __version__
from kwatt.logs import RateLimitedLog

log = logging.getLogger("kwatt.otlp")

# Unit of a family by its name's unit suffix (Prometheus naming) -> UCUM, as OTLP carries.
_UNITS = (("_joules", "J"), ("_watts", "W"), ("_seconds", "s"), ("_bytes", "By"),
          ("_ratio", "1"), ("_grams_per_kwh", "g/kW.h"), ("_per_kwh", "1/kW.h"))


class OtlpUnavailable(Exception):
    """--otlp.endpoint is set but the optional OpenTelemetry packages are not installed."""


def unit_of(name: str) -> str:
    for suffix, unit in _UNITS:
        if name.endswith(suffix):
            return unit
    return ""


def metrics_data(families: Iterable[Family], node: str, start_ns: int, now_ns: int) -> Any:
    """The OTLP ``MetricsData`` for collected Prometheus families (counters, gauges,
    histograms; info and other types are sent as gauges of their samples)."""
    from opentelemetry.sdk.metrics.export import (
        AggregationTemporality,
        Gauge,
        Histogram,
        HistogramDataPoint,
        Metric,
        MetricsData,
        NumberDataPoint,
        ResourceMetrics,
        ScopeMetrics,
        Sum,
    )
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.util.instrumentation import InstrumentationScope

    cumulative = AggregationTemporality.CUMULATIVE
    metrics = []
    for family in families:
        unit = unit_of(family.name)
        if family.type == "counter":
            points = [NumberDataPoint(dict(s.labels), start_ns, now_ns, s.value)
                      for s in family.samples if s.name == family.name + "_total"]
            data: Any = Sum(points, cumulative, is_monotonic=True)
        elif family.type == "histogram":
            data = Histogram(_histogram_points(family, start_ns, now_ns, HistogramDataPoint),
                             cumulative)
        else:
            points = [NumberDataPoint(dict(s.labels), start_ns, now_ns, s.value)
                      for s in family.samples
                      if s.name == family.name or family.type in ("gauge", "unknown")]
            data = Gauge(points)
        metrics.append(Metric(family.name, family.documentation, unit, data))
    resource = Resource.create({"service.name": "kwatt-exporter",
                                "service.version": __version__, "host.name": node})
    scope = InstrumentationScope("kwatt", __version__)
    return MetricsData([ResourceMetrics(resource, [ScopeMetrics(scope, metrics, "")], "")])


def _histogram_points(family: Family, start_ns: int, now_ns: int,
                      point: Callable[..., Any]) -> list[Any]:
    series: dict[tuple[tuple[str, str], ...], dict[str, Any]] = {}
    for sample in family.samples:
        labels = {k: v for k, v in sample.labels.items() if k != "le"}
        entry = series.setdefault(tuple(sorted(labels.items())),
                                  {"labels": labels, "buckets": [], "count": 0, "sum": 0.0})
        if sample.name.endswith("_bucket"):
            entry["buckets"].append((float(sample.labels["le"]), int(sample.value)))
        elif sample.name.endswith("_count"):
            entry["count"] = int(sample.value)
        elif sample.name.endswith("_sum"):
            entry["sum"] = sample.value
    out = []
    for entry in series.values():
        buckets = sorted(entry["buckets"])
        bounds = [le for le, _ in buckets if le != float("inf")]
        counts, previous = [], 0
        for _, cumulative in buckets:  # Prometheus buckets are cumulative; OTLP's are not
            counts.append(cumulative - previous)
            previous = cumulative
        out.append(point(entry["labels"], start_ns, now_ns, entry["count"], entry["sum"],
                         counts, bounds, float("nan"), float("nan")))
    return out


class OtlpPusher:
    """Pushes the collected families every ``interval`` seconds on its own thread."""

    def __init__(self, collect: Callable[[], Iterable[Family]], endpoint: str, node: str,
                 interval: float, timeout: float = 10.0,
                 clock_ns: Callable[[], int] = time.time_ns) -> None:
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
        except ImportError as exc:
            raise OtlpUnavailable(
                "--otlp.endpoint: the OpenTelemetry packages are not installed "
                f"(pip install 'kwatt[otlp]'): {exc}") from None
        self._exporter = OTLPMetricExporter(endpoint=endpoint, timeout=timeout)
        self._collect = collect
        self._node = node
        self._interval = interval
        self._timeout = timeout
        self._clock_ns = clock_ns
        self._start_ns = clock_ns()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kwatt-otlp", daemon=True)
        self._faults = RateLimitedLog(log)
        self.pushes = 0
        self.failures = 0

    def push_once(self) -> bool:
        from opentelemetry.sdk.metrics.export import MetricExportResult

        data = metrics_data(self._collect(), self._node, self._start_ns, self._clock_ns())
        result = self._exporter.export(data, timeout_millis=self._timeout * 1000)
        if result is MetricExportResult.SUCCESS:
            self.pushes += 1
            self._faults.forget("push")
            return True
        self.failures += 1
        self._faults.log(logging.WARNING, "push", "OTLP push failed; retrying next interval",
                         failures=self.failures)
        return False

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.push_once()
            except Exception:  # a bug in one push must not end the thread
                self.failures += 1
                log.exception("OTLP push failed")

    def start(self) -> None:
        log.info("pushing metrics over OTLP", extra={"interval_seconds": self._interval})
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(1.0)
        self._exporter.shutdown(timeout_millis=1000)
