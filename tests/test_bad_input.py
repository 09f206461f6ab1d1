"""Garbage in sysfs, cgroupfs and procfs: counted faults, honest numbers, a live process."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

from exporter_process import ExporterProcess
from simnode import SimulatedNode, container_id, pod_uid

_LINE = re.compile(r"^(kwatt_[a-z_]+_total)(\{.*\}) (\S+)$", re.M)


def counters(text: str) -> dict[str, float]:
    return {m.group(1) + m.group(2): float(m.group(3)) for m in _LINE.finditer(text)}


def value(text: str, name: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


def test_exporter_survives_garbage_and_recovers(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    node.add_rapl_zone("1", "package-1")
    pod = node.add_pod(pod_uid("p"))
    good = node.add_container(pod, container_id("good"))
    bad = node.add_container(pod, container_id("bad"))
    doomed = node.add_pod(pod_uid("doomed"))
    doomed_ctr = node.add_container(doomed, container_id("doomed"))
    exporter = ExporterProcess(node, interval="300ms")
    seen: list[dict[str, float]] = []
    try:
        count = exporter.wait_for_cycle(after=0)
        node.add_cpu(good.path, 1)
        node.add_cpu(doomed_ctr.path, 1)
        node.add_node_cpu(idle_seconds=2)
        node.add_energy("0", 10)
        node.add_energy("1", 10)
        count = exporter.wait_for_cycle(after=count)
        seen.append(counters(exporter.metrics()))

        node.set_zone_content("1", "garbage\n")
        (node.cgroup_root / bad.path.strip("/") / "cpu.stat").write_text("usage_usec many\n")
        (node.procfs / "stat").write_text("cpu  what is this\n")
        node.remove_pod(doomed)  # removed between cycles: normal churn, not a fault
        count = exporter.wait_for_cycle(after=count)
        count = exporter.wait_for_cycle(after=count)
        text = exporter.metrics()
        seen.append(counters(text))
        assert value(text, "kwatt_source_up", source="rapl") == 0
        assert value(text, "kwatt_source_up", source="procfs") == 0
        assert value(text, "kwatt_source_errors_total", source="rapl", reason="parse") >= 1
        assert value(text, "kwatt_source_errors_total", source="cgroup", reason="parse") >= 1
        assert value(text, "kwatt_source_errors_total", source="procfs", reason="parse") >= 1
        assert value(text, "kwatt_source_errors_total", source="cgroup", reason="absent") is None
        assert exporter.get("/healthz")[0] == 200

        # Repair everything: sources come back up, and a later interval is measured again.
        node.add_energy("1", 0)
        node.add_cpu(good.path, 0)  # rewrites the good files; now fix the bad one
        (node.cgroup_root / bad.path.strip("/") / "cpu.stat").write_text("usage_usec 5\n")
        node.add_node_cpu(idle_seconds=1)
        count = exporter.wait_for_cycle(after=count)
        node.add_cpu(good.path, 2)
        node.add_node_cpu(idle_seconds=2)
        node.add_energy("0", 20)
        node.add_energy("1", 20)
        count = exporter.wait_for_cycle(after=count)
        count = exporter.wait_for_cycle(after=count)
        text = exporter.metrics()
        seen.append(counters(text))
        assert value(text, "kwatt_source_up", source="rapl") == 1
        assert value(text, "kwatt_source_up", source="procfs") == 1
        assert value(text, "kwatt_source_up", source="cgroup") == 1
        # Package-1 energy that was spent while unreadable is not counted (re-baselined).
        assert value(text, "kwatt_rapl_zone_energy_joules_total", zone="package-1") == 30
        assert value(text, "kwatt_rapl_zone_energy_joules_total", zone="package-0") == 30
    finally:
        log = exporter.stop()
    assert exporter.proc.returncode == 0
    assert "Traceback" not in log
    # One warning per fault, not one per cycle.
    failed = [line for line in log.splitlines() if 'msg="source read failed"' in line
              and 'subject="package-1 energy_uj"' in line]
    assert len(failed) == 1, log
    assert 'msg="source read recovered" source=rapl subject="package-1 energy_uj"' in log
    for before, after in itertools.pairwise(seen):
        for key, number in before.items():
            assert after.get(key, number) >= number, key
