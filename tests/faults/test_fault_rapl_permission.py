"""RAPL that is unreadable by design (non-root mode) is not an outage; RAPL that stops
being readable is. The real CLI, on a fixture tree whose energy_uj files the exporter gets
EACCES for from the kernel."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from exporter_process import ExporterProcess
from simnode import SimulatedNode, container_id, pod_uid

UNMAPPED_UID = 54321


def _user_namespace_wrapper() -> list[str]:
    """Run as root in a user namespace that maps only root: the kernel then denies root
    files owned by any other user (CAP_DAC_OVERRIDE does not reach unmapped owners), so
    chmod 000 gives a real EACCES. As a non-root runner chmod 000 alone does."""
    if os.geteuid() != 0:
        return []
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.fail("unshare (util-linux) is needed to test EACCES as root")
    return [unshare, "--user", "--map-root-user"]


def _deny(path: Path) -> None:
    os.chmod(path, 0o000)
    if os.geteuid() == 0:
        os.chown(path, UNMAPPED_UID, UNMAPPED_UID)


def _node(tmp_path: Path) -> tuple[SimulatedNode, str]:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    node.add_rapl_zone("1", "package-1")
    pod = node.add_pod(pod_uid("a"))
    return node, node.add_container(pod, container_id("a")).path


def _value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(name + "{"):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _zone_files(node: SimulatedNode) -> list[Path]:
    return [node.sysfs / "class" / "powercap" / f"intel-rapl:{i}" / "energy_uj"
            for i in ("0", "1")]


def test_rapl_unreadable_at_startup_is_not_a_source_down(tmp_path: Path) -> None:
    node, path = _node(tmp_path)
    for energy in _zone_files(node):
        _deny(energy)
    exporter = ExporterProcess(node, wrapper=_user_namespace_wrapper(), interval="0.2s")
    try:
        count = exporter.wait_for_cycle()
        for _ in range(3):
            node.add_cpu(path, 0.1)
            node.add_node_cpu(idle_seconds=0.5)
            count = exporter.wait_for_cycle(count)
        text = exporter.metrics()
    finally:
        log = exporter.stop()
    # Estimated, as the README's non-root mode promises ...
    assert _value(text, "kwatt_node_energy_joules_total", component="cpu",
                  source="estimated") is not None
    assert _value(text, "kwatt_source_up", source="model") == 1.0
    # ... without an endless outage: no rapl source_up series, no error counted each cycle.
    assert _value(text, "kwatt_source_up", source="rapl") is None
    assert _value(text, "kwatt_source_errors_total", source="rapl", reason="permission") is None
    said = [ln for ln in log.splitlines() if "RAPL" in ln and "permission" in ln]
    assert len(said) == 1, log


def test_rapl_that_stops_being_readable_is_still_down(tmp_path: Path) -> None:
    node, path = _node(tmp_path)
    exporter = ExporterProcess(node, wrapper=_user_namespace_wrapper(), interval="0.2s")
    try:
        count = exporter.wait_for_cycle()
        for energy in _zone_files(node):
            _deny(energy)
        for _ in range(3):
            node.add_cpu(path, 0.1)
            count = exporter.wait_for_cycle(count)
        text = exporter.metrics()
    finally:
        exporter.stop()
    assert _value(text, "kwatt_source_up", source="rapl") == 0.0
    errors = _value(text, "kwatt_source_errors_total", source="rapl", reason="permission")
    assert errors is not None and errors >= 2

