"""Golden end-to-end: the real CLI on a simulated node, scraped and diffed.

Update the golden file after an intended change with:
    KWATT_UPDATE_GOLDEN=1 .venv/bin/pytest tests/test_e2e_golden.py
"""

from __future__ import annotations

import difflib
import os
import re
import subprocess
from pathlib import Path

from conftest import FIXTURES, require_tool
from exporter_process import ExporterProcess
from simnode import SimulatedNode, container_id, pod_uid

GOLDEN = FIXTURES / "e2e-output.txt"
# Depend on wall-clock timing or the Python build, not on the node: dropped before diffing.
_NONDETERMINISTIC = re.compile(
    r"^(# (HELP|TYPE) )?(kwatt_node_power_watts|kwatt_sample_duration_seconds|process_|python_)")
_SAMPLE = re.compile(r"^([a-z_:]+(?:\{.*\})?) (\S+)$")


def normalise(exposition: str) -> str:
    lines = []
    for line in exposition.splitlines():
        if _NONDETERMINISTIC.match(line):
            continue
        line = re.sub(r'python_version="[^"]*"', 'python_version="X"', line)
        line = re.sub(r'version="[^"]*",', 'version="X",', line)
        match = _SAMPLE.match(line)
        if match:  # summation order can differ in the last bits between filesystems
            line = f"{match.group(1)} {float(match.group(2)):.9g}"
        lines.append(line)
    return "\n".join(lines) + "\n"


def build_node(root: Path) -> tuple[SimulatedNode, dict[str, str]]:
    node = SimulatedNode(root, cgroup_version=2, driver="systemd", vcpus=4)
    node.add_intel_server_zones(sockets=2)
    node.add_mmio_duplicate("0")
    node.zones["1"].energy_uj = node.zones["1"].max_range_uj - 100_000_000  # wraps in round 2
    node.add_energy("1", 0)
    pod_a = node.add_pod(pod_uid("shop-web"), "burstable", "containerd")
    web = node.add_container(pod_a, container_id("shop-web-app"))
    sidecar = node.add_container(pod_a, container_id("shop-web-envoy"))
    pod_b = node.add_pod(pod_uid("db-0"), "guaranteed", "cri-o")
    db = node.add_container(pod_b, container_id("db-0-postgres"))
    nginx = node.add_unit("/system.slice/nginx.service")
    docker = node.add_unit(f"/system.slice/docker-{container_id('plain')}.scope")
    return node, {"pod_a": pod_a.path, "web": web.path, "sidecar": sidecar.path,
                  "db": db.path, "nginx": nginx, "docker": docker, "pod_b": pod_b.path}


def run_scenario(tmp_path: Path) -> str:
    node, paths = build_node(tmp_path / "node")
    config = tmp_path / "kwatt.yaml"
    config.write_text("carbon:\n  intensity_grams_per_kwh: 350\ncost:\n  price_per_kwh: 0.25\n"
                      "  currency: EUR\npue: 1.2\n")
    exporter = ExporterProcess(node, "--config", str(config))
    try:
        count = exporter.wait_for_cycle(after=0)
        # Round 1: 40 s of CPU on 4 vCPUs over a 10 s window (u = 0.5).
        for key, seconds in (("web", 6), ("sidecar", 2), ("pod_a", 1), ("db", 4),
                             ("nginx", 3), ("docker", 2)):
            node.add_cpu(paths[key], seconds)
        node.add_node_cpu(busy_seconds=2, idle_seconds=20)
        for zone, joules in (("0", 300), ("0:0", 150), ("0:1", 20), ("0:2", 40), ("1", 50),
                             ("1:0", 20), ("1:1", 5), ("1:2", 30)):
            node.add_energy(zone, joules)
        count = exporter.wait_for_cycle(after=count)
        # Round 2: the sidecar exits, a short job starts and ends in the same interval
        # (charged from its full counter), package-1 wraps.
        node.remove_cgroup(paths["sidecar"])
        job = node.add_container(node.pods[pod_uid("db-0")], container_id("db-0-backup"))
        node.add_cpu(job.path, 3)
        node.add_cpu(paths["web"], 5)
        node.add_node_cpu(busy_seconds=1, idle_seconds=11)
        node.add_energy("0", 180)
        node.add_energy("1", 150)
        node.add_energy("0:2", 20)
        node.add_energy("1:2", 10)
        exporter.wait_for_cycle(after=count)
        return exporter.metrics()
    finally:
        log = exporter.stop()
        assert "Traceback" not in log, log


def test_golden_metrics(tmp_path: Path) -> None:
    raw = run_scenario(tmp_path)
    promtool = require_tool("promtool")
    check = subprocess.run([promtool, "check", "metrics"], input=raw, capture_output=True,
                           text=True, timeout=60)
    assert check.returncode == 0, check.stdout + check.stderr
    got = normalise(raw)
    if os.environ.get("KWATT_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(got)
    want = GOLDEN.read_text()
    diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                        str(GOLDEN), "scraped"))
    assert not diff, "\n" + diff
