"""OTLP export against a local OTLP/HTTP receiver that decodes the protobuf payloads."""

from __future__ import annotations

import os
import queue
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from conftest import FakeClock, node_config
from exporter_process import ExporterProcess
from kwatt.exporter import Exporter
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from simnode import SimulatedNode, container_id, pod_uid


class Receiver:
    """An OTLP/HTTP metrics endpoint on loopback; every request body is decoded."""

    def __init__(self) -> None:
        self.requests: queue.Queue[ExportMetricsServiceRequest] = queue.Queue()
        self.content_types: list[str] = []
        received = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.content_types.append(self.headers["Content-Type"])
                request = ExportMetricsServiceRequest()
                request.ParseFromString(body)
                received.requests.put(request)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1/metrics"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


def _points(request: ExportMetricsServiceRequest) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for resource in request.resource_metrics:
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                out[metric.name] = metric
    return out


def _attrs(point: Any) -> dict[str, str]:
    return {a.key: a.value.string_value for a in point.attributes}


def _busy_node(node: SimulatedNode) -> None:
    node.add_rapl_zone("0", "package-0")
    node.add_rapl_zone("0:1", "dram")
    pod = node.add_pod(pod_uid("a"), "burstable", "containerd")
    web = node.add_container(pod, container_id("web"))
    node.add_cpu(web.path, 6)
    node.add_node_cpu(busy_seconds=2, idle_seconds=12)
    node.add_energy("0", 150.0)
    node.add_energy("0:1", 30.0)


def test_pushed_values_equal_the_exposition(sim: Any, clock: FakeClock,
                                            receiver: Receiver) -> None:
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    node.add_rapl_zone("0:1", "dram")
    config = node_config(node, "--otlp.endpoint", receiver.url)
    exporter = Exporter(config, clock=clock)
    exporter.sampler.sample()
    _busy_node(node)
    clock.advance(10)
    exporter.sampler.sample()
    exporter.start_otlp()
    assert exporter.otlp is not None
    try:
        assert exporter.otlp.push_once()
        request = receiver.requests.get(timeout=10)
    finally:
        exporter.stop()
    assert receiver.content_types[0] == "application/x-protobuf"
    points = _points(request)
    resource = {a.key: a.value.string_value
                for a in request.resource_metrics[0].resource.attributes}
    assert resource["service.name"] == "kwatt-exporter"
    assert resource["host.name"] == "sim"

    scraped = {f.name: f for f in text_string_to_metric_families(
        generate_latest(exporter.registry).decode())}
    energy = points["kwatt_node_energy_joules"]
    assert energy.unit == "J"
    assert energy.sum.is_monotonic
    pushed = {(p.attributes and _attrs(p)["component"]): p.as_double
              for p in energy.sum.data_points}
    exposed = {s.labels["component"]: s.value
               for s in scraped["kwatt_node_energy_joules"].samples
               if s.name.endswith("_total")}
    assert pushed == exposed == {"cpu": 150.0, "dram": 30.0}
    power = points["kwatt_node_power_watts"]
    assert power.unit == "W"
    assert {_attrs(p)["component"]: p.as_double for p in power.gauge.data_points} == \
        {"cpu": 15.0, "dram": 3.0}
    duration = points["kwatt_sample_duration_seconds"].histogram.data_points[0]
    assert duration.count == 2
    assert sum(duration.bucket_counts) == 2
    assert len(duration.bucket_counts) == len(duration.explicit_bounds) + 1


def test_cli_pushes_on_its_interval(tmp_path: Path, receiver: Receiver) -> None:
    node = SimulatedNode(tmp_path / "node")
    _busy_node(node)
    exporter = ExporterProcess(node, "--otlp.endpoint", receiver.url,
                               "--otlp.interval", "1s")
    try:
        first = receiver.requests.get(timeout=30)
        second = receiver.requests.get(timeout=30)
    finally:
        log = exporter.stop()
    assert "kwatt_node_energy_joules" in _points(first)
    assert "kwatt_build_info" in _points(second)
    assert "pushing metrics over OTLP" in log


def test_missing_optional_packages_is_one_line_and_exit_2(tmp_path: Path) -> None:
    # A stand-in package that fails to import, first on the path: what a plain
    # `pip install kwatt` (without [otlp]) looks like to the exporter.
    shadow = tmp_path / "shadow" / "opentelemetry"
    shadow.mkdir(parents=True)
    (shadow / "__init__.py").write_text("raise ImportError('No module named opentelemetry')\n")
    node = SimulatedNode(tmp_path / "node")
    result = subprocess.run(
        [sys.executable, "-m", "kwatt", "--path.sysfs", str(node.sysfs),
         "--path.procfs", str(node.procfs), "--kubernetes", "off", "--gpu", "off",
         "--web.listen-address", "127.0.0.1:0", "--otlp.endpoint", "http://127.0.0.1:9/x"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHONPATH": str(shadow.parent)})
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.startswith("kwatt-exporter:")]
    assert errors == [errors[0]] and "pip install 'kwatt[otlp]'" in errors[0]


def test_endpoint_must_be_an_http_url() -> None:
    result = subprocess.run([sys.executable, "-m", "kwatt", "--otlp.endpoint", "collector:4318"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.strip() == ("kwatt-exporter: --otlp.endpoint: 'collector:4318' is "
                                     "not an http:// or https:// URL")
