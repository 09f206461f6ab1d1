"""The restart state file through the real CLI: bad files are ignored in one log line, a
file that cannot be written is a counted fault, and a good one books the gap.

CLOCK_MONOTONIC is shared by every process of one boot, so this test can write a state
file "sampled N seconds ago" that the exporter process judges by its own clock.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from exporter_process import ExporterProcess
from simnode import SimulatedNode

pytestmark = pytest.mark.slow

BOOT = "5d1c8a52-1111-4222-8333-444455556666"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[SimulatedNode]:
    sim = SimulatedNode(tmp_path / "node", cgroup_version=2, vcpus=4)
    sim.add_rapl_zone("0", "package-0", energy_uj=50_000_000)
    sim.add_unit("/system.slice/app.service")
    sim.add_cpu("/system.slice/app.service", 100.0)
    sim.add_node_cpu(busy_seconds=10.0, idle_seconds=500.0)
    boot = sim.procfs / "sys" / "kernel" / "random"
    boot.mkdir(parents=True)
    (boot / "boot_id").write_text(BOOT + "\n")
    yield sim


def _state(node: SimulatedNode, *, age: float = 2.0, boot: str = BOOT,
           rapl_uj: int | None = None, busy_ticks: int | None = None) -> dict[str, object]:
    return {
        "kwatt_state": 1, "boot_id": boot, "monotonic": time.monotonic() - age,
        "cgroup_version": 2, "host_units": True,
        "node_cpu": {"busy_ticks": node.busy_ticks if busy_ticks is None else busy_ticks,
                     "idle_ticks": node.idle_ticks},
        "rapl_uj": {"0": node.zones["0"].energy_uj if rapl_uj is None else rapl_uj},
        "gpu": {}, "cgroup_usage_seconds": {"/system.slice/app.service": 100.0},
    }


def _start(node: SimulatedNode, state: Path, log: Path) -> ExporterProcess:
    return ExporterProcess(node, "--state.file", str(state), log_path=log)


def _state_lines(log: str) -> list[str]:
    return [line for line in log.splitlines() if "restart state" in line]


def _node_cpu_joules(metrics: str) -> float:
    match = re.search(r'^kwatt_node_energy_joules_total\{[^}]*component="cpu"[^}]*\} (\S+)$',
                      metrics, re.M)
    return float(match.group(1)) if match else 0.0


@pytest.mark.parametrize(("content", "reason"), [
    (b"{\"kwatt_state\": 1, \"boot_id\": ", "corrupt"),
    (b"\xff\x00\xfe binary", "corrupt"),
    (json.dumps({"kwatt_state": 99}).encode(), "unsupported version"),
    ("other-boot", "another boot"),
    ("stale", "stale"),
    ("lower-rapl", "RAPL counter lower"),
    ("lower-cpu", "node CPU time is lower"),
    ("huge", "too large"),
])
def test_unusable_state_is_ignored_in_one_line(node: SimulatedNode, tmp_path: Path,
                                               content: bytes | str, reason: str) -> None:
    state = tmp_path / "state.json"
    if content == "other-boot":
        data = json.dumps(_state(node, boot="0000-another-boot")).encode()
    elif content == "stale":
        if time.monotonic() < 400:
            pytest.skip("booted under 400 s ago: no older CLOCK_MONOTONIC time exists")
        data = json.dumps(_state(node, age=400.0)).encode()
    elif content == "lower-rapl":
        data = json.dumps(_state(node, rapl_uj=node.zones["0"].energy_uj + 10**9)).encode()
    elif content == "lower-cpu":
        data = json.dumps(_state(node, busy_ticks=node.busy_ticks + 10**6)).encode()
    elif content == "huge":
        data = b" " * (33 * 1024 * 1024)
    else:
        assert isinstance(content, bytes)
        data = content
    state.write_bytes(data)
    exporter = _start(node, state, tmp_path / "exporter.log")
    try:
        node.add_energy("0", 40.0)
        exporter.wait_for_cycle()
        metrics = exporter.metrics()
        # Nothing booked from the bad file: the first cycle only set the baseline, and
        # at most the 40 J added since then (if a second cycle already ran).
        assert _node_cpu_joules(metrics) <= 40.0 + 1e-6
        exporter.wait_for_cycle()
        exporter.metrics()  # a served snapshot: the bad file is replaced by a good one
        exporter.wait_for_cycle()
        assert json.loads(state.read_bytes())["kwatt_state"] == 1
    finally:
        log = exporter.stop()
    lines = _state_lines(log)
    assert len(lines) == 1, log
    assert "restart state ignored" in lines[0] and reason in lines[0], lines[0]
    assert "Traceback" not in log


def test_good_state_books_the_gap_in_the_first_sample(node: SimulatedNode,
                                                      tmp_path: Path) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps(_state(node, age=5.0)))
    node.add_energy("0", 500.0)  # what the node used while no exporter ran
    exporter = _start(node, state, tmp_path / "exporter.log")
    try:
        exporter.wait_for_cycle()
        assert _node_cpu_joules(exporter.metrics()) == pytest.approx(500.0, abs=1e-6)
    finally:
        log = exporter.stop()
    lines = _state_lines(log)
    assert len(lines) == 1 and "restart state restored" in lines[0], log


def test_unwritable_state_file_is_a_counted_fault_not_fatal(node: SimulatedNode,
                                                            tmp_path: Path) -> None:
    state = tmp_path / "missing-dir" / "state.json"
    exporter = _start(node, state, tmp_path / "exporter.log")
    try:
        count = exporter.wait_for_cycle()
        exporter.metrics()  # served: the next cycle tries to write
        exporter.wait_for_cycle(count)
        exporter.wait_for_cycle()
        metrics = exporter.metrics()
        status, _ = exporter.get("/healthz")
    finally:
        log = exporter.stop()
    errors = re.search(r'^kwatt_source_errors_total\{[^}]*source="state"[^}]*\} (\S+)$',
                       metrics, re.M)
    assert errors is not None and float(errors.group(1)) >= 1, metrics
    assert 'reason="absent"' in errors.group(0)
    assert status == 200
    # Rate-limited: one line, not one per cycle.
    assert log.count("cannot write the restart state file") == 1, log
    assert exporter.proc.returncode == 0


def test_shutdown_writes_the_last_scraped_sample(node: SimulatedNode, tmp_path: Path) -> None:
    """A scrape after the last cycle and then SIGTERM: only the shutdown write keeps it."""
    state = tmp_path / "state.json"
    exporter = ExporterProcess(node, "--state.file", str(state), interval="60s",
                               log_path=tmp_path / "exporter.log")
    try:
        exporter.wait_for_cycle(after=0)
        exporter.metrics()  # served; the next cycle is a minute away
        assert not state.exists()
    finally:
        exporter.stop()
    saved = json.loads(state.read_bytes())
    assert saved["boot_id"] == BOOT
    assert saved["rapl_uj"] == {"0": node.zones["0"].energy_uj}
    assert saved["cgroup_usage_seconds"]["/system.slice/app.service"] == pytest.approx(100.0)
