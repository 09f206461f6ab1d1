"""A GPU driver that hangs inside an NVML call, through the real Exporter over HTTP: CPU
sampling and /metrics carry on, the overrun is counted, and when the driver answers again
the energy it held back is booked once and conserved."""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

from kwatt.config import load_config
from kwatt.exporter import Exporter
from nvml_fake import FakeGpu, FakeNvml
from prometheus_client.parser import text_string_to_metric_families
from simnode import SimulatedNode, container_id, pod_uid


class HangingNvml(FakeNvml):
    def __init__(self, gpus: list[FakeGpu]) -> None:
        super().__init__(gpus)
        self.gate = threading.Event()
        self.gate.set()
        self.hung = threading.Event()

    def total_energy_mj(self, uuid: str) -> int:
        if not self.gate.is_set():
            self.hung.set()
            self.gate.wait(60)
        return super().total_energy_mj(uuid)


def _scrape(port: int) -> tuple[dict[str, float], float]:
    started = time.monotonic()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    elapsed = time.monotonic() - started
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            component = s.labels.get("component")
            if s.name == "kwatt_node_energy_joules_total":
                out[f"node_{component}"] = s.value
            elif s.name in ("kwatt_container_energy_joules_total",
                            "kwatt_unattributed_energy_joules_total") and component == "gpu":
                out["gpu_split"] = out.get("gpu_split", 0.0) + s.value
            elif s.name == "kwatt_gpu_energy_joules_total":
                out["gpu_rows"] = out.get("gpu_rows", 0.0) + s.value
            elif s.name == "kwatt_gpu_read_overruns_total":
                out["overruns"] = s.value
    return out, elapsed


def _until(port: int, done: object, seconds: float = 30.0) -> dict[str, float]:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        figures, _ = _scrape(port)
        if done(figures):  # type: ignore[operator]
            return figures
        time.sleep(0.05)
    raise AssertionError(f"not reached: {figures}")


def test_hanging_nvml_call_stalls_only_the_gpu_thread(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    ctr = node.add_container(node.add_pod(pod_uid("a")), container_id("a"))
    (node.procfs / "11").mkdir(parents=True)
    (node.procfs / "11" / "cgroup").write_text(f"0::{ctr.path}\n")
    fake = HangingNvml([FakeGpu("GPU-0", energy_mj=1, compute_pids=[11])])
    config = load_config([
        "--path.sysfs", str(node.sysfs), "--path.procfs", str(node.procfs),
        "--kubernetes", "off", "--gpu", "on", "--web.listen-address", "127.0.0.1:0",
        "--interval", "200ms", "--node-name", "sim"], env={})
    exporter = Exporter(config, gpu_backend_factory=lambda: fake)
    server = exporter.serve()
    port = int(server.server_address[1])
    stop = threading.Event()
    sampler = threading.Thread(target=exporter.sampler.run, args=(stop,), daemon=True)
    sampler.start()
    feeding = threading.Event()

    def feed() -> None:
        while not stop.wait(0.05):
            node.add_energy("0", 1.0)
            node.add_cpu(ctr.path, 0.01)
            node.add_node_cpu(busy_seconds=0.01, idle_seconds=0.04)
            if feeding.is_set():
                fake.gpus[0].energy_mj += 5_000  # 5 J per 50 ms: 100 W
    feeder = threading.Thread(target=feed, daemon=True)
    feeder.start()
    try:
        _until(port, lambda f: "node_gpu" in f)  # baseline read at 1 mJ, 0 J booked
        feeding.set()
        _until(port, lambda f: f.get("node_gpu", 0) > 0)
        fake.gate.clear()
        assert fake.hung.wait(10)
        hung_at, _ = _scrape(port)
        time.sleep(1.5)  # ~7 sampler intervals with the GPU thread stuck in NVML
        during, elapsed = _scrape(port)
        assert elapsed < 1.0
        assert during["node_cpu"] > hung_at["node_cpu"], "CPU sampling went on"
        assert during["node_gpu"] == hung_at["node_gpu"], "nothing booked while hung"
        assert during["overruns"] >= 1
        feeding.clear()
        counter_at_release = fake.gpus[0].energy_mj
        fake.gate.set()
        # Everything the counter moved since the last booked reading is booked, once.
        after = _until(port, lambda f: f["gpu_rows"] >= (counter_at_release - 1) / 1000 - 1e-6)
        assert abs(after["gpu_split"] - after["node_gpu"]) < 1e-6
        assert abs(after["gpu_rows"] - after["node_gpu"]) < 1e-6
        time.sleep(0.5)
        final, _ = _scrape(port)
        assert abs(final["gpu_rows"] - (fake.gpus[0].energy_mj - 1) / 1000) < 1e-6
    finally:
        stop.set()
        fake.gate.set()
        exporter.stop()
        sampler.join(5)
        feeder.join(5)
