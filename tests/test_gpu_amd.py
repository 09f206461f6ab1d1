"""AMD GPUs through AmdSmiBackend over a stand-in amdsmi (tests/amdsmi_fake.py), in the real
GPU stage and sampler: hand-computed joules for exclusive, shared and partitioned GPUs, a
wrapping energy accumulator, a GPU lost and back; and the real PyPI amdsmi package on a
machine without ROCm."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from amdsmi_fake import FakeAmdGpu, FakeAmdSmi, FakePartition
from conftest import FakeClock, node_config
from kwatt.gpu_stage import GpuStage, build_gpu_stage
from kwatt.ledger import LedgerSnapshot
from kwatt.sampler import Sampler
from kwatt.sources.amdsmi import AmdSmiBackend, import_amdsmi
from kwatt.sources.gpu import GpuLibraryUnavailable, GpuReader
from kwatt.workloads.podresources import PodResourcesClient
from nvml_fake import FakeNvml
from podresources_server import Allocation, PodResourcesServer
from simnode import SimulatedNode, container_id, pod_uid
from test_gpu_stage import NamesNamer, assert_conserved, gpu_energy, run_process

BDF = "0000:c1:00.0"
J = 2_000_000  # accumulator counts per joule at 0.5 µJ per count


def _reader(gpus: list[FakeAmdGpu], clock: FakeClock) -> tuple[FakeAmdSmi, GpuReader]:
    library = FakeAmdSmi(gpus)
    reader = GpuReader(AmdSmiBackend(library, clock), clock)
    assert reader.start() == []
    return library, reader


def _step(node: SimulatedNode, clock: FakeClock, sampler: Sampler,
          seconds: float = 10.0) -> None:
    node.add_node_cpu(idle_seconds=seconds)
    clock.advance(seconds)
    sampler.sample()


def _amd(snap: LedgerSnapshot) -> float:
    return sum(j for c, s, j in snap.node_energy if c == "gpu" and s == "amdsmi")


def test_exclusive_gpu_held_through_the_device_plugin_pci_address(
        sim, clock: FakeClock, tmp_path: Path) -> None:
    node: SimulatedNode = sim()
    namer = NamesNamer()
    ctr = node.add_container(node.add_pod(pod_uid("train")), container_id("train"))
    namer.add(ctr, "ml", "train", "main")
    gpu = FakeAmdGpu("amd-uuid-0", [FakePartition(BDF)])
    _library, reader = _reader([gpu], clock)
    server = PodResourcesServer(str(tmp_path / "kubelet.sock")).start()
    try:
        server.lister.allocations = [Allocation("ml", "train", "main", "amd.com/gpu", [BDF])]
        client = PodResourcesClient(server.socket_path, ("amd.com/gpu",))
        stage = GpuStage(reader, client, str(node.procfs))
        sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
        sampler.sample()
        gpu.energy += 1000 * J  # 1000 J in 10 s
        _step(node, clock, sampler)
    finally:
        server.stop()
    snap = sampler.snapshot()
    containers, _unattributed, total = gpu_energy(snap)
    assert containers == {("ml", "train", "main"): pytest.approx(1000.0)}
    assert _amd(snap) == pytest.approx(1000.0) and total == pytest.approx(1000.0)
    (row,) = stage.snapshot().gpus
    assert (row.vendor, row.model, row.power_watts) == ("amd", "AMD Instinct MI300X",
                                                        pytest.approx(100.0))
    assert dict(snap.source_up)["amdsmi"] is True


def test_shared_gpu_split_by_each_process_gfx_time(sim, clock: FakeClock) -> None:
    """Host mode: two containers' processes on one GPU at 50 % GFX activity; over 10 s
    process A used 3 s of GFX time, B 1 s. 1000 J: active 500 J split 3:1 (375 / 125),
    idle 500 J evenly (250 / 250): A 625 J, B 375 J."""
    node: SimulatedNode = sim()
    namer = NamesNamer()
    a = node.add_container(node.add_pod(pod_uid("a")), container_id("a"))
    b = node.add_container(node.add_pod(pod_uid("b")), container_id("b"))
    namer.add(a, "ml", "a", "main")
    namer.add(b, "ml", "b", "main")
    run_process(node, 11, a.path)
    run_process(node, 22, b.path)
    part = FakePartition(BDF, gfx_activity=50, processes={11: 0, 22: 0})
    gpu = FakeAmdGpu("amd-uuid-0", [part])
    _library, reader = _reader([gpu], clock)
    stage = GpuStage(reader, None, str(node.procfs))
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
    sampler.sample()
    gpu.energy += 1000 * J
    part.processes = {11: 3_000_000_000, 22: 1_000_000_000}
    _step(node, clock, sampler)
    containers, unattributed, _ = gpu_energy(sampler.snapshot())
    assert containers == {("ml", "a", "main"): pytest.approx(625.0),
                          ("ml", "b", "main"): pytest.approx(375.0)}
    assert sum(unattributed.values()) == 0


def test_partitioned_gpu_split_by_partition_activity(sim, clock: FakeClock,
                                                     tmp_path: Path) -> None:
    """MI300 in DPX mode, two partitions: the primary (its PCI address) held by A and
    busy (100 % GFX), the second (amdgpu_xcp_1, renderD129) held by B and idle. 700 J:
    active 700 x 1/2 = 350 J to A, idle 350 J split 1:1: A 525 J, B 175 J."""
    node: SimulatedNode = sim()
    (node.sysfs / "devices/platform/amdgpu_xcp_1/drm/renderD129").mkdir(parents=True)
    (node.sysfs / "devices/platform/amdgpu_xcp_1/drm/card1").mkdir(parents=True)
    namer = NamesNamer()
    a = node.add_container(node.add_pod(pod_uid("a")), container_id("a"))
    b = node.add_container(node.add_pod(pod_uid("b")), container_id("b"))
    namer.add(a, "ml", "a", "main")
    namer.add(b, "ml", "b", "main")
    primary = FakePartition(BDF, 0, 128, gfx_activity=100)
    second = FakePartition("0000:c1:00.1", 1, 129, gfx_activity=0)
    gpu = FakeAmdGpu("amd-uuid-0", [primary, second], mode="DPX")
    _library, reader = _reader([gpu], clock)
    server = PodResourcesServer(str(tmp_path / "kubelet.sock")).start()
    try:
        server.lister.allocations = [
            Allocation("ml", "a", "main", "amd.com/dpx_nps1", [BDF]),
            Allocation("ml", "b", "main", "amd.com/dpx_nps1", ["amdgpu_xcp_1"])]
        client = PodResourcesClient(server.socket_path, ("amd.com/?px_nps*",))
        stage = GpuStage(reader, client, str(node.procfs), sysfs=str(node.sysfs))
        sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
        sampler.sample()
        gpu.energy += 700 * J
        _step(node, clock, sampler)
    finally:
        server.stop()
    snap = sampler.snapshot()
    containers, unattributed, total = gpu_energy(snap)
    assert containers == {("ml", "a", "main"): pytest.approx(525.0),
                          ("ml", "b", "main"): pytest.approx(175.0)}
    assert sum(unattributed.values()) == 0 and total == pytest.approx(700.0)
    assert [r.mig for r in stage.snapshot().gpus] == [True]
    assert {(r.namespace, r.pod, r.resource) for r in stage.snapshot().allocations} == {
        ("ml", "a", "amd.com/dpx_nps1"), ("ml", "b", "amd.com/dpx_nps1")}


def test_energy_accumulator_wrap_is_booked_once(clock: FakeClock) -> None:
    gpu = FakeAmdGpu("amd-uuid-0", [FakePartition(BDF)], energy=2**64 - 400 * J)
    _library, reader = _reader([gpu], clock)
    reader.read(want_pids=False)
    gpu.energy = 600 * J  # wrapped past 2**64: 400 J + 600 J
    clock.advance(10.0)
    cycle = reader.read(want_pids=False)
    assert cycle.faults == ()
    assert cycle.gpus[0].joules == pytest.approx(1000.0)


def test_accumulator_going_back_without_a_wrap_books_nothing(clock: FakeClock) -> None:
    gpu = FakeAmdGpu("amd-uuid-0", [FakePartition(BDF)], energy=5000 * J)
    _library, reader = _reader([gpu], clock)
    reader.read(want_pids=False)
    gpu.energy = 10 * J  # driver reload: a "wrap" of ~2**64 counts, far above the ceiling
    clock.advance(10.0)
    cycle = reader.read(want_pids=False)
    assert cycle.gpus[0].joules is None
    assert [(f.source, f.reason) for f in cycle.faults] == [("amdsmi", "implausible")]


def test_gpu_lost_and_back(clock: FakeClock) -> None:
    gpus = [FakeAmdGpu("amd-0", [FakePartition(BDF)]),
            FakeAmdGpu("amd-1", [FakePartition("0000:c2:00.0")])]
    _library, reader = _reader(gpus, clock)
    reader.read(want_pids=False)
    gpus[1].lost = True
    for gpu in gpus:
        gpu.energy += 100 * J
    clock.advance(1.0)
    cycle = reader.read(want_pids=False)
    assert [g.up for g in cycle.gpus] == [True, False]
    assert {(f.source, f.reason, f.subject) for f in cycle.faults} == {
        ("amdsmi", "absent", "amd-1")}
    gpus[1].lost = False
    gpus[1].energy += 500 * J  # spent while lost: not booked (nobody knows who held it)
    clock.advance(1.0)
    back = reader.read(want_pids=False)  # rediscovered, re-baselined
    assert [g.up for g in back.gpus] == [True, True] and back.gpus[1].joules is None
    for gpu in gpus:
        gpu.energy += 100 * J
    clock.advance(1.0)
    assert [g.joules for g in reader.read(want_pids=False).gpus] == [
        pytest.approx(100.0), pytest.approx(100.0)]


def test_nvidia_and_amd_together_each_under_its_own_source(sim, clock: FakeClock) -> None:
    from nvml_fake import FakeGpu

    node: SimulatedNode = sim()
    nvidia = FakeNvml([FakeGpu("GPU-0", energy_mj=1)])
    amd = FakeAmdSmi([FakeAmdGpu("amd-uuid-0", [FakePartition(BDF)])])
    built = build_gpu_stage(node_config(node, "--gpu", "on", "--once"), lambda: nvidia,
                            clock, amd_backend_factory=lambda: AmdSmiBackend(amd, clock))
    assert built is not None
    stage, _render = built
    sampler = Sampler(node_config(node), NamesNamer(), clock=clock, stages=[stage])
    sampler.sample()
    nvidia.gpus[0].energy_mj += 300_000
    amd.gpus[0].energy += 500 * J
    _step(node, clock, sampler)
    snap = sampler.snapshot()
    assert {(c, s): j for c, s, j in snap.node_energy if c == "gpu"} == {
        ("gpu", "nvml"): pytest.approx(300.0), ("gpu", "amdsmi"): pytest.approx(500.0)}
    assert {r.vendor for r in stage.snapshot().gpus} == {"nvidia", "amd"}
    assert dict(snap.source_up)["nvml"] and dict(snap.source_up)["amdsmi"]
    assert_conserved(snap)
    assert math.fsum(r.energy_joules for r in stage.snapshot().gpus) == pytest.approx(800.0)


ROCM = any(os.path.exists(os.path.join(d, "libamd_smi.so"))
           for d in (os.environ.get("ROCM_PATH", "/opt/rocm") + "/lib",))


@pytest.mark.skipif(ROCM, reason="ROCm is installed here: amdsmi loads for real")
def test_real_amdsmi_package_without_rocm_means_no_amd_library(sim) -> None:
    # The premise: the PyPI package itself raises KeyError, not ImportError.
    done = subprocess.run([sys.executable, "-c", "import amdsmi"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "KeyError: 'libamd_smi.so'" in done.stderr
    with pytest.raises(GpuLibraryUnavailable, match="KeyError"):
        import_amdsmi()
    node: SimulatedNode = sim()
    # --gpu auto with no NVIDIA library either: no GPU stage, no crash.
    assert build_gpu_stage(node_config(node, "--gpu", "auto"),
                           lambda: FakeNvml([], available=False)) is None
