"""Sampler cycle time added by GPUs: 8 GPUs (4 exclusive, 4 time-sliced), 64 GPU processes.

Runs the real sampler on a simulated node with the fake NVML backend, once with the
kubelet PodResources API (a real gRPC server on a unix socket), once with the same GPUs
claimed through DRA (``dynamic_resources`` + a ResourceSlice store in the NVIDIA driver's
layout) and once in host mode (holders from NVML's process list), and prints the median and
p95 cycle time with and without the GPU stage, and how many NVML calls one cycle makes.

    .venv/bin/python benchmarks/bench_gpu.py [cycles]

Target: <= 10 ms median added by GPUs with the fake backend.
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from fake_kube_api import DRA_DRIVER, make_resource_slice, nvidia_gpu_device
from kwatt.config import load_config
from kwatt.gpu_stage import GpuStage
from kwatt.sampler import EnergyStage, Sampler
from kwatt.sources.nvml import GpuReader, ProcessSample
from kwatt.workloads.podresources import PodResourcesClient
from kwatt.workloads.resourceslices import SliceStore
from nvml_fake import FakeGpu, FakeNvml
from podresources_server import Allocation, DraAllocation, PodResourcesServer
from simnode import SimulatedNode, container_id, pod_uid
from test_gpu_stage import NamesNamer, run_process

GPUS = 8
SHARED = 4
PER_SHARED = 15  # 4 exclusive + 4 * 15 shared = 64 GPU processes
CPU_ONLY_CONTAINERS = 40


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def build(root: Path) -> tuple[SimulatedNode, NamesNamer, FakeNvml, list[Allocation]]:
    node = SimulatedNode(root, vcpus=32, noise_files=True)
    node.add_intel_server_zones(2)
    namer = NamesNamer()
    gpus = [FakeGpu(f"GPU-{i:02d}", utilisation_percent=60) for i in range(GPUS)]
    allocations: list[Allocation] = []
    pid = 1000
    for g, gpu in enumerate(gpus):
        holders = 1 if g < GPUS - SHARED else PER_SHARED
        for h in range(holders):
            name = f"gpu{g}-{h}"
            pod = node.add_pod(pod_uid(name))
            ctr = node.add_container(pod, container_id(name))
            namer.add(ctr, "ml", name, "main")
            run_process(node, pid, ctr.path)
            gpu.compute_pids.append(pid)
            device = gpu.uuid if holders == 1 else f"{gpu.uuid}::{h}"
            allocations.append(Allocation("ml", name, "main", "nvidia.com/gpu", [device]))
            pid += 1
    for i in range(CPU_ONLY_CONTAINERS):
        pod = node.add_pod(pod_uid(f"cpu{i}"))
        node.add_container(pod, container_id(f"cpu{i}"))
    return node, namer, FakeNvml(gpus), allocations


def advance(node: SimulatedNode, fake: FakeNvml, stamp: int, clock: Clock) -> None:
    for pod in node.pods.values():
        for ctr in pod.containers:
            node.add_cpu(ctr.path, 0.01)
    node.add_node_cpu(idle_seconds=100)
    for zone in ("0", "1", "0:2", "1:2"):
        node.add_energy(zone, 50.0)
    for gpu in fake.gpus:
        gpu.energy_mj += 3_000_000
        gpu.samples = [ProcessSample(p, 60 / len(gpu.compute_pids), stamp)
                       for p in gpu.compute_pids]
    clock.now += 5.0


def measure(root: Path, cycles: int, mode: str) -> tuple[list[float], int, float]:
    node, namer, fake, allocations = build(root)
    config = load_config(["--path.sysfs", str(node.sysfs), "--path.procfs", str(node.procfs),
                          "--kubernetes", "off", "--gpu", "off"], env={})
    clock = Clock()
    stages: list[EnergyStage] = []
    server = None
    client = None
    if mode != "none":
        reader = GpuReader(fake, clock)
        reader.start()
        slices = None
        if mode == "kubelet":
            server = PodResourcesServer(str(root / "kubelet.sock")).start()
            server.lister.allocations = allocations
            client = PodResourcesClient(server.socket_path, ("nvidia.com/gpu",))
        elif mode == "dra":
            # The same holders, each through its own claim on the GPU's DRA device.
            server = PodResourcesServer(str(root / "kubelet.sock")).start()
            server.lister.dra = [
                DraAllocation(a.namespace, a.pod, a.container, f"{a.pod}-gpu",
                              [(DRA_DRIVER, "node", f"gpu-{int(a.device_ids[0][4:6])}")])
                for a in allocations]
            client = PodResourcesClient(server.socket_path, ("nvidia.com/gpu",),
                                        dra_drivers=(DRA_DRIVER,))
            slices = SliceStore()
            slices.replace_all({"node": make_resource_slice("node", [
                nvidia_gpu_device(int(g.uuid[4:6]), g.uuid) for g in fake.gpus],
                node="node", pool="node")})
        stages.append(GpuStage(reader, client, str(node.procfs), slices=slices))
    sampler = Sampler(config, namer, clock=clock, stages=stages)
    sampler.sample()
    times = []
    calls_before = fake.calls
    for stamp in range(1, cycles + 1):
        advance(node, fake, stamp * 1000, clock)
        started = time.perf_counter()
        sampler.sample()
        times.append(time.perf_counter() - started)
    calls = (fake.calls - calls_before) // cycles
    # Share of GPU energy charged to containers: 1.0 when every holder was found.
    snap = sampler.snapshot()
    node_gpu = sum(j for c, _, j in snap.node_energy if c == "gpu")
    charged = sum(dict(r.energy).get("gpu", 0.0) for r in snap.containers)
    charged_share = charged / node_gpu if node_gpu else 0.0
    if server is not None:
        if client is not None:
            client.close()
        server.stop()
    return times, calls, charged_share


def main() -> None:
    cycles = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    results = {}
    for mode in ("none", "kubelet", "dra", "host"):
        with tempfile.TemporaryDirectory() as tmp:
            results[mode] = measure(Path(tmp), cycles, mode)
    base = statistics.median(results["none"][0])
    print(f"bench_gpu: {GPUS} GPUs ({SHARED} time-sliced x {PER_SHARED}), "
          f"64 GPU processes, {CPU_ONLY_CONTAINERS} CPU-only containers, {cycles} cycles")
    for mode, (times, calls, charged) in results.items():
        median = statistics.median(times)
        p95 = sorted(times)[int(0.95 * (len(times) - 1))]
        added = "" if mode == "none" else f"  added by GPUs {1000 * (median - base):6.2f} ms"
        nvml = "" if mode == "none" else \
            f"  NVML calls/cycle {calls}  GPU energy charged {100 * charged:.0f} %"
        print(f"  {mode:8s} cycle median {1000 * median:6.2f} ms  p95 {1000 * p95:6.2f} ms"
              f"{added}{nvml}")


if __name__ == "__main__":
    main()
