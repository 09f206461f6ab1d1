"""Cgroup names that are not valid UTF-8, through the real CLI.

systemd escapes most unit names, but the kernel accepts any bytes in a cgroup directory
name, and anything with CAP_SYS_ADMIN over the hierarchy can make one. Each undecodable byte
must become U+FFFD in the labels, the unit must still be accounted, the fault counted,
and every scrape must stay a valid exposition.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from exporter_process import ExporterProcess
from prometheus_client.parser import text_string_to_metric_families
from simnode import SimulatedNode

pytestmark = pytest.mark.slow

# Pure cgroup v2 hosts mount the hierarchy at /sys/fs/cgroup, hybrid ones at .../unified.
REAL_CGROUP2 = next((p for p in (Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/unified"))
                     if (p / "cgroup.controllers").exists()), Path("/sys/fs/cgroup"))
_COUNT = re.compile(r"^kwatt_sample_duration_seconds_count\{[^}]*\} (\S+)$", re.M)


def parse(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    out: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return out


def scrape(exporter: ExporterProcess) -> dict[str, list[tuple[dict[str, str], float]]]:
    status, body = exporter.get("/metrics")
    assert status == 200, body[-2000:]
    return parse(body)


def next_cycle(exporter: ExporterProcess, after: int = 0, timeout: float = 30.0) -> int:
    """Wait for a cycle after ``after``; every scrape on the way must succeed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, body = exporter.get("/metrics")
        assert status == 200, body[-2000:]
        match = _COUNT.search(body)
        if match and int(float(match.group(1))) > after:
            return int(float(match.group(1)))
        time.sleep(0.02)
    raise TimeoutError("no sampler cycle completed")


def units(metrics: dict[str, list[tuple[dict[str, str], float]]]) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    for labels, value in metrics.get("kwatt_container_energy_joules_total", []):
        out.setdefault(labels["container"], []).append(value)
    return out


def errors(metrics: dict[str, list[tuple[dict[str, str], float]]], source: str) -> float:
    return sum(v for labels, v in metrics.get("kwatt_source_errors_total", [])
               if labels["source"] == source)


def write_usage(directory: bytes, seconds: float) -> None:
    with open(os.path.join(directory, b"cpu.stat"), "w") as handle:
        handle.write(f"usage_usec {int(seconds * 1e6)}\nuser_usec 0\nsystem_usec 0\n")


def test_undecodable_unit_names_in_a_fixture_tree(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node", vcpus=2)
    node.add_rapl_zone("0", "package-0")
    good = node.add_unit("/system.slice/good.service")
    slice_dir = os.fsencode(node.cgroup_root / "system.slice")
    # Two different invalid names that decode to the same text: one label set, one series.
    bad = [os.path.join(slice_dir, b"bad\xff.service"), os.path.join(slice_dir, b"bad\xfe.service")]
    for directory in bad:
        os.mkdir(directory)
        write_usage(directory, 0.0)
    exporter = ExporterProcess(node, interval="200ms")
    try:
        count = next_cycle(exporter)
        for step in range(1, 4):
            node.add_cpu(good, 1.0)
            for directory in bad:
                write_usage(directory, 1.0 * step)
            node.add_node_cpu(busy_seconds=2.0, idle_seconds=1.0)
            node.add_energy("0", 50.0)
            count = next_cycle(exporter, next_cycle(exporter, count))
            metrics = scrape(exporter)
        found = units(metrics)
        assert len(found["bad\ufffd.service"]) == 1  # folded: one series per label set
        assert found["bad\ufffd.service"][0] > 0
        assert found["good.service"][0] > 0
        assert errors(metrics, "cgroup") >= 1  # the undecodable name is a counted fault
        assert errors(metrics, "sampler") == 0
        log = exporter.stop()
        assert "Traceback" not in log
    finally:
        if exporter.proc.poll() is None:
            exporter.stop()


def test_hostile_docker_names_affect_only_their_container(tmp_path: Path) -> None:
    """Docker's config.v2.json is read for a container's name: a lone surrogate in it, or
    JSON nested too deep to parse, must cost that container its name, nothing more."""
    node = SimulatedNode(tmp_path / "node", vcpus=2)
    node.add_rapl_zone("0", "package-0")
    docker_root = tmp_path / "docker"
    ids = {"surrogate": "a" * 64, "deep": "b" * 64, "good": "c" * 64}
    contents = {"surrogate": '{"Name": "/web\\udc80"}', "deep": "[" * 100_000 + "]" * 100_000,
                "good": '{"Name": "/db"}'}
    paths = {}
    for key, cid in ids.items():
        (docker_root / "containers" / cid).mkdir(parents=True)
        (docker_root / "containers" / cid / "config.v2.json").write_text(contents[key])
        paths[key] = node.add_unit(f"/system.slice/docker-{cid}.scope")
    config = tmp_path / "kwatt.yaml"
    config.write_text(f"host:\n  docker_root: {docker_root}\n")
    exporter = ExporterProcess(node, "--config", str(config), interval="200ms")
    try:
        count = next_cycle(exporter)
        for _ in range(2):
            for path in paths.values():
                node.add_cpu(path, 1.0)
            node.add_node_cpu(idle_seconds=1.0)
            node.add_energy("0", 30.0)
            count = next_cycle(exporter, next_cycle(exporter, count))
        found = units(scrape(exporter))
        assert found.get("web\ufffd", [0.0])[0] > 0, found
        assert found.get("b" * 12, [0.0])[0] > 0, found  # unparsable: named by its short id
        assert found.get("db", [0.0])[0] > 0, found
        assert errors(scrape(exporter), "sampler") == 0
    finally:
        exporter.stop()


@pytest.fixture
def real_cgroup(tmp_path: Path) -> Iterator[tuple[SimulatedNode, bytes]]:
    """A scratch subtree of this machine's real cgroup v2 hierarchy, seen by the exporter as
    its whole hierarchy (a symlink at <sysfs>/fs/cgroup), removed afterwards."""
    if not (REAL_CGROUP2 / "cgroup.controllers").exists() or os.geteuid() != 0:
        pytest.fail("needs root and a cgroup v2 hierarchy at " + str(REAL_CGROUP2))
    root = os.fsencode(REAL_CGROUP2 / f"kwatt-test-{uuid.uuid4().hex[:8]}")
    os.mkdir(root)
    os.mkdir(os.path.join(root, b"system.slice"))
    node = SimulatedNode(tmp_path / "node", vcpus=os.cpu_count() or 1)
    link = node.sysfs / "fs" / "cgroup"
    for child in link.iterdir():
        child.unlink()
    link.rmdir()
    link.symlink_to(os.fsdecode(root))
    try:
        yield node, root
    finally:
        for current, dirs, _ in os.walk(root, topdown=False):
            for name in dirs:
                directory = os.path.join(current, name)
                procs = os.path.join(directory, b"cgroup.procs")
                with open(procs, "rb") as handle:
                    leftover = handle.read().split()
                for pid in leftover:  # move strays back to the root cgroup before rmdir
                    with open(os.fsencode(REAL_CGROUP2 / "cgroup.procs"), "wb") as out:
                        out.write(pid)
                os.rmdir(directory)
        os.rmdir(root)


def test_undecodable_unit_name_in_the_real_cgroupfs(
        real_cgroup: tuple[SimulatedNode, bytes], tmp_path: Path) -> None:
    node, root = real_cgroup
    exporter = ExporterProcess(node, "--path.procfs", "/proc", interval="200ms")
    unit = os.path.join(root, b"system.slice", b"\xe9t\xe9\xff.service")
    burner = None
    try:
        count = next_cycle(exporter)
        os.mkdir(unit)
        # A process that burns some CPU inside the unit, so it earns energy and a series.
        burner = subprocess.Popen([sys.executable, "-c", (
            "import sys, time\nsys.stdin.readline()\nend = time.process_time() + 0.5\n"
            "while time.process_time() < end: pass\ntime.sleep(60)\n")],
            stdin=subprocess.PIPE)
        with open(os.path.join(unit, b"cgroup.procs"), "w") as handle:
            handle.write(str(burner.pid))
        assert burner.stdin is not None
        burner.stdin.write(b"go\n")
        burner.stdin.flush()
        deadline = time.monotonic() + 60
        found: dict[str, list[float]] = {}
        while time.monotonic() < deadline:
            count = next_cycle(exporter, count)
            metrics = scrape(exporter)  # never a 500, whatever the kernel hands over
            found = units(metrics)
            if found.get("\ufffdt\ufffd\ufffd.service", [0.0])[0] > 0:
                break
        assert found.get("\ufffdt\ufffd\ufffd.service", [0.0])[0] > 0, found
        assert errors(metrics, "cgroup") >= 1
        assert errors(metrics, "sampler") == 0
    finally:
        if burner is not None:
            burner.kill()
            burner.wait()
        exporter.stop()
