"""A simulated GPU node served by the exporter's own assembly, in this process.

The CLI cannot take a fake NVML (tests/nvml_fake.py is never chosen by a flag), so
this builds ``kwatt.exporter.Exporter`` - the object ``kwatt.__main__.main`` runs - with
``FakeNvml`` injected, around a real kubelet PodResources gRPC server on a unix socket and
the fake Kubernetes API. Everything after NVML is kwatt's real code: the Kubernetes watch,
attribution, ledger, collectors, HTTP.

Scenario (what the GPU dashboard and the GPU alert need):
  GPU-0  300 W, 90 % busy, held by ml/train-0/trainer (exclusive)
  GPU-1   60 W,  1 % busy, held by lab/nb/jupyter: allocated but idle
  GPU-2   50 W, nobody holds it: unallocated
  GPU-3  100 W, MIG mode, instance MIG-a held by lab/mig-job/main
  GPU-4  150 W, 40 % busy, time-sliced between ml/infer-a and ml/infer-b (shared)
  An ACPI power meter reads 1200 W for the whole node: other = 1200 - 660 - 95 = 445 W.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

from fake_kube_api import FakeKubeApi, make_pod, owner_uid
from hwmon_sim import install_hwmon, set_hwmon
from kwatt.config import load_config
from kwatt.exporter import Exporter
from kwatt.sources.nvml import MigInstance
from nvml_fake import FakeGpu, FakeNvml
from podresources_server import Allocation, PodResourcesServer
from simnode import SimulatedNode, container_id, pod_uid

METER_WATTS = 1200.0
GPU_WATTS = {"GPU-0": 300.0, "GPU-1": 60.0, "GPU-2": 50.0, "GPU-3": 100.0, "GPU-4": 150.0}
HOLDERS = {  # key: (namespace, pod, container, pid on the GPU)
    "trainer": ("ml", "train-0", "trainer", 11),
    "notebook": ("lab", "nb", "jupyter", 21),
    "mig-job": ("lab", "mig-job", "main", 31),
    "infer-a": ("ml", "infer-a", "server", 41),
    "infer-b": ("ml", "infer-b", "server", 42),
}


# AI workloads as their operators build them (docs/kubernetes.md): the trainer's pod is a
# TrainJob's (TrainJob -> JobSet -> Job -> Pod), the two inference pods an InferenceService's
# (named by KServe's pod label; their ReplicaSet is not served, as behind Knative).
RUN = "llama-ft-0412"
OWNERS: dict[str, tuple[tuple[str, str, str], dict[str, str]]] = {
    "trainer": (("Job", f"{RUN}-node-0", owner_uid("Job", f"{RUN}-node-0", "ml")),
                {"jobset.sigs.k8s.io/jobset-name": RUN}),
    "infer-a": (("ReplicaSet", "llama-chat-predictor-00001-deployment-5d8f", ""),
                {"serving.kserve.io/inferenceservice": "llama-chat",
                 "pod-template-hash": "5d8f"}),
    "infer-b": (("ReplicaSet", "llama-chat-predictor-00001-deployment-5d8f", ""),
                {"serving.kserve.io/inferenceservice": "llama-chat",
                 "pod-template-hash": "5d8f"}),
}


def add_run_owners(api: FakeKubeApi) -> None:
    api.add_owner("TrainJob", RUN, "ml")
    api.add_owner("JobSet", RUN, "ml", owner=("TrainJob", RUN, owner_uid("TrainJob", RUN, "ml")))
    api.add_owner("Job", f"{RUN}-node-0", "ml",
                  owner=("JobSet", RUN, owner_uid("JobSet", RUN, "ml")))


class SimulatedGpuNode:
    def __init__(self, root: Path, config_file: Path, api: FakeKubeApi, kubeconfig: Path,
                 node_name: str = "gpu-node") -> None:
        self.node = SimulatedNode(root / "node", cgroup_version=2, driver="systemd", vcpus=8)
        self.node.add_rapl_zone("0", "package-0")
        self.node.add_rapl_zone("0:0", "dram")
        install_hwmon(self.node, "acpi-power-meter")
        set_hwmon(self.node, "hwmon1/device/power1_average", round(METER_WATTS * 1e6))
        self.paths: dict[str, str] = {}
        add_run_owners(api)
        for key, (_namespace, pod, _name, pid) in HOLDERS.items():
            sim_pod = self.node.add_pod(pod_uid(pod), "burstable", "containerd")
            path = self.node.add_container(sim_pod, container_id(key)).path
            self.paths[key] = path
            owner, labels = OWNERS.get(key, (None, {}))
            api.add(make_pod(pod, namespace=_namespace, uid=pod_uid(pod), node=node_name,
                             containers={_name: f"containerd://{container_id(key)}"},
                             owner=owner, labels=labels))
            proc = self.node.procfs / str(pid)
            proc.mkdir(parents=True, exist_ok=True)
            (proc / "cgroup").write_text(f"0::{path}\n")
        self.gpus = [
            FakeGpu("GPU-0", utilisation_percent=90, compute_pids=[11]),
            FakeGpu("GPU-1", utilisation_percent=1, compute_pids=[21]),
            FakeGpu("GPU-2", utilisation_percent=0),
            FakeGpu("GPU-3", model="NVIDIA A100-SXM4-40GB", mig_enabled=True, instances=[
                MigInstance("MIG-a", 1, 3, "3g.20gb", (31,))]),
            FakeGpu("GPU-4", utilisation_percent=40, compute_pids=[41, 42]),
        ]
        self.kubelet = PodResourcesServer(str(root / "kubelet.sock")).start()
        self.kubelet.lister.allocations = [
            Allocation("ml", "train-0", "trainer", "nvidia.com/gpu", ["GPU-0"]),
            Allocation("lab", "nb", "jupyter", "nvidia.com/gpu", ["GPU-1"]),
            Allocation("lab", "mig-job", "main", "nvidia.com/mig-3g.20gb", ["MIG-a"]),
            Allocation("ml", "infer-a", "server", "nvidia.com/gpu", ["GPU-4::0"]),
            Allocation("ml", "infer-b", "server", "nvidia.com/gpu", ["GPU-4::1"]),
        ]
        self.config = load_config([
            "--config", str(config_file), "--path.sysfs", str(self.node.sysfs),
            "--path.procfs", str(self.node.procfs), "--kubernetes", "on",
            "--kubeconfig", str(kubeconfig), "--gpu", "on",
            "--interval", "1s", "--web.listen-address", "127.0.0.1:0",
            "--node-name", node_name,
            "--kubelet.pod-resources-socket", self.kubelet.socket_path], env={})
        self.exporter = Exporter(self.config,
                                 gpu_backend_factory=lambda: FakeNvml(self.gpus))
        self.exporter.start_watch()
        self.sampler = self.exporter.sampler
        self.server = self.exporter.serve()
        self.port = int(self.server.server_address[1])
        self.stop_event = threading.Event()
        self._threads = [threading.Thread(target=self.sampler.run, args=(self.stop_event,),
                                          daemon=True),
                         threading.Thread(target=self._feed, daemon=True)]
        for thread in self._threads:
            thread.start()

    def _feed(self) -> None:
        last = time.monotonic()
        while not self.stop_event.wait(0.25):
            now = time.monotonic()
            dt, last = now - last, now
            for gpu in self.gpus:
                gpu.energy_mj += round(GPU_WATTS[gpu.uuid] * dt * 1000)
            self.node.add_energy("0", 80.0 * dt)
            self.node.add_energy("0:0", 15.0 * dt)
            for path in self.paths.values():
                self.node.add_cpu(path, 0.3 * dt)
            self.node.add_node_cpu(busy_seconds=0.1 * dt, idle_seconds=6.0 * dt)

    def stop(self) -> None:
        self.stop_event.set()
        for thread in self._threads:
            thread.join(timeout=5)
        self.server.shutdown()
        self.kubelet.stop()
        self.exporter.stop_watch()
