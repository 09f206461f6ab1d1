"""Platform meter faults through the real CLI: an unreadable, vanished, implausible or
lagging hwmon meter is logged and counted; the exporter keeps serving, `other` never goes
backwards nor books what the meter did not measure, and a meter that comes back is used
again. A configured sensor that is missing stops the start with one line and exit 2."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from exporter_process import ExporterProcess
from hwmon_sim import install_hwmon, set_hwmon
from simnode import SimulatedNode, container_id, pod_uid

METER = "hwmon1/device/power1_average"


def _value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line
                                               for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def _other(text: str) -> float:
    return _value(text, "kwatt_node_energy_joules_total", component="other") or 0.0


def _errors(text: str, reason: str) -> float:
    return _value(text, "kwatt_source_errors_total", source="hwmon", reason=reason) or 0.0


def test_meter_faults_are_counted_and_recovered(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    install_hwmon(node, "acpi-power-meter")
    ctr = node.add_container(node.add_pod(pod_uid("a")), container_id("a"))
    meter = node.sysfs / "class" / "hwmon" / METER
    exporter = ExporterProcess(node, interval="200ms")
    try:
        count = exporter.wait_for_cycle()
        count = exporter.wait_for_cycle(after=count)

        def cycles(n: int) -> str:
            nonlocal count
            for _ in range(n):
                node.add_cpu(ctr.path, 0.1)
                node.add_node_cpu(idle_seconds=0.7)
                node.add_energy("0", 10.0)
                count = exporter.wait_for_cycle(after=count)
            return exporter.metrics()

        text = cycles(2)
        before = _other(text)
        assert before > 0

        meter.write_text("garbage\n")
        text = cycles(2)
        assert _errors(text, "parse") >= 1
        assert _value(text, "kwatt_source_up", source="hwmon") == 0.0
        assert _other(text) >= before

        meter.unlink()
        text = cycles(2)
        assert _errors(text, "absent") >= 1

        set_hwmon(node, METER, 10**18)  # 1e12 W: above the platform ceiling
        text = cycles(2)
        assert _errors(text, "implausible") >= 1
        stalled = _other(text)

        set_hwmon(node, METER, 0)  # a meter that lags behind RAPL: 0 W read, RAPL 50 W
        text = cycles(3)
        assert _errors(text, "negative_remainder") >= 1
        assert _other(text) >= stalled

        set_hwmon(node, METER, 400_000_000)
        text = cycles(3)
        assert _value(text, "kwatt_source_up", source="hwmon") == 1.0
        assert _other(text) > stalled
        status, _ = exporter.get("/healthz")
        assert status == 200
    finally:
        log = exporter.stop()
    assert "Traceback" not in log, log


def test_configured_sensor_missing_is_one_line_and_exit_2(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node")
    install_hwmon(node, "acpi-power-meter")
    config = tmp_path / "kwatt.yaml"
    config.write_text("platform:\n  hwmon:\n    sensors: [psu_meter/energy1]\n")
    result = subprocess.run(
        [sys.executable, "-m", "kwatt", "--config", str(config), "--path.sysfs",
         str(node.sysfs), "--path.procfs", str(node.procfs), "--kubernetes", "off",
         "--gpu", "off", "--node-name", "fault", "--web.listen-address", "127.0.0.1:0"],
        capture_output=True, text=True, timeout=30, env=dict(os.environ))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert "platform.hwmon.sensors" in lines[0] and "psu_meter/energy1" in lines[0]
