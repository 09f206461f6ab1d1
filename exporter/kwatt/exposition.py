"""Fast rendering of metric families to the Prometheus text and OpenMetrics formats.

prometheus_client's encoders sort, escape and format every label of every sample on every
scrape; with ~1,000 series that is most of a scrape's CPU. Here each series' text up to its
value (``name{label="value",...} ``) is built once, when the series first appears, and
reused until the series goes away. The output is byte for byte what prometheus_client's
``generate_latest`` writes (tests/test_exposition.py checks it), so families are still plain
``prometheus_client`` Metric objects: a new family is one more ``yield`` in a collector.

OpenMetrics output here stops before ``# EOF``: the caller appends the process families,
which end the exposition.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import generate_latest as text_generate_latest
from prometheus_client.core import Metric
from prometheus_client.openmetrics.exposition import generate_latest as om_generate_latest
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

_TEXT_TYPES = {"counter": "counter", "gauge": "gauge", "histogram": "histogram",
               "summary": "summary", "unknown": "untyped"}
# Samples that the text format moves into a separate gauge family: left to the library.
_OM_ONLY_SUFFIXES = ("_created", "_gsum", "_gcount")
_OM_EOF = b"# EOF\n"
# Untyped in prometheus_client; typed here once.
_go_float: Callable[[float], str] = floatToGoString
_om_latest: Callable[[Collector], bytes] = om_generate_latest


def _escape_label_value(value: str) -> str:
    return value.replace("\\", r"\\").replace("\n", r"\n").replace('"', r"\"")


class _One(Collector):
    def __init__(self, metric: Metric) -> None:
        self._metric = metric

    def collect(self) -> Iterable[Metric]:
        return [self._metric]


class ExpositionRenderer:
    """Renders families, keeping each series' prefix while the series exists.

    Not thread-safe: one renderer per caller, or a lock around it (CycleCollector).
    """

    def __init__(self) -> None:
        self._prefixes: dict[tuple[str, ...], str] = {}
        self._headers: dict[tuple[str, str, str, str, bool], str] = {}

    def render(self, metrics: Iterable[Metric], openmetrics: bool) -> bytes:
        prefixes = self._prefixes
        out: list[str] = []
        rendered = 0
        for metric in metrics:
            if metric.type not in _TEXT_TYPES:
                out.append(self._library(metric, openmetrics))
                continue
            lines = [self._header(metric, openmetrics)]
            add = lines.append
            for name, labels, value, timestamp, exemplar, native in metric.samples:
                if timestamp is not None or exemplar is not None or native is not None or (
                        not openmetrics and name[len(metric.name):] in _OM_ONLY_SUFFIXES):
                    lines = [self._library(metric, openmetrics)]
                    break
                # A family's label names are fixed, so its name and values identify a series.
                key = (name, *labels.values())
                prefix = prefixes.get(key)
                if prefix is None:
                    prefix = prefixes[key] = self._prefix(name, labels)
                value = float(value)
                add(prefix + (repr(value) if -1e6 < value < 1e6 else _go_float(value)) + "\n")
            rendered += len(lines)
            out.extend(lines)
        if len(prefixes) > 2 * rendered + 1024:  # series went away: drop their prefixes
            prefixes.clear()
        return "".join(out).encode("utf-8")

    @staticmethod
    def _library(metric: Metric, openmetrics: bool) -> str:
        if openmetrics:
            body = _om_latest(_One(metric))
            return body[:-len(_OM_EOF)].decode("utf-8")
        return text_generate_latest(_One(metric)).decode("utf-8")

    def _header(self, metric: Metric, openmetrics: bool) -> str:
        key = (metric.name, metric.type, metric.documentation, metric.unit, openmetrics)
        header = self._headers.get(key)
        if header is None:
            if openmetrics:
                help_text = _escape_label_value(metric.documentation)
                header = (f"# HELP {metric.name} {help_text}\n"
                          f"# TYPE {metric.name} {metric.type}\n")
                if metric.unit:
                    header += f"# UNIT {metric.name} {metric.unit}\n"
            else:
                name = metric.name + "_total" if metric.type == "counter" else metric.name
                help_text = metric.documentation.replace("\\", r"\\").replace("\n", r"\n")
                header = (f"# HELP {name} {help_text}\n"
                          f"# TYPE {name} {_TEXT_TYPES[metric.type]}\n")
            if len(self._headers) > 4096:  # families come and go only with configuration
                self._headers.clear()
            self._headers[key] = header
        return header

    @staticmethod
    def _prefix(name: str, labels: dict[str, str]) -> str:
        if not labels:
            return name + " "
        inner = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in sorted(labels.items()))
        return f"{name}{{{inner}}} "
