"""A scrape that arrives while the sampler is between the GPU stage and the ledger's publish
sees GPU and node counters of one and the same cycle (the real Exporter, over HTTP)."""

from __future__ import annotations

import urllib.request
from collections.abc import Mapping
from pathlib import Path

from kwatt.config import load_config
from kwatt.exporter import Exporter
from kwatt.ledger import WorkloadLabels
from kwatt.sampler import StageResult
from kwatt.workloads.cgroups import CgroupIdentity
from nvml_fake import FakeGpu, FakeNvml
from prometheus_client.parser import text_string_to_metric_families
from simnode import SimulatedNode, container_id, pod_uid


def _sums(text: str) -> tuple[float, float]:
    gpu_total = node_gpu = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "kwatt_gpu_energy_joules_total":
                gpu_total += sample.value
            elif (sample.name == "kwatt_node_energy_joules_total"
                  and sample.labels.get("component") == "gpu"):
                node_gpu += sample.value
    return gpu_total, node_gpu


def test_scrape_mid_cycle_sees_one_cycle(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    pod = node.add_pod(pod_uid("a"))
    ctr = node.add_container(pod, container_id("a"))
    gpus = [FakeGpu("GPU-0", utilisation_percent=50), FakeGpu("GPU-1")]
    config = load_config([
        "--path.sysfs", str(node.sysfs), "--path.procfs", str(node.procfs),
        "--kubernetes", "off", "--gpu", "on", "--web.listen-address", "127.0.0.1:0",
        "--node-name", "sim"], env={})
    # Each stepped cycle waits for its own GPU reading (the GPU thread is fast here).
    exporter = Exporter(config, gpu_backend_factory=lambda: FakeNvml(gpus),
                        gpu_read_wait_seconds=30.0)
    server = exporter.serve()
    port = int(server.server_address[1])
    scrapes: list[str] = []

    class ScrapeMidCycle:
        """Runs after the GPU stage in the same cycle: a scrape that lands between the GPU
        stage's work and the end of the cycle."""

        def sample(self, now: float,
                   workloads: Mapping[CgroupIdentity, WorkloadLabels | None]) -> StageResult:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                scrapes.append(r.read().decode())
            return StageResult()

    # Test-only: append the probe to the real exporter's stages, after the GPU stage.
    exporter.sampler._stages += (ScrapeMidCycle(),)
    try:
        for _ in range(5):
            for gpu in gpus:
                gpu.energy_mj += 100  # 0.1 J: plausible however fast the cycles run
            node.add_cpu(ctr.path, 0.01)
            node.add_node_cpu(idle_seconds=0.1)
            exporter.sampler.sample()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                scrapes.append(r.read().decode())
    finally:
        server.shutdown()
    assert len(scrapes) == 10
    totals = [_sums(text) for text in scrapes]
    assert totals[-1][0] > 0.7  # GPU energy was booked: 4 intervals x 2 GPUs x 0.1 J
    for gpu_total, node_gpu in totals:
        assert abs(gpu_total - node_gpu) < 1e-9, totals
