"""Done-when of issue 9, through the real CLI: a simulated node with an ACPI power meter
and no configuration shows cpu, dram and other adding up to the meter."""

from __future__ import annotations

from pathlib import Path

from exporter_process import ExporterProcess
from hwmon_sim import install_hwmon
from simnode import SimulatedNode, container_id, pod_uid


def _series(text: str, name: str) -> dict[str, float]:
    """{'component/source' or 'source/sensor': value} for one family."""
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            labels = dict(part.split("=", 1) for part in
                          line[len(name) + 1:line.index("}")].split(","))
            key = "/".join(v.strip('"') for k, v in sorted(labels.items()) if k != "node")
            out[key] = float(line.rsplit(" ", 1)[1])
    return out


def test_acpi_power_meter_without_configuration_adds_up_to_the_meter(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    node.add_rapl_zone("0:1", "dram")
    install_hwmon(node, "acpi-power-meter")  # 400 W
    ctr = node.add_container(node.add_pod(pod_uid("a")), container_id("a"))
    exporter = ExporterProcess(node, interval="500ms")
    try:
        count = exporter.wait_for_cycle()
        for _ in range(4):
            node.add_cpu(ctr.path, 0.5)
            node.add_node_cpu(idle_seconds=1.5)
            node.add_energy("0", 20.0)
            node.add_energy("0:1", 4.0)
            count = exporter.wait_for_cycle(after=count)
        text = exporter.metrics()
    finally:
        log = exporter.stop()
    assert "Traceback" not in log, log
    power = _series(text, "kwatt_node_power_watts")
    assert set(power) == {"cpu/rapl", "dram/rapl", "other/hwmon"}, power
    assert abs(sum(power.values()) - 400.0) < 1e-6, power
    assert power["other/hwmon"] > 300.0
    assert _series(text, "kwatt_platform_energy_joules_total")["power_meter/hwmon1/hwmon"] > 0
    assert _series(text, "kwatt_source_up")["hwmon"] == 1.0
    containers = _series(text, "kwatt_container_energy_joules_total")
    assert any(key.startswith("other/") and value > 0 for key, value in containers.items()), \
        containers


def test_grace_hopper_without_rapl_measures_cpu_and_other_from_hwmon(tmp_path: Path) -> None:
    """A GH200 socket, no powercap: cpu = Grace Power Socket 0 (150 W, source hwmon),
    other = Module Power Socket 0 (900 W) minus cpu = 750 W; nothing is estimated."""
    node = SimulatedNode(tmp_path / "node")
    install_hwmon(node, "grace-hopper")
    ctr = node.add_container(node.add_pod(pod_uid("a")), container_id("a"))
    exporter = ExporterProcess(node, interval="500ms")
    try:
        count = exporter.wait_for_cycle()
        for _ in range(3):
            node.add_cpu(ctr.path, 0.5)
            node.add_node_cpu(idle_seconds=1.5)
            count = exporter.wait_for_cycle(after=count)
        text = exporter.metrics()
    finally:
        log = exporter.stop()
    assert "Traceback" not in log, log
    assert "CPU energy from hwmon" in log
    power = _series(text, "kwatt_node_power_watts")
    assert set(power) == {"cpu/hwmon", "other/hwmon"}, power
    # The sensor's energy over its own readings, divided by the cycle's interval: they
    # differ by the microseconds to milliseconds between the reads, hence 1 %.
    assert abs(power["cpu/hwmon"] - 150.0) < 1.5
    assert abs(power["cpu/hwmon"] + power["other/hwmon"] - 900.0) < 1e-6, power
    assert "model" not in _series(text, "kwatt_source_up")
