"""ResourceSlices that cannot be read (no RBAC rule: 403) while a GPU is held through a DRA
claim: the real Exporter counts the fault under its own source, books the GPU's energy as
``unidentified`` (never ``unallocated``), and charges the container exactly once the API
answers. The Exporter is real; NVML is the fake, the kubelet a real gRPC server, the API
server the fake one."""

from __future__ import annotations

import time
import urllib.request
from pathlib import Path

import pytest
from fake_kube_api import (
    DRA_DRIVER,
    FakeKubeApi,
    make_pod,
    make_resource_slice,
    nvidia_gpu_device,
    write_kubeconfig,
)
from kwatt.config import load_config
from kwatt.exporter import Exporter
from nvml_fake import FakeGpu, FakeNvml
from podresources_server import DraAllocation, PodResourcesServer
from prometheus_client.parser import text_string_to_metric_families
from simnode import SimulatedNode, container_id, pod_uid

NODE = "gpu-node"


def _scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _value(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str,
           **labels: str) -> float:
    return sum(v for (n, lbl), v in samples.items()
               if n == name and all(dict(lbl).get(k) == x for k, x in labels.items()))


def _wait(predicate: object, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_forbidden_resource_slices_make_dra_gpus_unidentified_then_charged(
        tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    sim_pod = node.add_pod(pod_uid("train-0"), "burstable", "containerd")
    node.add_container(sim_pod, container_id("trainer"))
    api = FakeKubeApi()
    api.add(make_pod("train-0", namespace="ml", uid=pod_uid("train-0"), node=NODE,
                     containers={"trainer": f"containerd://{container_id('trainer')}"}))
    api.add(make_resource_slice(f"{NODE}-gpu.nvidia.com", [nvidia_gpu_device(0, "GPU-0")],
                                node=NODE))
    api.slice_fail_status = 403
    kubelet = PodResourcesServer(str(tmp_path / "kubelet.sock")).start()
    kubelet.lister.dra = [DraAllocation("ml", "train-0", "trainer", "train-gpu",
                                        [(DRA_DRIVER, NODE, "gpu-0")])]
    gpus = [FakeGpu("GPU-0", utilisation_percent=80)]
    with api.serve() as url:
        config = load_config([
            "--path.sysfs", str(node.sysfs), "--path.procfs", str(node.procfs),
            "--kubernetes", "on", "--kubeconfig", str(write_kubeconfig(
                tmp_path / "kubeconfig", url)),
            "--gpu", "on", "--web.listen-address", "127.0.0.1:0", "--node-name", NODE,
            "--kubelet.pod-resources-socket", kubelet.socket_path], env={})
        # The test steps cycles: each waits for its GPU reading (GPUs read on their thread).
        exporter = Exporter(config, gpu_backend_factory=lambda: FakeNvml(gpus),
                            gpu_read_wait_seconds=30.0)
        exporter.start_watch()
        server = exporter.serve()
        port = int(server.server_address[1])
        sampler = exporter.sampler
        try:
            _wait(lambda: exporter.kube is not None and exporter.kube.store.current().synced,
                  "pod list")
            sampler.sample()

            def interval() -> None:
                # 100 J per interval, at least 0.1 s apart: under the 1400 W plausibility
                # ceiling (twice the fake's 700 W limit) however fast the machine is.
                time.sleep(0.1)
                gpus[0].energy_mj += 100_000
                sampler.sample()

            # Forbidden: the claim's device cannot be placed; the GPU is unidentified.
            assert exporter.kube is not None and exporter.kube.slices is not None
            _wait(lambda: any(r.path.endswith("/resourceslices") for r in api.requests),
                  "a ResourceSlice request")
            interval()
            interval()
            samples = _scrape(port)
            assert _value(samples, "kwatt_unattributed_energy_joules_total", component="gpu",
                          reason="unidentified") == pytest.approx(200.0)
            assert _value(samples, "kwatt_unattributed_energy_joules_total", component="gpu",
                          reason="unallocated") == 0.0
            assert _value(samples, "kwatt_source_up", source="resourceslices") == 0.0
            assert _value(samples, "kwatt_source_up", source="kubernetes") == 1.0

            def counted() -> bool:
                sampler.sample()  # no GPU energy: books nothing, drains the watcher's faults
                return _value(_scrape(port), "kwatt_source_errors_total",
                              source="resourceslices", reason="permission") >= 1
            _wait(counted, "the 403 counted")

            # The rule is granted: the watch lists the slice and the trainer pays exactly.
            api.slice_fail_status = None
            _wait(lambda: exporter.kube.slices.store.lookup(  # type: ignore[union-attr]
                DRA_DRIVER, NODE, "gpu-0") is not None, "the slice")
            interval()
            interval()
            samples = _scrape(port)
            assert _value(samples, "kwatt_container_energy_joules_total", component="gpu",
                          namespace="ml", pod="train-0",
                          container="trainer") == pytest.approx(200.0)
            assert _value(samples, "kwatt_unattributed_energy_joules_total", component="gpu",
                          reason="unidentified") == pytest.approx(200.0)
            assert _value(samples, "kwatt_node_energy_joules_total",
                          component="gpu") == pytest.approx(400.0)
            assert _value(samples, "kwatt_source_up", source="resourceslices") == 1.0
            assert _value(samples, "kwatt_gpu_allocation_info", uuid="GPU-0", pod="train-0",
                          resource=DRA_DRIVER) == 1.0
        finally:
            server.shutdown()
            exporter.stop_watch()
            kubelet.stop()
