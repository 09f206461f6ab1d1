"""Embodied carbon per node type: embodied.by_node_labels matched against this node's
labels, read with one GET of the node through a real HTTP fake API server; the first
matching entry wins, embodied.kg_co2e is the fallback, and a node that cannot be read (403)
falls back too, counted once."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from fake_kube_api import FakeKubeApi, write_kubeconfig
from kwatt.config import load_config
from kwatt.exporter import Exporter
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from simnode import SimulatedNode

SECONDS_PER_YEAR = 365.25 * 86400

RULES = """\
embodied:
  kg_co2e: 1500
  lifetime_years: 4
  by_node_labels:
    - match: {node.kubernetes.io/instance-type: p5.48xlarge}
      kg_co2e: 12000
      lifetime_years: 5
    - match: {node.kubernetes.io/instance-type: p5.48xlarge, kwatt.example/rack: r1}
      kg_co2e: 99999
    - match: {kwatt.example/pool: cpu, topology.kubernetes.io/region: eu-west-1}
      kg_co2e: 2000
"""


def _node_object(labels: dict[str, str]) -> dict[str, Any]:
    return {"kind": "Node", "apiVersion": "v1",
            "metadata": {"name": "node-a", "labels": labels}}


def _exporter(tmp_path: Path, url: str, yaml_text: str) -> Exporter:
    node = SimulatedNode(tmp_path / "node", vcpus=2)
    node.add_rapl_zone("0", "package-0")
    cfg = tmp_path / "kwatt.yaml"
    cfg.write_text(yaml_text)
    return Exporter(load_config(
        ["--config", str(cfg), "--kubernetes", "on", "--node-name", "node-a",
         "--kubeconfig", str(write_kubeconfig(tmp_path / "kubeconfig", url)), "--gpu", "off",
         "--path.sysfs", str(node.sysfs), "--path.procfs", str(node.procfs)], env={}))


def _samples(exporter: Exporter, name: str) -> list[tuple[dict[str, str], float]]:
    text = generate_latest(exporter.registry).decode()
    return [(s.labels, s.value) for f in text_string_to_metric_families(text)
            for s in f.samples if s.name == name]


def _embodied(api: FakeKubeApi, tmp_path: Path, yaml_text: str = RULES
              ) -> tuple[list[tuple[dict[str, str], float]], Exporter, int]:
    with api.serve() as url:
        exporter = _exporter(tmp_path, url, yaml_text)
        try:
            exporter.sampler.sample()
            values = _samples(exporter, "kwatt_embodied_grams_per_second")
        finally:
            exporter.stop_watch()
        gets = len([r for r in api.requests if r.path == "/api/v1/nodes/node-a"])
    return values, exporter, gets


@pytest.mark.parametrize(("labels", "kg", "years"), [
    # the first entry wins, though the second matches too
    ({"node.kubernetes.io/instance-type": "p5.48xlarge", "kwatt.example/rack": "r1"},
     12000, 5),
    # every label of an entry must match; lifetime_years defaults to embodied.lifetime_years
    ({"kwatt.example/pool": "cpu", "topology.kubernetes.io/region": "eu-west-1"}, 2000, 4),
    # half a match is no match: the fallback embodied.kg_co2e
    ({"kwatt.example/pool": "cpu", "topology.kubernetes.io/region": "us-east-1"}, 1500, 4),
    ({}, 1500, 4),
])
def test_node_type_picks_embodied_carbon(tmp_path: Path, labels: dict[str, str],
                                         kg: float, years: float) -> None:
    api = FakeKubeApi()
    api.nodes["node-a"] = _node_object(labels)
    values, _, gets = _embodied(api, tmp_path)
    assert values == [({"node": "node-a"},
                       pytest.approx(kg * 1000 / (years * SECONDS_PER_YEAR), rel=1e-12))]
    assert gets == 1


def test_without_a_fallback_an_unmatched_node_has_no_embodied_metric(tmp_path: Path) -> None:
    api = FakeKubeApi()
    api.nodes["node-a"] = _node_object({"node.kubernetes.io/instance-type": "m5.large"})
    values, _, _ = _embodied(api, tmp_path, "embodied:\n  by_node_labels:\n"
                             "    - match: {node.kubernetes.io/instance-type: p5.48xlarge}\n"
                             "      kg_co2e: 12000\n")
    assert values == []


def test_one_get_serves_instance_type_and_embodied(tmp_path: Path) -> None:
    api = FakeKubeApi()
    api.nodes["node-a"] = _node_object({"node.kubernetes.io/instance-type": "p5.48xlarge"})
    values, exporter, gets = _embodied(api, tmp_path, RULES + "kubernetes:\n  read_node: true\n")
    assert exporter.coefficients.instance_type == "p5.48xlarge"
    assert values[0][1] == pytest.approx(12000e3 / (5 * SECONDS_PER_YEAR))
    assert gets == 1


def test_forbidden_node_falls_back_counted_and_logged_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    api = FakeKubeApi()
    api.nodes["node-a"] = _node_object({"node.kubernetes.io/instance-type": "p5.48xlarge"})
    api.forbid_nodes = True
    with caplog.at_level(logging.WARNING, logger="kwatt"):
        with api.serve() as url:
            exporter = _exporter(tmp_path, url, RULES)
            try:
                for _ in range(3):
                    exporter.sampler.sample()
                values = _samples(exporter, "kwatt_embodied_grams_per_second")
                errors = _samples(exporter, "kwatt_source_errors_total")
            finally:
                exporter.stop_watch()
    assert values == [({"node": "node-a"},
                       pytest.approx(1500e3 / (4 * SECONDS_PER_YEAR), rel=1e-12))]
    assert ({"node": "node-a", "source": "kubernetes", "reason": "permission"}, 1.0) in errors
    warnings = [r for r in caplog.records if "this node's labels" in r.getMessage()]
    assert len(warnings) == 1


@pytest.mark.parametrize(("entries", "key"), [
    ("    - match: {a: b}\n      kg_co2e: -1\n", "embodied.by_node_labels[0].kg_co2e"),
    ("    - match: {a: b}\n", "embodied.by_node_labels[0].kg_co2e"),
    ("    - match: {}\n      kg_co2e: 1\n", "embodied.by_node_labels[0].match"),
    ("    - match: {a: b}\n      kg_co2e: 1\n    - match: {a: c}\n      kg_co2e: 1\n"
     "      lifetime_years: 0\n", "embodied.by_node_labels[1].lifetime_years"),
    ("    - match: {a: b}\n      kg: 1\n", "embodied.by_node_labels[0]"),
    ("    - node.kubernetes.io/instance-type: p5\n", "embodied.by_node_labels[0]"),
])
def test_bad_node_type_entry_is_one_line_naming_the_key(tmp_path: Path, entries: str,
                                                        key: str) -> None:
    config = tmp_path / "kwatt.yaml"
    config.write_text("embodied:\n  by_node_labels:\n" + entries)
    result = subprocess.run([sys.executable, "-m", "kwatt", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], result.stderr


def test_zone_label_comes_from_the_same_read(tmp_path: Path) -> None:
    """The carbon source's zone label is taken from the labels read at start: one GET of
    the node for the instance type, the node type and the zone."""
    api = FakeKubeApi()
    api.nodes["node-a"] = _node_object({"node.kubernetes.io/instance-type": "p5.48xlarge",
                                        "topology.kubernetes.io/region": "eu-west-1"})
    signal = tmp_path / "intensity.yaml"
    signal.write_text("value: 321\n")
    extra = (f"carbon:\n  source: file\n  file: {signal}\n"
             "  zone_node_label: topology.kubernetes.io/region\n"
             "kubernetes:\n  read_node: true\n")
    with api.serve() as url:
        exporter = _exporter(tmp_path, url, RULES + extra)
        try:
            exporter.signal_stages[0].poller.poll_once()
            exporter.sampler.sample()
            intensity = _samples(exporter, "kwatt_carbon_intensity_grams_per_kwh")
            embodied = _samples(exporter, "kwatt_embodied_grams_per_second")
        finally:
            exporter.stop_watch()
        gets = len([r for r in api.requests if r.path == "/api/v1/nodes/node-a"])
    assert [(labels["zone"], value) for labels, value in intensity] == [("eu-west-1", 321.0)]
    assert embodied[0][1] == pytest.approx(12000e3 / (5 * SECONDS_PER_YEAR))
    assert exporter.coefficients.instance_type == "p5.48xlarge"
    assert gets == 1
