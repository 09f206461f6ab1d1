"""Embodied carbon (SCI's M) from config: the real CLI exposes the node's amortised rate."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
from exporter_process import ExporterProcess
from simnode import SimulatedNode

SECONDS_PER_YEAR = 365.25 * 86400


def _node(tmp_path: Path) -> SimulatedNode:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    return node


def _gauge(text: str) -> dict[str, float]:
    return {m.group(1): float(m.group(2)) for m in re.finditer(
        r'^kwatt_embodied_grams_per_second\{node="([^"]*)"\} (\S+)$', text, re.M)}


def test_embodied_rate_is_kg_over_lifetime(tmp_path: Path) -> None:
    # An 8-GPU server: 3 000 kg CO2e over 5 years = 3e6 g / 157 788 000 s.
    config = tmp_path / "kwatt.yaml"
    config.write_text("embodied:\n  kg_co2e: 3000\n  lifetime_years: 5\n")
    exporter = ExporterProcess(_node(tmp_path), "--config", str(config))
    try:
        exporter.wait_for_cycle(after=0)
        assert _gauge(exporter.metrics()) == {
            "e2e": pytest.approx(3e6 / (5 * SECONDS_PER_YEAR), rel=1e-12)}
    finally:
        exporter.stop()


def test_without_embodied_config_the_metric_is_absent(tmp_path: Path) -> None:
    exporter = ExporterProcess(_node(tmp_path))
    try:
        exporter.wait_for_cycle(after=0)
        assert _gauge(exporter.metrics()) == {}
    finally:
        exporter.stop()


@pytest.mark.parametrize(("text", "key"), [
    ("embodied:\n  kg_co2e: 3000\n  lifetime_years: 0\n", "embodied.lifetime_years"),
    ("embodied:\n  kg_co2e: -1\n", "embodied.kg_co2e"),
    ("embodied:\n  kg_co2e: lots\n", "embodied.kg_co2e"),
])
def test_bad_embodied_config_is_one_line_naming_the_key(tmp_path: Path, text: str,
                                                        key: str) -> None:
    config = tmp_path / "kwatt.yaml"
    config.write_text(text)
    result = subprocess.run([sys.executable, "-m", "kwatt", "--config", str(config)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0], result.stderr
