"""/metrics rendered once per published cycle: same bytes as prometheus_client, gzip,
OpenMetrics negotiation, and one render however many scrapers ask."""

from __future__ import annotations

import gzip
import subprocess
import urllib.request
from collections.abc import Iterable
from pathlib import Path

import pytest
from conftest import require_tool
from kwatt.config import load_config
from kwatt.exporter import Exporter
from kwatt.exposition import ExpositionRenderer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.openmetrics.exposition import generate_latest as om_latest
from prometheus_client.openmetrics.parser import text_string_to_metric_families as om_parse
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from simnode import SimulatedNode, container_id, pod_uid

OM_ACCEPT = "application/openmetrics-text; version=1.0.0; charset=utf-8,text/plain;q=0.5"


class Families(Collector):
    def __init__(self) -> None:
        self.odd = ['plain', 'quote"d', "back\\slash", "new\nline", "bad\ufffdbyte", ""]
        self.rounds = 0

    def collect(self) -> Iterable[Metric]:
        counter = CounterMetricFamily("x_energy_joules_total", 'help with \\ and "q"\nline',
                                      labels=("node", "pod", "z_last", "a_first"))
        for i, value in enumerate(self.odd):
            counter.add_metric(("n", value, str(i), "a"), 1e-7 * i + self.rounds)
        counter.add_metric(("n", "big", "x", "a"), 123456789012.5)
        counter.add_metric(("n", "inf", "x", "a"), float("inf"))
        yield counter
        gauge = GaugeMetricFamily("x_power_watts", "no labels")
        gauge.add_metric((), 42.0)
        yield gauge
        created = CounterMetricFamily("x_created_total", "with _created", labels=("a",))
        created.add_metric(("b",), 1.0, created=1700000000.0)
        yield created
        hist = HistogramMetricFamily("x_duration_seconds", "histogram", labels=("node",))
        hist.add_metric(("n",), [("0.005", 1.0), ("0.1", 3.0), ("+Inf", 4.0)], 0.2)
        yield hist
        info = InfoMetricFamily("x_build", "info", labels=("node",))
        info.add_metric(("n",), {"version": "1"})
        yield info
        stamped = GaugeMetricFamily("x_stamped", "timestamped", labels=("a",))
        stamped.add_metric(("b",), 1.0, timestamp=1700000000.5)
        yield stamped


@pytest.mark.parametrize("openmetrics", [False, True])
def test_renderer_writes_what_prometheus_client_writes(openmetrics: bool) -> None:
    families = Families()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(families)
    renderer = ExpositionRenderer()
    for _ in range(3):  # cached prefixes give the same bytes as fresh ones
        families.rounds += 1
        want = om_latest(registry)[:-len(b"# EOF\n")] if openmetrics \
            else generate_latest(registry)
        got = renderer.render(families.collect(), openmetrics)
        assert got == want
    families.odd = ["other"]  # series that went away are not rendered from the cache
    want = om_latest(registry)[:-len(b"# EOF\n")] if openmetrics else generate_latest(registry)
    assert renderer.render(families.collect(), openmetrics) == want


@pytest.fixture
def exporter(tmp_path: Path) -> Iterable[tuple[Exporter, SimulatedNode, int]]:
    node = SimulatedNode(tmp_path / "node")
    node.add_intel_server_zones(sockets=1)
    pod = node.add_pod(pod_uid("p"), "burstable")
    paths = [node.add_container(pod, container_id(f"c{i}")).path for i in range(3)]
    node.add_unit("/system.slice/sshd.service")
    config = load_config(["--path.sysfs", str(node.sysfs), "--path.procfs", str(node.procfs),
                          "--kubernetes", "off", "--gpu", "off", "--node-name", "t",
                          "--web.listen-address", "127.0.0.1:0"], env={})
    exp = Exporter(config)
    for path in paths:
        node.add_cpu(path, 0.5)
    node.add_node_cpu(busy_seconds=2, idle_seconds=2)
    exp.sampler.sample()
    node.add_energy("0", 50.0)
    for path in paths:
        node.add_cpu(path, 0.5)
    node.add_node_cpu(busy_seconds=2, idle_seconds=2)
    exp.sampler.sample()
    server = exp.serve()
    try:
        yield exp, node, server.server_address[1]
    finally:
        exp.stop()


def _get(port: int, headers: dict[str, str]) -> tuple[dict[str, str], bytes]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=10) as response:
        return dict(response.headers.items()), response.read()


def _kwatt(text: str, parse: object = text_string_to_metric_families) -> set[tuple[object, ...]]:
    return {(s.name, tuple(sorted(s.labels.items())), s.value)
            for family in parse(text)  # type: ignore[operator]
            if family.name.startswith("kwatt_") for s in family.samples}


def test_a_cycle_is_rendered_once_for_every_scrape_and_format(
        exporter: tuple[Exporter, SimulatedNode, int]) -> None:
    exp, node, port = exporter
    collector = exp._kwatt_collector.inner
    _, plain = _get(port, {})
    for _ in range(3):
        _, again = _get(port, {})
        assert _kwatt(again.decode()) == _kwatt(plain.decode())
    headers, zipped = _get(port, {"Accept-Encoding": "gzip"})
    assert headers["Content-Encoding"] == "gzip"
    assert _kwatt(gzip.decompress(zipped).decode()) == _kwatt(plain.decode())
    assert collector.renders == 1  # type: ignore[attr-defined]
    # The live part is rendered per scrape: the process families are there.
    assert b"process_cpu_seconds_total" in plain and b"kwatt_http_" in plain
    node.add_energy("0", 10.0)
    node.add_node_cpu(busy_seconds=1, idle_seconds=1)
    exp.sampler.sample()
    _, newer = _get(port, {})
    assert collector.renders == 2  # type: ignore[attr-defined]
    assert _kwatt(newer.decode()) != _kwatt(plain.decode())


def test_openmetrics_negotiation_and_validity(
        exporter: tuple[Exporter, SimulatedNode, int]) -> None:
    _, _, port = exporter
    headers, body = _get(port, {"Accept": OM_ACCEPT})
    assert headers["Content-Type"].startswith("application/openmetrics-text; version=1.0.0")
    text = body.decode()
    assert text.endswith("# EOF\n") and text.count("# EOF") == 1
    families = {f.name for f in om_parse(text)}
    assert {"kwatt_node_energy_joules", "kwatt_container_energy_joules",
            "process_cpu_seconds"} <= families
    headers, zipped = _get(port, {"Accept": OM_ACCEPT, "Accept-Encoding": "gzip"})
    assert gzip.decompress(zipped).decode().endswith("# EOF\n")
    headers, plain = _get(port, {"Accept": "text/plain;version=0.0.4"})
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert _kwatt(plain.decode()) == _kwatt(text, om_parse)
    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=plain, capture_output=True,
                           timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr


def test_every_registered_collector_is_served(
        exporter: tuple[Exporter, SimulatedNode, int]) -> None:
    """A collector registered besides the cycle's (another helper's, say) is on /metrics."""
    exp, _, port = exporter

    class Extra(Collector):
        def collect(self) -> Iterable[Metric]:
            family = GaugeMetricFamily("kwatt_extra_thing", "a later family", labels=("node",))
            family.add_metric(("t",), 7.0)
            yield family

    exp.registry.register(Extra())
    for headers in ({}, {"Accept": OM_ACCEPT}, {"Accept-Encoding": "gzip"}):
        got, body = _get(port, headers)
        text = gzip.decompress(body) if got.get("Content-Encoding") == "gzip" else body
        assert text.count(b'kwatt_extra_thing{node="t"} 7.0') == 1
        assert text.count(b"# HELP kwatt_node_energy_joules") == 1
