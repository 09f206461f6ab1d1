"""`kwatt-exporter --once`: a newcomer's first look, on a simulated node."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

from simnode import SimulatedNode, container_id, pod_uid


def test_once_prints_node_power_and_top_workloads(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node", vcpus=2)
    node.add_rapl_zone("0", "package-0")
    busy = node.add_unit("/system.slice/postgresql.service")
    pod = node.add_pod(pod_uid("web"))
    web = node.add_container(pod, container_id("web"))
    proc = subprocess.Popen(
        [sys.executable, "-m", "kwatt", "--once", "--interval", "1500ms", "--kubernetes", "off",
         "--gpu", "off", "--path.sysfs", str(node.sysfs), "--path.procfs", str(node.procfs),
         "--node-name", "demo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def load() -> None:  # between the two samples, the node does some work
        time.sleep(0.7)
        node.add_cpu(busy, 1.0)
        node.add_cpu(web.path, 0.5)
        node.add_node_cpu(idle_seconds=1.5)
        node.add_energy("0", 30.0)

    threading.Thread(target=load).start()
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    lines = out.splitlines()
    assert lines[0].startswith("kwatt on demo: average power over 1.5")
    assert "CPU utilisation 50%" in lines[0]
    assert any(line.split()[:2] == ["cpu", "rapl"] for line in lines)
    header = next(i for i, line in enumerate(lines) if line.startswith("WORKLOAD"))
    ranked = [line.split()[0] for line in lines[header + 1:]]
    assert ranked[:2] == ["postgresql.service", f"{pod.uid}/{web.container_id[:12]}"]
