"""One bad RAPL read through the real CLI: a value 1 uJ below the previous one used to be
taken as a wrap and booked ~262,000 J. Now it is a counted `implausible` fault, nothing is
booked for it, and measuring goes on."""

from __future__ import annotations

from pathlib import Path

from exporter_process import ExporterProcess
from prometheus_client.parser import text_string_to_metric_families
from simnode import SimulatedNode, container_id, pod_uid


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = tuple(sorted((k, v) for k, v in sample.labels.items() if k != "node"))
            out[(sample.name, labels)] = sample.value
    return out


CPU_RAPL = ("kwatt_node_energy_joules_total", (("component", "cpu"), ("source", "rapl")))
IMPLAUSIBLE = ("kwatt_source_errors_total", (("reason", "implausible"), ("source", "rapl")))


def test_rapl_glitch_books_nothing_through_the_cli(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0", energy_uj=100_000_000_000)
    ctr = node.add_container(node.add_pod(pod_uid("a")), container_id("a"))
    exporter = ExporterProcess(node, interval="0.2s")
    try:
        count = exporter.wait_for_cycle()

        def busy(cycles: int) -> None:
            nonlocal count
            for _ in range(cycles):
                # 5 J per cycle of >= 0.2 s: at most 25 W, plausible at any cycle speed.
                node.add_energy("0", 5.0)
                node.add_cpu(ctr.path, 0.05)
                node.add_node_cpu(idle_seconds=0.3)
                count = exporter.wait_for_cycle(count)

        busy(3)
        before = _samples(exporter.metrics())
        true_value = node.zones["0"].energy_uj
        node.set_zone_content("0", f"{true_value - 1}\n")  # a 1 uJ glitch
        count = exporter.wait_for_cycle(exporter.wait_for_cycle(count))
        glitched = _samples(exporter.metrics())
        busy(3)
        after = _samples(exporter.metrics())
    finally:
        log = exporter.stop()
    assert glitched[CPU_RAPL] - before[CPU_RAPL] < 1.0  # not ~262,000 J
    assert glitched[IMPLAUSIBLE] == 1
    # Measuring resumed: the last cycles booked their few joules each.
    assert 5.0 <= after[CPU_RAPL] - glitched[CPU_RAPL] <= 20.0
    assert after[IMPLAUSIBLE] == 1
    assert log.count("implausible") == 1, log
