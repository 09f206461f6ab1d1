"""GPU energy is conserved and no counter goes backwards, whatever NVML, amdsmi and the
kubelet say: NVIDIA and AMD GPUs on one node, read together."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from amdsmi_fake import FakeAmdGpu, FakeAmdSmi, FakePartition
from conftest import FakeClock, node_config
from fake_kube_api import DRA_DRIVER, make_resource_slice, nvidia_gpu_device, nvidia_mig_device
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from kwatt.gpu_stage import GpuStage
from kwatt.sampler import Sampler
from kwatt.sources.amdsmi import AmdSmiBackend
from kwatt.sources.gpu import CombinedReader
from kwatt.sources.nvml import GPU_BOUND_WATTS, GpuReader, MigInstance, ProcessSample
from kwatt.workloads.podresources import PodResourcesClient
from kwatt.workloads.resourceslices import SliceStore
from nvml_fake import FakeGpu, FakeNvml
from podresources_server import Allocation, DraAllocation, PodResourcesServer
from simnode import SimulatedNode, container_id, pod_uid
from test_conservation import _counters, _totals
from test_gpu_stage import NamesNamer, run_process

REL = 1e-9
HOLDERS = [("ml", f"p{i}", "c") for i in range(4)] + [("ml", "ghost", "c")]
DEVICES = ["GPU-0", "GPU-1::0", "GPU-1::1", "nvidia3", "MIG-a", "MIG-b", "GPU-9",
           # AMD device plugin ids: a whole GPU, a partitioned GPU's two partitions
           "0000:c1:00.0", "0000:c2:00.0", "amdgpu_xcp_1"]
# DRA devices as NVIDIA's driver names them; "gpu-7" names no GPU of the node.
DRA_DEVICES = {"gpu-0": nvidia_gpu_device(0, "GPU-0"), "gpu-1": nvidia_gpu_device(1, "GPU-1"),
               "gpu-3": nvidia_gpu_device(3, "GPU-3"),
               "gpu-2-mig-9-0-4": nvidia_mig_device(2, "GPU-2", "MIG-a", "3g.20gb", 9, 0, 4),
               "gpu-2-mig-5-4-4": nvidia_mig_device(2, "GPU-2", "MIG-b", "4g.20gb", 5, 4, 4),
               "gpu-7": nvidia_gpu_device(7, "GPU-7")}
AMD_J = 2_000_000  # accumulator counts per joule (0.5 µJ per count)

amd_step = st.fixed_dictionaries({
    "joules": st.integers(0, 5000), "lost": st.booleans(),
    # reset: the accumulator restarts (driver reload); wrap: it passes 2**64.
    "counter": st.sampled_from(["advance", "advance", "reset", "wrap"]),
    "gfx": st.lists(st.integers(0, 100), min_size=2, max_size=2),
    "busy_ns": st.lists(st.integers(0, 10**10), min_size=2, max_size=2),
})

gpu_step = st.fixed_dictionaries({
    "mj": st.integers(0, 5_000_000), "mw": st.integers(0, 700_000),
    # A glitch on top of the honest energy: implausible, never booked.
    "jump_mj": st.sampled_from([0, 0, 0, 10**9, 10**21]),
    "util": st.integers(0, 100), "lost": st.booleans(), "reset": st.booleans(),
    "sm": st.lists(st.integers(0, 100), min_size=4, max_size=4),
})
step = st.fixed_dictionaries({
    "gpus": st.lists(gpu_step, min_size=4, max_size=4),
    "allocations": st.lists(st.tuples(st.integers(0, len(HOLDERS) - 1),
                                      st.sampled_from(DEVICES)), max_size=8),
    # DRA: (holder, device, claim) and which devices this node's ResourceSlices publish
    # (slices change between steps; an unpublished device's GPU is unidentified).
    "claims": st.lists(st.tuples(st.integers(0, len(HOLDERS) - 1),
                                 st.sampled_from(sorted(DRA_DEVICES)), st.integers(0, 2)),
                       max_size=6),
    "published": st.sets(st.sampled_from(sorted(DRA_DEVICES))),
    "kubelet_down": st.booleans(),
    "mig_pids": st.lists(st.booleans(), min_size=2, max_size=2),
    "amd": st.lists(amd_step, min_size=2, max_size=2),
    "dt": st.floats(0.5, 30),
})


@pytest.fixture(scope="module")
def kubelet() -> Iterator[PodResourcesServer]:
    with tempfile.TemporaryDirectory() as tmp:
        server = PodResourcesServer(str(Path(tmp) / "kubelet.sock")).start()
        yield server
        server.stop()


@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(steps=st.lists(step, min_size=1, max_size=8))
# A claimed device no slice names while three whole GPUs are unheld: a third of each is
# unidentified, the rest unallocated.
@example(steps=[{"gpus": [{"mj": 1_000_000, "mw": 0, "jump_mj": 0, "util": 0, "lost": False,
                           "reset": False, "sm": [0, 0, 0, 0]}] * 4,
                 "allocations": [], "claims": [(0, "gpu-7", 0)], "published": set(DRA_DEVICES),
                 "kubelet_down": False, "mig_pids": [False, False],
                 "amd": [{"joules": 0, "lost": False, "counter": "advance", "gfx": [0, 0],
                          "busy_ns": [0, 0]}] * 2, "dt": 10.0}])
def test_gpu_energy_conserved_and_monotonic(kubelet: PodResourcesServer, steps) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        node = SimulatedNode(Path(tmp))
        namer = NamesNamer()
        for i in range(4):
            pod = node.add_pod(pod_uid(f"p{i}"))
            ctr = node.add_container(pod, container_id(f"c{i}"))
            namer.add(ctr, "ml", f"p{i}", "c")
            run_process(node, 100 + i, ctr.path)
        (node.sysfs / "devices/platform/amdgpu_xcp_1/drm/renderD129").mkdir(parents=True)
        fake = FakeNvml([
            FakeGpu("GPU-0"), FakeGpu("GPU-1", has_energy_counter=False),
            FakeGpu("GPU-2", mig_enabled=True, instances=[
                MigInstance("MIG-a", 1, 3, "3g.20gb"), MigInstance("MIG-b", 2, 4, "4g.20gb")]),
            FakeGpu("GPU-3", power_limit_mw=None)])
        # Twice the enforced power limit (700 W in the fake), else the documented bound.
        ceiling = {"GPU-0": 1400.0, "GPU-1": 1400.0, "GPU-2": 1400.0, "GPU-3": GPU_BOUND_WATTS}
        amd = FakeAmdSmi([
            FakeAmdGpu("amd-0", [FakePartition("0000:c1:00.0", processes={102: 0, 103: 0})]),
            FakeAmdGpu("amd-1", [FakePartition("0000:c2:00.0", 0, 128),
                                 FakePartition("0000:c2:00.1", 1, 129)], mode="DPX")])
        ceiling.update({"amd-0": 1500.0, "amd-1": 1500.0})  # twice the 750 W limit
        clock = FakeClock()
        nvidia_reader = GpuReader(fake, clock)
        nvidia_reader.start()
        amd_reader = GpuReader(AmdSmiBackend(amd, clock), clock)
        amd_reader.start()
        reader = CombinedReader([nvidia_reader, amd_reader])
        client = PodResourcesClient(kubelet.socket_path, ("nvidia.com/*", "amd.com/*"),
                                    dra_drivers=(DRA_DRIVER,))
        slices = SliceStore()
        stage = GpuStage(reader, client, str(node.procfs), slices=slices,
                         sysfs=str(node.sysfs))
        sampler = Sampler(node_config(node, "--retention", "24h"), namer, clock=clock,
                          stages=[stage])
        sampler.sample()
        previous = _counters(sampler.snapshot())
        previous_gpu: dict[str, float] = {}
        stamp = 0
        for s in steps:
            kubelet.lister.allocations = [
                Allocation(HOLDERS[h][0], HOLDERS[h][1], HOLDERS[h][2],
                           "nvidia.com/mig-3g.20gb" if d.startswith("MIG")
                           else "amd.com/gpu" if d[0] in "0a" else "nvidia.com/gpu",
                           [d]) for h, d in s["allocations"]]
            kubelet.lister.dra = [
                DraAllocation(HOLDERS[h][0], HOLDERS[h][1], HOLDERS[h][2], f"claim-{claim}",
                              [(DRA_DRIVER, "node-a", device)])
                for h, device, claim in s["claims"]]
            slices.replace_all({"node-a-gpus": make_resource_slice(
                "node-a-gpus", [DRA_DEVICES[d] for d in sorted(s["published"])])})
            if s["kubelet_down"]:
                kubelet.lister.hang.set()
                client._timeout = 0.05
            stamp += 1000
            for gpu, g in zip(fake.gpus, s["gpus"], strict=True):
                gpu.energy_mj = g["mj"] if g["reset"] else gpu.energy_mj + g["mj"]
                gpu.energy_mj += g["jump_mj"]
                gpu.power_mw, gpu.utilisation_percent, gpu.lost = g["mw"], g["util"], g["lost"]
                gpu.samples = [ProcessSample(100 + i, sm, stamp)
                               for i, sm in enumerate(g["sm"]) if sm]
                gpu.compute_pids = [100 + i for i, sm in enumerate(g["sm"]) if sm]
            fake.gpus[2].instances = [
                MigInstance("MIG-a", 1, 3, "3g.20gb", (100,) if s["mig_pids"][0] else ()),
                MigInstance("MIG-b", 2, 4, "4g.20gb", (101,) if s["mig_pids"][1] else ())]
            for gpu, a in zip(amd.gpus, s["amd"], strict=True):
                counts = a["joules"] * AMD_J
                gpu.energy = (counts if a["counter"] == "reset"
                              else (gpu.energy + counts) % 2**64 if a["counter"] == "advance"
                              else (2**64 - 1 - gpu.energy % 2**32 + counts) % 2**64)
                gpu.lost = a["lost"]
                for part, gfx, ns in zip(gpu.partitions, a["gfx"], a["busy_ns"], strict=False):
                    part.gfx_activity = gfx
                    part.processes = {pid: used + ns for pid, used in part.processes.items()}
            node.add_node_cpu(idle_seconds=10)
            clock.advance(s["dt"])
            sampler.sample()
            kubelet.lister.hang.clear()
            kubelet.lister.release.set()
            kubelet.lister.release.clear()
            kubelet.lister.dra = []
            client._timeout = 2.0
            snap = sampler.snapshot()
            parts = _totals(snap).get("gpu", {})
            node_j = parts.get("node", 0.0)
            got = parts.get("containers", 0.0) + parts.get("unattributed", 0.0)
            assert abs(got - node_j) <= REL * max(node_j, 1.0), parts
            per_gpu = {g.uuid: g.energy_joules for g in stage.snapshot().gpus}
            assert sum(per_gpu.values()) == pytest.approx(node_j, rel=REL, abs=1e-6)
            current = _counters(snap)
            for key, value in previous.items():
                if key in current:
                    assert current[key] >= value, key
            for uuid, value in previous_gpu.items():
                assert per_gpu[uuid] >= value, uuid
                assert per_gpu[uuid] - value <= ceiling[uuid] * s["dt"] * (1 + REL), uuid
            previous, previous_gpu = current, per_gpu
