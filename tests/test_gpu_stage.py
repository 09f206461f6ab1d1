"""The GPU stage in the sampler on a simulated node, with the fake NVML backend and a real
PodResources gRPC server: hand-computed joules, conservation, metrics, --gpu modes."""

from __future__ import annotations

import logging
import math
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FakeClock, node_config
from kwatt.gpu_metrics import GpuCollector
from kwatt.gpu_stage import (
    INVISIBLE,
    GpuStage,
    GpuUnavailable,
    build_gpu_stage,
    identity_of_pid,
)
from kwatt.ledger import LedgerSnapshot, WorkloadLabels
from kwatt.sampler import Sampler
from kwatt.sources.nvml import GpuReader, MigInstance, ProcessSample, load_backend
from kwatt.workloads.cgroups import CgroupIdentity, identify_cgroup_path
from kwatt.workloads.naming import HostNamer
from kwatt.workloads.podresources import PodResourcesClient
from nvml_fake import FakeGpu, FakeNvml
from podresources_server import Allocation, PodResourcesServer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from simnode import SimContainer, SimulatedNode, container_id, pod_uid

PATTERNS = ("nvidia.com/gpu", "nvidia.com/mig-*")


class NamesNamer:
    """Names known containers like the Kubernetes namer would; the rest stay unnamed."""

    def __init__(self) -> None:
        self.names: dict[CgroupIdentity, WorkloadLabels] = {}

    def add(self, container: SimContainer, namespace: str, pod: str, name: str) -> None:
        identity = identify_cgroup_path(container.path)
        assert identity is not None
        self.names[identity] = WorkloadLabels(namespace, pod, name, pod, "Pod")

    def name(self, identity: CgroupIdentity) -> WorkloadLabels | None:
        return self.names.get(identity)

    def cpu_request(self, identity: CgroupIdentity) -> float:
        return 0.0


def run_process(node: SimulatedNode, pid: int, cgroup_path: str) -> None:
    directory = node.procfs / str(pid)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "cgroup").write_text(f"0::{cgroup_path}\n")


def gpu_energy(snap: LedgerSnapshot) -> tuple[dict[tuple[str, str, str], float],
                                              dict[str, float], float]:
    containers = {(r.labels.namespace, r.labels.pod, r.labels.container): dict(r.energy)["gpu"]
                  for r in snap.containers if "gpu" in dict(r.energy)}
    unattributed = {reason: j for c, reason, j in snap.unattributed if c == "gpu"}
    node = sum(j for c, _, j in snap.node_energy if c == "gpu")
    return containers, unattributed, node


def assert_conserved(snap: LedgerSnapshot) -> None:
    containers, unattributed, node = gpu_energy(snap)
    assert math.fsum([*containers.values(), *unattributed.values()]) == pytest.approx(
        node, rel=1e-9)


@pytest.fixture
def kubelet(tmp_path: Path) -> Iterator[PodResourcesServer]:
    server = PodResourcesServer(str(tmp_path / "kubelet.sock")).start()
    yield server
    server.stop()


def _cluster(node: SimulatedNode, namer: NamesNamer) -> dict[str, SimContainer]:
    out = {}
    for key, (namespace, pod, name) in {
            "trainer": ("ml", "train-0", "trainer"), "infer-a": ("ml", "infer-a", "server"),
            "infer-b": ("ml", "infer-b", "server"), "nb": ("lab", "nb", "jupyter"),
            "job": ("lab", "job", "main")}.items():
        sim_pod = node.add_pod(pod_uid(pod), "burstable", "containerd")
        container = node.add_container(sim_pod, container_id(key))
        namer.add(container, namespace, pod, name)
        out[key] = container
    return out


def _fake_gpus() -> list[FakeGpu]:
    return [
        FakeGpu("GPU-0", utilisation_percent=90),
        FakeGpu("GPU-1", utilisation_percent=50),
        FakeGpu("GPU-2", model="NVIDIA A100-SXM4-40GB", mig_enabled=True, instances=[
            MigInstance("MIG-a", 1, 3, "3g.20gb", (301,)),
            MigInstance("MIG-b", 2, 4, "4g.20gb", ())]),
        FakeGpu("GPU-3", model="Tesla T4", has_energy_counter=False, power_mw=100_000),
    ]


def test_kubernetes_scenarios_exact_joules(sim, clock: FakeClock,
                                           kubelet: PodResourcesServer) -> None:
    node: SimulatedNode = sim()
    namer = NamesNamer()
    c = _cluster(node, namer)
    run_process(node, 101, c["infer-a"].path)
    run_process(node, 202, c["infer-b"].path)
    run_process(node, 301, c["nb"].path)
    kubelet.lister.allocations = [
        Allocation("ml", "train-0", "trainer", "nvidia.com/gpu", ["GPU-0"]),
        Allocation("ml", "infer-a", "server", "nvidia.com/gpu", ["GPU-1::0"]),
        Allocation("ml", "infer-b", "server", "nvidia.com/gpu", ["GPU-1::1", "GPU-1::2"]),
        Allocation("lab", "nb", "jupyter", "nvidia.com/mig-3g.20gb", ["MIG-a"]),
        Allocation("lab", "job", "main", "nvidia.com/mig-4g.20gb", ["MIG-b"]),
    ]
    fake = FakeNvml(_fake_gpus())
    reader = GpuReader(fake, clock)
    reader.start()
    stage = GpuStage(reader, PodResourcesClient(kubelet.socket_path, PATTERNS),
                     str(node.procfs))
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
    sampler.sample()

    def interval(stamp: int) -> None:
        g0, g1, g2, _g3 = fake.gpus
        g0.energy_mj += 1_000_000
        g1.energy_mj += 1_000_000
        g1.samples = [ProcessSample(101, 75, stamp), ProcessSample(202, 25, stamp)]
        g2.energy_mj += 700_000
        node.add_node_cpu(idle_seconds=40)
        clock.advance(10)
        sampler.sample()

    interval(1_000)
    snap = sampler.snapshot()
    containers, unattributed, total = gpu_energy(snap)
    assert total == pytest.approx(1000 + 1000 + 700 + 1000)
    assert containers == pytest.approx({
        ("ml", "train-0", "trainer"): 1000.0,  # exclusive: idle included
        ("ml", "infer-a", "server"): 625.0,  # 500 active * 75 % + 500 idle / 2
        ("ml", "infer-b", "server"): 375.0,  # 500 active * 25 % + 500 idle / 2
        ("lab", "nb", "jupyter"): 300 + 400 * 3 / 7,  # MIG 3g busy, idle by slices
        ("lab", "job", "main"): 400 * 4 / 7,  # MIG 4g idle
    })
    assert unattributed == pytest.approx({"unallocated": 1000.0, "idle": 0.0, "system": 0.0})
    assert_conserved(snap)
    assert dict(snap.source_up)["nvml"] and dict(snap.source_up)["podresources"]

    # GPU-0 is lost for one interval, then back: nothing booked for the outage, others go on.
    fake.gpus[0].lost = True
    interval(2_000)
    containers, unattributed, _ = gpu_energy(sampler.snapshot())
    assert containers[("ml", "train-0", "trainer")] == pytest.approx(1000.0)
    assert containers[("ml", "infer-a", "server")] == pytest.approx(1250.0)
    assert not dict(sampler.snapshot().source_up)["nvml"]
    errors = {(s, r): n for s, r, n in sampler.snapshot().source_errors}
    assert errors[("nvml", "absent")] == 1
    fake.gpus[0].lost = False
    interval(3_000)  # back: re-baselined
    interval(4_000)  # counted again
    snap = sampler.snapshot()
    containers, unattributed, total = gpu_energy(snap)
    assert containers[("ml", "train-0", "trainer")] == pytest.approx(2000.0)
    assert containers[("ml", "infer-a", "server")] == pytest.approx(4 * 625.0)
    assert unattributed["unallocated"] == pytest.approx(4000.0)
    assert total == pytest.approx(4 * 3700 - 2000)
    assert_conserved(snap)

    # Metrics: per-GPU counters, info and allocations, every series with node.
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GpuCollector(stage.snapshot, "sim"))
    families = {f.name: f for f in text_string_to_metric_families(
        generate_latest(registry).decode())}
    energy = {s.labels["uuid"]: s.value for s in families["kwatt_gpu_energy_joules"].samples
              if s.name.endswith("_total")}
    assert energy == pytest.approx({"GPU-0": 2000.0, "GPU-1": 4000.0, "GPU-2": 2800.0,
                                    "GPU-3": 4000.0})
    power = {s.labels["gpu"]: s.value for s in families["kwatt_gpu_power_watts"].samples}
    assert power == pytest.approx({"0": 100.0, "1": 100.0, "2": 70.0, "3": 100.0})
    util = {s.labels["gpu"]: s.value for s in families["kwatt_gpu_utilization_ratio"].samples}
    assert util == pytest.approx({"0": 0.9, "1": 0.5, "3": 0.0})
    info = {s.labels["uuid"]: s.labels for s in families["kwatt_gpu_info"].samples}
    assert info["GPU-2"]["mig"] == "true" and info["GPU-3"]["model"] == "Tesla T4"
    assert info["GPU-0"]["driver_version"] == "550.54.15"
    allocations = {(s.labels["gpu"], s.labels["pod"], s.labels["resource"])
                   for s in families["kwatt_gpu_allocation_info"].samples}
    assert allocations == {("0", "train-0", "nvidia.com/gpu"), ("1", "infer-a", "nvidia.com/gpu"),
                           ("1", "infer-b", "nvidia.com/gpu"),
                           ("2", "nb", "nvidia.com/mig-3g.20gb"),
                           ("2", "job", "nvidia.com/mig-4g.20gb")}
    for family in families.values():
        for sample in family.samples:
            assert sample.labels["node"] == "sim"


def test_gke_nvidia_n_names_and_unidentified_holder(sim, clock: FakeClock,
                                                    kubelet: PodResourcesServer) -> None:
    node: SimulatedNode = sim()
    namer = NamesNamer()
    c = _cluster(node, namer)
    kubelet.lister.allocations = [
        Allocation("ml", "train-0", "trainer", "nvidia.com/gpu", ["nvidia1"]),
        Allocation("ml", "ghost", "c", "nvidia.com/gpu", ["nvidia0"]),  # not on this node yet
        Allocation("ml", "infer-a", "server", "nvidia.com/gpu", ["nvidia0"]),
    ]
    del c
    fake = FakeNvml([FakeGpu("GPU-0"), FakeGpu("GPU-1")])
    reader = GpuReader(fake, clock)
    reader.start()
    stage = GpuStage(reader, PodResourcesClient(kubelet.socket_path, PATTERNS),
                     str(node.procfs))
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
    sampler.sample()
    for gpu in fake.gpus:
        gpu.energy_mj += 400_000
    node.add_node_cpu(idle_seconds=40)
    clock.advance(10)
    sampler.sample()
    containers, unattributed, _ = gpu_energy(sampler.snapshot())
    assert containers == pytest.approx({("ml", "train-0", "trainer"): 400.0,
                                        ("ml", "infer-a", "server"): 200.0})
    assert unattributed["unidentified"] == pytest.approx(200.0)
    assert_conserved(sampler.snapshot())


def test_host_mode_holders_from_nvml_processes(sim, clock: FakeClock) -> None:
    node: SimulatedNode = sim()
    namer = NamesNamer()
    c = _cluster(node, namer)
    run_process(node, 11, c["trainer"].path)
    run_process(node, 21, c["infer-a"].path)
    run_process(node, 22, c["infer-b"].path)
    run_process(node, 23, "/user.slice/user-1000.slice/session-3.scope")  # no workload
    fake = FakeNvml([FakeGpu("GPU-0", compute_pids=[11]),
                     FakeGpu("GPU-1", compute_pids=[21, 22, 23], utilisation_percent=100),
                     FakeGpu("GPU-2")])
    reader = GpuReader(fake, clock)
    reader.start()
    stage = GpuStage(reader, None, str(node.procfs))
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
    sampler.sample()
    for gpu in fake.gpus:
        gpu.energy_mj += 900_000
    fake.gpus[1].samples = [ProcessSample(21, 40, 10), ProcessSample(22, 40, 10),
                            ProcessSample(23, 10, 10)]
    node.add_node_cpu(idle_seconds=40)
    clock.advance(10)
    sampler.sample()
    snap = sampler.snapshot()
    containers, unattributed, _ = gpu_energy(snap)
    # GPU-1 at 100 %: all 900 J active, split 40:40:10 (the session process is system).
    assert containers == pytest.approx({("ml", "train-0", "trainer"): 900.0,
                                        ("ml", "infer-a", "server"): 400.0,
                                        ("ml", "infer-b", "server"): 400.0})
    assert unattributed == pytest.approx({"system": 100.0, "unallocated": 900.0, "idle": 0.0})
    assert_conserved(snap)
    assert "podresources" not in dict(snap.source_up)


def test_missing_socket_falls_back_to_process_list(sim, clock: FakeClock, tmp_path: Path,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    node: SimulatedNode = sim()
    namer = NamesNamer()
    c = _cluster(node, namer)
    run_process(node, 11, c["trainer"].path)
    fake = FakeNvml([FakeGpu("GPU-0", compute_pids=[11])])
    reader = GpuReader(fake, clock)
    reader.start()
    client = PodResourcesClient(str(tmp_path / "absent.sock"), PATTERNS)
    stage = GpuStage(reader, client, str(node.procfs))
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
    caplog.set_level(logging.INFO)
    for _ in range(3):
        fake.gpus[0].energy_mj += 100_000
        node.add_node_cpu(idle_seconds=40)
        clock.advance(10)
        sampler.sample()
    snap = sampler.snapshot()
    containers, _, _ = gpu_energy(snap)
    assert containers == pytest.approx({("ml", "train-0", "trainer"): 200.0})
    assert dict(snap.source_up)["podresources"] is False
    assert {(s, r): n for s, r, n in snap.source_errors}[("podresources", "absent")] == 3
    fallback = [r for r in caplog.records if "PodResources unavailable" in r.getMessage()]
    assert len(fallback) == 1, "the fallback must be logged once, not every cycle"


def test_identity_of_pid_cgroup_v1_and_v2(tmp_path: Path) -> None:
    uid = pod_uid("x")
    cid = container_id("x")
    path = (f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod"
            f"{uid.replace('-', '_')}.slice/cri-containerd-{cid}.scope")
    (tmp_path / "1").mkdir()
    (tmp_path / "1" / "cgroup").write_text(f"0::{path}\n")
    (tmp_path / "2").mkdir()
    (tmp_path / "2" / "cgroup").write_text(
        f"12:memory:{path}\n11:cpu,cpuacct:{path}\n1:name=systemd:{path}\n0::/\n")
    expected = CgroupIdentity("container", uid, cid, "containerd", "burstable")
    assert identity_of_pid(str(tmp_path), 1) == expected
    assert identity_of_pid(str(tmp_path), 2) == expected
    assert identity_of_pid(str(tmp_path), 3) == INVISIBLE
    (tmp_path / "4").mkdir()
    (tmp_path / "4" / "cgroup").write_text("0::/user.slice/user-1000.slice/session-2.scope\n")
    assert identity_of_pid(str(tmp_path), 4) is None


def test_build_gpu_stage_modes(sim, caplog: pytest.LogCaptureFixture) -> None:
    node: SimulatedNode = sim()
    assert build_gpu_stage(node_config(node, "--gpu", "off")) is None
    unavailable = lambda: FakeNvml([], available=False)  # noqa: E731
    with pytest.raises(GpuUnavailable, match="--gpu on: no GPU library lists a GPU"):
        build_gpu_stage(node_config(node, "--gpu", "on"), unavailable)
    with pytest.raises(GpuUnavailable, match="no GPU"):
        build_gpu_stage(node_config(node, "--gpu", "on"), lambda: FakeNvml([]))
    caplog.set_level(logging.INFO)
    assert build_gpu_stage(node_config(node, "--gpu", "auto"), unavailable) is None
    assert [r.getMessage() for r in caplog.records if r.name == "kwatt.gpu"] == [
        "GPU energy not measured: no GPU library (--gpu auto)"]
    built = build_gpu_stage(node_config(node, "--gpu", "on"),
                            lambda: FakeNvml([FakeGpu("GPU-0")]))
    assert built is not None


def test_cli_gpu_on_without_nvml_exits_2(sim) -> None:
    node: SimulatedNode = sim()
    done = subprocess.run(
        [sys.executable, "-m", "kwatt", "--gpu", "on", "--kubernetes", "off", "--once",
         "--path.sysfs", str(node.sysfs), "--path.procfs", str(node.procfs)],
        capture_output=True, text=True, timeout=60)
    if load_backend()[0] is not None:  # a machine with a working NVIDIA driver
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert lines[-1].startswith("kwatt-exporter: --gpu on: no GPU library lists a GPU (NVML:")
    assert len([ln for ln in lines if ln.startswith("kwatt-exporter:")]) == 1


def test_holder_unknown_by_name_is_found_by_its_process(sim, clock: FakeClock,
                                                        kubelet: PodResourcesServer) -> None:
    # HostNamer knows pods only by UID, so (namespace, pod, container) from the kubelet
    # matches nothing; the one container running on the GPU is its holder.
    node: SimulatedNode = sim()
    c = _cluster(node, NamesNamer())
    run_process(node, 11, c["trainer"].path)
    run_process(node, 12, c["nb"].path)
    kubelet.lister.allocations = [
        Allocation("ml", "train-0", "trainer", "nvidia.com/gpu", ["GPU-0"]),
        Allocation("lab", "nb", "jupyter", "nvidia.com/gpu", ["GPU-1::0"]),
        Allocation("lab", "job", "main", "nvidia.com/gpu", ["GPU-1::1"]),
    ]
    fake = FakeNvml([FakeGpu("GPU-0", compute_pids=[11]), FakeGpu("GPU-1", compute_pids=[12])])
    reader = GpuReader(fake, clock)
    reader.start()
    stage = GpuStage(reader, PodResourcesClient(kubelet.socket_path, PATTERNS),
                     str(node.procfs))
    sampler = Sampler(node_config(node), HostNamer(), clock=clock, stages=[stage])
    sampler.sample()
    for gpu in fake.gpus:
        gpu.energy_mj += 500_000
    node.add_node_cpu(idle_seconds=40)
    clock.advance(10)
    sampler.sample()
    containers, unattributed, _ = gpu_energy(sampler.snapshot())
    trainer = ("", c["trainer"].pod.uid, c["trainer"].container_id[:12])
    nb = ("", c["nb"].pod.uid, c["nb"].container_id[:12])
    # GPU-1 has two unmatched holders: not guessed, split evenly and kept unidentified.
    assert containers == pytest.approx({trainer: 500.0})
    assert unattributed["unidentified"] == pytest.approx(500.0)
    assert nb not in containers
    assert_conserved(sampler.snapshot())


def test_invisible_processes_make_a_shared_gpu_split_evenly(sim, clock: FakeClock,
                                                            kubelet: PodResourcesServer) -> None:
    # Without hostPID the exporter cannot read /proc/<pid>/cgroup of GPU processes.
    node: SimulatedNode = sim()
    namer = NamesNamer()
    _cluster(node, namer)
    kubelet.lister.allocations = [
        Allocation("ml", "infer-a", "server", "nvidia.com/gpu", ["GPU-0::0"]),
        Allocation("ml", "infer-b", "server", "nvidia.com/gpu", ["GPU-0::1"])]
    fake = FakeNvml([FakeGpu("GPU-0", utilisation_percent=100)])
    reader = GpuReader(fake, clock)
    reader.start()
    stage = GpuStage(reader, PodResourcesClient(kubelet.socket_path, PATTERNS),
                     str(node.procfs))
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
    sampler.sample()
    fake.gpus[0].energy_mj += 800_000
    fake.gpus[0].samples = [ProcessSample(4242, 90, 5)]
    node.add_node_cpu(idle_seconds=40)
    clock.advance(10)
    sampler.sample()
    containers, unattributed, _ = gpu_energy(sampler.snapshot())
    assert containers == pytest.approx({("ml", "infer-a", "server"): 400.0,
                                        ("ml", "infer-b", "server"): 400.0})
    assert unattributed.get("system", 0.0) == 0.0


def test_gpu_power_is_right_when_the_kubelet_answers_slowly(sim, clock: FakeClock,
                                                            kubelet: PodResourcesServer) -> None:
    """The stage reads NVML after PodResources answered. A kubelet that takes 0.5 s of a
    1 s interval on every other cycle made power +50% / -50% when readings were stamped
    with the cycle's start; each reading's own time keeps it within a few percent."""
    node: SimulatedNode = sim()
    namer = NamesNamer()
    c = _cluster(node, namer)
    kubelet.lister.allocations = [
        Allocation("ml", "train-0", "trainer", "nvidia.com/gpu", ["GPU-0"])]
    watts = 300.0

    class SteadyGpu(FakeNvml):
        """Draws a steady 300 W: its counter is a function of (fake) time."""

        def total_energy_mj(self, uuid: str) -> int:
            super().total_energy_mj(uuid)
            return round(watts * clock.now * 1000)

    slow = [False]

    def answer() -> None:
        if slow[0]:
            clock.advance(0.5)

    kubelet.lister.on_list = answer
    reader = GpuReader(SteadyGpu([FakeGpu("GPU-0", utilisation_percent=90)]), clock)
    reader.start()
    stage = GpuStage(reader, PodResourcesClient(kubelet.socket_path, PATTERNS),
                     str(node.procfs))
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
    sampler.sample()
    for cycle in range(6):
        slow[0] = cycle % 2 == 0
        node.add_cpu(c["trainer"].path, 0.5)
        node.add_node_cpu(idle_seconds=3)
        clock.advance(1.0)
        report = sampler.sample()
        (gpu,) = stage.snapshot().gpus
        assert gpu.power_watts == pytest.approx(watts, rel=0.02), cycle
        assert report.node_watts[("gpu", "nvml")] == pytest.approx(watts, rel=0.02), cycle
        node_power = {(comp, src): w for comp, src, w in sampler.snapshot().node_power}
        assert node_power[("gpu", "nvml")] == pytest.approx(watts, rel=0.02), cycle


def test_undecodable_proc_cgroup_affects_only_that_pid(sim, clock: FakeClock) -> None:
    """A /proc/<pid>/cgroup that is not UTF-8 used to raise out of every sampler cycle."""
    node: SimulatedNode = sim()
    namer = NamesNamer()
    c = _cluster(node, namer)
    run_process(node, 101, c["trainer"].path)
    bad = node.procfs / "102"
    bad.mkdir()
    (bad / "cgroup").write_bytes(b"0::/system.slice/caf\xe9-\xff.service\n1:name=\xc3(:/x\n")
    assert identity_of_pid(str(node.procfs), 102) == identify_cgroup_path(
        "/system.slice/caf\ufffd-\ufffd.service")
    fake = FakeNvml([FakeGpu("GPU-0", utilisation_percent=90, compute_pids=[101, 102])])
    reader = GpuReader(fake, clock)
    reader.start()
    stage = GpuStage(reader, None, str(node.procfs))
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
    sampler.sample()
    fake.gpus[0].energy_mj += 1_000_000
    fake.gpus[0].samples = [ProcessSample(101, 60, 1), ProcessSample(102, 20, 1)]
    node.add_node_cpu(idle_seconds=40)
    clock.advance(10)
    sampler.sample()
    containers, unattributed, total = gpu_energy(sampler.snapshot())
    assert total == pytest.approx(1000.0)
    # Both processes were placed: the unit with the odd name got its share. It has no
    # cgroup on this simulated node, so its account expired into namespace "".
    snap = sampler.snapshot()
    unit_joules = dict(((n, c), j) for n, c, j in snap.namespace_energy)[("", "gpu")]
    trainer = containers[("ml", "train-0", "trainer")]
    assert 0 < unit_joules < trainer
    assert trainer + unit_joules + sum(unattributed.values()) == pytest.approx(total)
