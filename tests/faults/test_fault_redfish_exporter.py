"""The Redfish meter wired into the exporter: the BMC's power (the older Power resource, no
energy counter, so power readings are integrated) becomes the `other` component
through the real CLI, and a failing BMC is counted and shown down while /metrics and the
sampler carry on, then comes back."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from exporter_process import ExporterProcess
from prometheus_client.parser import text_string_to_metric_families
from redfish_bmc import PASSWORD, USERNAME, FaultyBmc, Pki, copy_mockup, make_pki
from simnode import SimulatedNode


@pytest.fixture
def bmc(tmp_path: Path) -> Iterator[tuple[FaultyBmc, Pki]]:
    pki = make_pki(tmp_path / "pki")
    server = FaultyBmc(copy_mockup("legacy-power", tmp_path / "mockup"), pki)
    yield server, pki
    server.close()


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(text: str, name: str, **labels: str) -> float | None:
    for (n, lbl), v in _samples(text).items():
        if n == name and all(dict(lbl).get(k) == want for k, want in labels.items()):
            return v
    return None


def _wait(exporter: ExporterProcess, ok: Callable[[str], bool], what: str,
          timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = exporter.metrics()
        if ok(text):
            return text
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}:\n{exporter.metrics()}")


def test_bmc_power_is_the_other_component_and_an_outage_is_counted(
        tmp_path: Path, bmc: tuple[FaultyBmc, Pki]) -> None:
    server, pki = bmc
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    (tmp_path / "user").write_text(USERNAME)
    (tmp_path / "password").write_text(PASSWORD)
    exporter = ExporterProcess(
        node, "--redfish.url", server.url, "--redfish.username-file", str(tmp_path / "user"),
        "--redfish.password-file", str(tmp_path / "password"),
        "--redfish.ca-file", str(pki.ca), "--redfish.interval", "1s")
    try:
        def busy() -> None:
            node.add_energy("0", 50.0)  # 50 W of CPU per second, far below the meter's 374 W
            node.add_node_cpu(busy_seconds=1, idle_seconds=3)

        def measured(text: str) -> bool:
            busy()
            other = _value(text, "kwatt_node_energy_joules_total", component="other")
            return other is not None and other > 0
        text = _wait(exporter, measured, "other from the BMC")
        assert _value(text, "kwatt_source_up", source="redfish") == 1.0
        platform = _value(text, "kwatt_platform_energy_joules_total", source="redfish")
        assert platform is not None and platform > 0

        server.mode = "500"

        def down(text: str) -> bool:
            busy()
            return (_value(text, "kwatt_source_up", source="redfish") == 0.0
                    and (_value(text, "kwatt_source_errors_total", source="redfish",
                                reason="api") or 0) >= 1)
        text = _wait(exporter, down, "the BMC outage counted")
        before = _value(text, "kwatt_node_energy_joules_total", component="cpu")
        cycles = exporter.cycles()
        exporter.wait_for_cycle(cycles)  # the sampler carries on
        status, _ = exporter.get("/healthz")
        assert status == 200

        server.mode = "ok"
        text = _wait(exporter, lambda t: (busy() or True) and _value(
            t, "kwatt_source_up", source="redfish") == 1.0, "the BMC back")
        after = _value(text, "kwatt_node_energy_joules_total", component="cpu")
        assert before is not None and after is not None and after >= before
    finally:
        log = exporter.stop()
    assert "Traceback" not in log
