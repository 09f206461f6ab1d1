"""RAPL zone discovery and reading on committed fixture trees and simulated nodes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from conftest import FIXTURES, REPO
from kwatt.sources.rapl import (
    RaplCounters,
    component_energy_joules,
    discover_rapl_zones,
    read_rapl_zones,
)


def test_two_socket_intel_zones_are_labelled_and_mmio_dropped() -> None:
    zones, faults = discover_rapl_zones(str(FIXTURES / "node-intel-2socket" / "sys"))
    assert faults == []
    assert [(z.zone, z.index, z.kind) for z in zones] == [
        ("package-0", "0", "package"), ("core-0", "0:0", "core"), ("uncore-0", "0:1", "uncore"),
        ("dram-0", "0:2", "dram"), ("package-1", "1", "package"), ("core-1", "1:0", "core"),
        ("uncore-1", "1:1", "uncore"), ("dram-1", "1:2", "dram"), ("psys-2", "2", "psys"),
    ]
    assert all(z.max_energy_range_uj == 262143328850 for z in zones)


def test_components_do_not_double_count_overlapping_zones() -> None:
    zones, _ = discover_rapl_zones(str(FIXTURES / "node-intel-2socket" / "sys"))
    deltas = {z: float(i + 1) for i, z in enumerate(zones)}
    by_label = {z.zone: deltas[z] for z in zones}
    got = component_energy_joules(zones, deltas)
    # cpu = packages only (core/uncore are inside them; psys would overlap them too).
    assert got == {"cpu": by_label["package-0"] + by_label["package-1"],
                   "dram": by_label["dram-0"] + by_label["dram-1"]}


def test_psys_is_cpu_when_there_is_no_package_zone(tmp_path: Path) -> None:
    from simnode import SimulatedNode
    node = SimulatedNode(tmp_path)
    node.add_rapl_zone("0", "psys")
    zones, _ = discover_rapl_zones(str(node.sysfs))
    assert component_energy_joules(zones, {zones[0]: 7.0}) == {"cpu": 7.0}


def test_amd_zen_has_packages_and_cores_but_no_dram() -> None:
    zones, _ = discover_rapl_zones(str(FIXTURES / "node-amd-zen" / "sys"))
    assert [z.zone for z in zones] == ["package-0", "core-0", "package-1", "core-1"]
    got = component_energy_joules(zones, dict.fromkeys(zones, 2.0))
    assert got == {"cpu": 4.0}


def test_component_missing_when_one_of_its_zones_failed() -> None:
    zones, _ = discover_rapl_zones(str(FIXTURES / "node-intel-2socket" / "sys"))
    deltas = {z: 1.0 for z in zones if z.zone != "package-1"}
    assert component_energy_joules(zones, deltas) == {"dram": 2.0}


def test_garbage_energy_is_a_parse_fault_never_zero(tmp_path: Path) -> None:
    from simnode import SimulatedNode
    node = SimulatedNode(tmp_path)
    node.add_rapl_zone("0", "package-0")
    node.add_rapl_zone("1", "package-1")
    zones, _ = discover_rapl_zones(str(node.sysfs))
    for text in ("not a number\n", "", "-5\n", "12\x0034"):
        node.set_zone_content("1", text)
        reading = read_rapl_zones(zones)
        assert [z.zone for z in reading.energy_uj] == ["package-0"]
        assert [(f.source, f.reason, f.subject) for f in reading.faults] == [
            ("rapl", "parse", "package-1 energy_uj")]


def test_zone_that_fails_is_rebaselined_when_it_returns(tmp_path: Path) -> None:
    from simnode import SimulatedNode
    node = SimulatedNode(tmp_path)
    node.add_rapl_zone("0", "package-0")
    zones, _ = discover_rapl_zones(str(node.sysfs))
    counters = RaplCounters()
    counters.advance(read_rapl_zones(zones), 1.0)
    node.set_zone_content("0", "garbage")
    deltas, _ = counters.advance(read_rapl_zones(zones), 1.0)
    assert deltas == {}
    node.add_energy("0", 50)  # energy used during the outage must not be counted later
    node.add_energy("0", 3)
    counters.advance(read_rapl_zones(zones), 1.0)
    node.add_energy("0", 4)
    deltas, _ = counters.advance(read_rapl_zones(zones), 1.0)
    assert list(deltas.values()) == [pytest.approx(4.0)]


def test_unreadable_zone_is_a_permission_fault() -> None:
    """EACCES as on kernels since CVE-2020-8694; as root, read it as nobody to get one."""
    from simnode import SimulatedNode
    # Not pytest's tmp_path: its parent is private to root, and nobody must get through.
    tmp_path = Path(tempfile.mkdtemp(prefix="kwatt-rapl-"))
    os.chmod(tmp_path, 0o755)
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    node.add_rapl_zone("1", "package-1")
    node.make_world_readable()
    node.make_zone_unreadable("1")
    code = (
        "import sys; from kwatt.sources.rapl import discover_rapl_zones, read_rapl_zones\n"
        "zones, _ = discover_rapl_zones(sys.argv[1])\n"
        "r = read_rapl_zones(zones)\n"
        "print(sorted(z.zone for z in r.energy_uj), [(f.reason, f.subject) for f in r.faults])\n"
    )
    python, run_as = sys.executable, {}
    if os.geteuid() == 0:
        # Root reads anything; drop to nobody with a Python and a copy of the package that
        # nobody can reach (the venv and the checkout may sit under /root).
        python, run_as = "/usr/bin/python3", {"user": 65534, "group": 65534}
        shutil.copytree(REPO / "exporter" / "kwatt", tmp_path / "pkg" / "kwatt")
        pkg = tmp_path / "pkg"
        for path in [pkg, *pkg.rglob("*")]:
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
    else:
        pkg = REPO / "exporter"
    result = subprocess.run(
        [python, "-c", code, str(node.sysfs)], capture_output=True, text=True,
        env={"PYTHONPATH": str(pkg), "PATH": "/usr/bin:/bin"}, check=False, **run_as)
    assert result.returncode == 0, result.stderr
    shutil.rmtree(tmp_path)
    assert result.stdout.strip() == (
        "['package-0'] [('permission', 'package-1 energy_uj')]")
