"""GPUs handed out by Dynamic Resource Allocation: the kubelet's ``dynamic_resources`` over
real gRPC, this node's ResourceSlices in NVIDIA's DRA driver layout from a fake API server
(list, watch, changes, faults), and the split with hand-computed joules."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import pytest
from conftest import FakeClock, node_config
from fake_kube_api import (
    DRA_DRIVER,
    FakeKubeApi,
    make_resource_slice,
    nvidia_dynamic_mig_device,
    nvidia_gpu_device,
    nvidia_mig_device,
    write_kubeconfig,
)
from kubetest import FAST, NODE, kube_config, wait_until
from kwatt.gpu_attribution import GpuInterval, Unattributed, gpu_shares
from kwatt.gpu_metrics import GpuCollector
from kwatt.gpu_stage import GpuStage
from kwatt.sampler import Sampler
from kwatt.sources.nvml import GpuReader, MigInstance, ProcessSample
from kwatt.workloads.kubernetes import build_kubernetes
from kwatt.workloads.podresources import ClaimAllocation, PodResourcesClient
from kwatt.workloads.resourceslices import SliceStore
from nvml_fake import FakeGpu, FakeNvml
from podresources_server import Allocation, DraAllocation, PodResourcesServer
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from simnode import SimulatedNode, container_id, pod_uid
from test_gpu_stage import NamesNamer, assert_conserved, gpu_energy, run_process

PATTERNS = ("nvidia.com/gpu", "nvidia.com/mig-*")


def _slices() -> list[dict[str, object]]:
    return [make_resource_slice("node-a-gpu.nvidia.com-abc12", [
        nvidia_gpu_device(0, "GPU-0"), nvidia_gpu_device(1, "GPU-1"),
        nvidia_mig_device(2, "GPU-2", "MIG-a", "3g.20gb", 9, 0, 4),
        nvidia_mig_device(2, "GPU-2", "MIG-b", "4g.20gb", 5, 4, 4),
        nvidia_gpu_device(4, "GPU-4")])]


def _store(slices: list[dict[str, object]]) -> SliceStore:
    store = SliceStore()
    store.replace_all({s["metadata"]["name"]: s for s in slices})  # type: ignore[index]
    return store


def test_podresources_client_reads_dynamic_resources(tmp_path: Path) -> None:
    server = PodResourcesServer(str(tmp_path / "kubelet.sock")).start()
    try:
        server.lister.allocations = [Allocation("ml", "a", "c", "nvidia.com/gpu", ["GPU-9"])]
        server.lister.dra = [
            DraAllocation("ml", "a", "c", "a-gpu-x7k", [(DRA_DRIVER, NODE, "gpu-0"),
                                                       (DRA_DRIVER, NODE, "gpu-1")]),
            # Not a GPU driver: left out.
            DraAllocation("ml", "a", "c", "a-nic", [("net.example.com", NODE, "eth1")]),
            DraAllocation("ml", "b", "main", "shared", [(DRA_DRIVER, NODE, "gpu-1")],
                          claim_namespace="infra")]
        client = PodResourcesClient(server.socket_path, PATTERNS, dra_drivers=(DRA_DRIVER,))
        listed = client.list()
        client.close()
    finally:
        server.stop()
    assert listed.fault is None and listed.allocations is not None
    assert [a.device_id for a in listed.allocations] == ["GPU-9"]
    assert listed.claims == (
        ClaimAllocation("ml", "a", "c", "ml", "a-gpu-x7k", DRA_DRIVER, NODE, "gpu-0"),
        ClaimAllocation("ml", "a", "c", "ml", "a-gpu-x7k", DRA_DRIVER, NODE, "gpu-1"),
        ClaimAllocation("ml", "b", "main", "infra", "shared", DRA_DRIVER, NODE, "gpu-1"))


def test_slice_store_reads_the_nvidia_driver_layout() -> None:
    store = _store(_slices())
    gpu = store.lookup(DRA_DRIVER, NODE, "gpu-1")
    assert gpu is not None and (gpu.uuid, gpu.kind, gpu.parent_uuid) == ("GPU-1", "gpu", "")
    mig = store.lookup(DRA_DRIVER, NODE, "gpu-2-mig-9-0-4")
    assert mig is not None and (mig.uuid, mig.kind, mig.parent_uuid) == \
        ("MIG-a", "mig", "GPU-2")
    assert store.lookup(DRA_DRIVER, "node-b", "gpu-1") is None  # pool matters
    assert store.lookup("other.example.com", NODE, "gpu-1") is None  # driver matters

    # Attributes qualified with the driver's domain, the v1beta1 "basic" wrapper, a newer
    # pool generation replacing an older slice, and a malformed slice.
    qualified = make_resource_slice("q", [{"name": "gpu-7", "attributes": {
        f"{DRA_DRIVER}/uuid": {"string": "GPU-7"}, f"{DRA_DRIVER}/type": {"string": "gpu"}}}],
        pool="p2")
    basic = make_resource_slice("b", [{"name": "gpu-8", "basic": {"attributes": {
        "uuid": {"string": "GPU-8"}}}}], pool="p3")
    old = make_resource_slice("old", [nvidia_gpu_device(5, "GPU-old")], pool="p4")
    new = make_resource_slice("new", [nvidia_gpu_device(5, "GPU-new")], pool="p4",
                              generation=2)
    store.replace_all({"q": qualified, "b": basic, "old": old, "new": new,
                       "bad": {"spec": {"driver": 7}}})
    assert store.lookup(DRA_DRIVER, "p2", "gpu-7").uuid == "GPU-7"  # type: ignore[union-attr]
    assert store.lookup(DRA_DRIVER, "p3", "gpu-8").uuid == "GPU-8"  # type: ignore[union-attr]
    assert store.lookup(DRA_DRIVER, "p4", "gpu-5").uuid == "GPU-new"  # type: ignore[union-attr]
    store.delete("new")
    assert store.lookup(DRA_DRIVER, "p4", "gpu-5").uuid == "GPU-old"  # type: ignore[union-attr]
    assert len(store) == 3


def test_unheld_gpus_share_unresolved_claims_as_unidentified() -> None:
    # Two GPUs nobody holds, one claimed device no slice names: half of each is unidentified.
    interval = GpuInterval[str]("GPU-0", 100.0, unidentified_share=0.5)
    assert gpu_shares(interval) == [(Unattributed("unidentified"), 50.0),
                                    (Unattributed("unallocated"), 50.0)]
    assert gpu_shares(GpuInterval[str]("GPU-0", 100.0)) == [
        (Unattributed("unallocated"), 100.0)]


def test_dra_scenarios_exact_joules(sim, clock: FakeClock, tmp_path: Path) -> None:
    node: SimulatedNode = sim()
    namer = NamesNamer()
    c = {}
    for key, (namespace, pod, name) in {
            "trainer": ("ml", "train-0", "trainer"), "infer-a": ("ml", "infer-a", "server"),
            "infer-b": ("ml", "infer-b", "server"), "nb": ("lab", "nb", "jupyter"),
            "job": ("lab", "job", "main"), "left": ("lab", "pair", "left"),
            "right": ("lab", "pair", "right")}.items():
        sim_pod = node.add_pod(pod_uid(pod), "burstable", "containerd")
        c[key] = node.add_container(sim_pod, container_id(key))
        namer.add(c[key], namespace, pod, name)
    run_process(node, 101, c["infer-a"].path)
    run_process(node, 202, c["infer-b"].path)
    run_process(node, 301, c["nb"].path)
    server = PodResourcesServer(str(tmp_path / "kubelet.sock")).start()
    server.lister.dra = [
        # Exclusive: one claim, one container, one GPU.
        DraAllocation("ml", "train-0", "trainer", "train-gpu", [(DRA_DRIVER, NODE, "gpu-0")]),
        # Shared: one device in two claims (time-slicing through the driver's sharing).
        DraAllocation("ml", "infer-a", "server", "infer-a-gpu", [(DRA_DRIVER, NODE, "gpu-1")]),
        DraAllocation("ml", "infer-b", "server", "infer-b-gpu", [(DRA_DRIVER, NODE, "gpu-1")]),
        # MIG through DRA: the device is the 3g instance; the 4g nobody claims.
        DraAllocation("lab", "nb", "jupyter", "nb-mig", [(DRA_DRIVER, NODE, "gpu-2-mig-9-0-4")]),
        # A device no ResourceSlice names (yet).
        DraAllocation("lab", "job", "main", "job-gpu", [(DRA_DRIVER, NODE, "gpu-3")]),
        # One claim used by two containers of a pod.
        DraAllocation("lab", "pair", "left", "pair-gpu", [(DRA_DRIVER, NODE, "gpu-4")]),
        DraAllocation("lab", "pair", "right", "pair-gpu", [(DRA_DRIVER, NODE, "gpu-4")]),
    ]
    fake = FakeNvml([
        FakeGpu("GPU-0", utilisation_percent=90),
        FakeGpu("GPU-1", utilisation_percent=50),
        FakeGpu("GPU-2", model="NVIDIA A100-SXM4-40GB", mig_enabled=True, instances=[
            MigInstance("MIG-a", 1, 3, "3g.20gb", (301,)),
            MigInstance("MIG-b", 2, 4, "4g.20gb", ())]),
        FakeGpu("GPU-3", utilisation_percent=10),
        FakeGpu("GPU-4", utilisation_percent=20),
    ])
    store = _store(_slices())
    reader = GpuReader(fake, clock)
    reader.start()
    client = PodResourcesClient(server.socket_path, PATTERNS, dra_drivers=(DRA_DRIVER,))
    stage = GpuStage(reader, client, str(node.procfs), slices=store)
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
    try:
        sampler.sample()

        def interval(stamp: int) -> None:
            g0, g1, g2, g3, g4 = fake.gpus
            for gpu in (g0, g1, g3, g4):
                gpu.energy_mj += 1_000_000
            g1.samples = [ProcessSample(101, 75, stamp), ProcessSample(202, 25, stamp)]
            g2.energy_mj += 700_000
            node.add_node_cpu(idle_seconds=40)
            clock.advance(10)
            sampler.sample()

        interval(1_000)
        snap = sampler.snapshot()
        containers, unattributed, total = gpu_energy(snap)
        assert total == pytest.approx(4 * 1000 + 700)
        assert containers == pytest.approx({
            ("ml", "train-0", "trainer"): 1000.0,  # exclusive: idle included
            ("ml", "infer-a", "server"): 625.0,  # 500 active * 75 % + 500 idle / 2
            ("ml", "infer-b", "server"): 375.0,  # 500 active * 25 % + 500 idle / 2
            ("lab", "nb", "jupyter"): 300 + 400 * 3 / 7,  # MIG 3g busy, idle by slices
            ("lab", "pair", "left"): 500.0,  # one claim, two containers: even
            ("lab", "pair", "right"): 500.0,
        })
        # GPU-3 is held through a claim kwatt cannot place: unidentified, not unallocated;
        # the unclaimed MIG 4g instance is unallocated.
        assert unattributed == pytest.approx({"unidentified": 1000.0,
                                              "unallocated": 400 * 4 / 7,
                                              "idle": 0.0, "system": 0.0})
        assert_conserved(snap)

        # The driver publishes GPU-3 (a new slice): from the next interval it is the job's.
        store.upsert("node-a-gpu.nvidia.com-late", make_resource_slice(
            "node-a-gpu.nvidia.com-late", [nvidia_gpu_device(3, "GPU-3")], pool="late"))
        server.lister.dra[4] = DraAllocation("lab", "job", "main", "job-gpu",
                                             [(DRA_DRIVER, "late", "gpu-3")])
        interval(2_000)
        snap = sampler.snapshot()
        containers, unattributed, total = gpu_energy(snap)
        assert containers[("lab", "job", "main")] == pytest.approx(1000.0)
        assert unattributed["unidentified"] == pytest.approx(1000.0)  # first interval only
        assert containers[("ml", "train-0", "trainer")] == pytest.approx(2000.0)
        assert total == pytest.approx(2 * 4700)
        assert_conserved(snap)

        registry = CollectorRegistry(auto_describe=False)
        registry.register(GpuCollector(stage.snapshot, "sim"))
        families = {f.name: f for f in text_string_to_metric_families(
            generate_latest(registry).decode())}
        rows = {(s.labels["gpu"], s.labels["pod"], s.labels["container"],
                 s.labels["resource"]) for s in families["kwatt_gpu_allocation_info"].samples}
        assert rows == {("0", "train-0", "trainer", DRA_DRIVER),
                        ("1", "infer-a", "server", DRA_DRIVER),
                        ("1", "infer-b", "server", DRA_DRIVER),
                        ("2", "nb", "jupyter", DRA_DRIVER),
                        ("3", "job", "main", DRA_DRIVER),
                        ("4", "pair", "left", DRA_DRIVER),
                        ("4", "pair", "right", DRA_DRIVER)}
    finally:
        client.close()
        server.stop()


def test_resource_slice_watch_follows_changes_and_counts_faults(tmp_path: Path) -> None:
    api = FakeKubeApi()
    mine = make_resource_slice("node-a-gpu", [nvidia_gpu_device(0, "GPU-0")])
    theirs = make_resource_slice("node-b-gpu", [nvidia_gpu_device(0, "GPU-b0")],
                                 node="node-b")
    api.add(mine)
    api.add(theirs)
    with api.serve() as url:
        config = kube_config(write_kubeconfig(tmp_path / "kubeconfig", url), "--gpu", "auto")
        store = SliceStore()
        parts = build_kubernetes(config, settings=FAST, slices=store)
        assert parts.slices is not None
        parts.slices.start()
        try:
            wait_until(lambda: store.lookup(DRA_DRIVER, NODE, "gpu-0") is not None,
                       what="first list")
            assert store.lookup(DRA_DRIVER, "node-b", "gpu-0") is None
            assert len(store) == 1
            # MODIFIED: the driver republishes with another GPU in the pool.
            changed = copy.deepcopy(mine)
            changed["spec"]["devices"].append(nvidia_gpu_device(1, "GPU-1"))
            api.modify(changed)
            wait_until(lambda: store.lookup(DRA_DRIVER, NODE, "gpu-1") is not None,
                       what="MODIFIED")
            # ADDED: a MIG slice; DELETED: the whole-GPU slice goes.
            api.add(make_resource_slice("node-a-mig", [nvidia_mig_device(
                1, "GPU-1", "MIG-c", "1g.10gb", 19, 0, 1)], pool="node-a-mig"))
            wait_until(lambda: store.lookup(DRA_DRIVER, "node-a-mig",
                                            "gpu-1-mig-19-0-1") is not None, what="ADDED")
            api.delete(changed)
            wait_until(lambda: store.lookup(DRA_DRIVER, NODE, "gpu-0") is None,
                       what="DELETED")
            # 410: relist, and the store is whole again.
            api.compact()
            wait_until(lambda: parts.slices is not None and parts.slices.lists >= 2,
                       what="relist after 410")
            assert len(store) == 1
            requests = [r for r in api.requests if r.path.endswith("/resourceslices")]
            assert requests and all(r.query.get("fieldSelector") == f"spec.nodeName={NODE}"
                                    for r in requests)
            # Forbidden (no RBAC rule): counted under its own source, store kept.
            api.slice_fail_status = 403
            api.close_watches()
            deadline = time.monotonic() + 10
            faults: list[object] = []
            while time.monotonic() < deadline and not faults:
                result = parts.stage.sample(0.0, {})
                faults = [f for f in result.faults if f.source == "resourceslices"]
                time.sleep(0.05)
            assert faults and faults[0].reason == "permission"  # type: ignore[attr-defined]
            assert result.source_up["resourceslices"] is False
            assert store.lookup(DRA_DRIVER, "node-a-mig", "gpu-1-mig-19-0-1") is not None
            api.slice_fail_status = None
            wait_until(lambda: parts.stage.sample(0.0, {}).source_up["resourceslices"],
                       what="back up")
        finally:
            parts.slices.stop()
            api.close_watches()
            parts.slices.join(5)


def test_gpu_dra_setting(tmp_path: Path) -> None:
    from kwatt.config import ConfigError, load_config

    assert load_config([], env={"NODE_NAME": "n"}).gpu_dra == "on"
    assert load_config([], env={"NODE_NAME": "n"}).gpu_dra_drivers == (DRA_DRIVER,)
    # YAML 1.1 reads a bare off as false: it means off.
    path = tmp_path / "kwatt.yaml"
    path.write_text("gpu:\n  dra: off\n  dra_drivers: [gpu.nvidia.com, '*.example.com']\n")
    config = load_config(["--config", str(path)], env={"NODE_NAME": "n"})
    assert (config.gpu_dra, config.gpu_dra_drivers) == ("off", (DRA_DRIVER, "*.example.com"))
    assert load_config([], env={"NODE_NAME": "n", "KWATT_GPU_DRA": "off"}).gpu_dra == "off"
    with pytest.raises(ConfigError, match=r"^--gpu\.dra: must be one of on, off"):
        load_config(["--gpu.dra", "maybe"], env={"NODE_NAME": "n"})


@pytest.mark.parametrize("twin", [False, True])
def test_dynamic_mig_devices_match_by_parent_and_profile(sim, clock: FakeClock,
                                                         tmp_path: Path, twin: bool) -> None:
    """DynamicMIG: the slice names parent and profile but no UUID. One 3g instance on the
    parent: it is the claim's. Two 3g instances nobody else names: kwatt cannot tell which,
    so the claim stays unplaced and both instances are unallocated (never charged twice)."""
    node: SimulatedNode = sim()
    namer = NamesNamer()
    sim_pod = node.add_pod(pod_uid("nb"), "burstable", "containerd")
    container = node.add_container(sim_pod, container_id("nb"))
    namer.add(container, "lab", "nb", "jupyter")
    run_process(node, 301, container.path)
    server = PodResourcesServer(str(tmp_path / "kubelet.sock")).start()
    server.lister.dra = [DraAllocation("lab", "nb", "jupyter", "nb-mig",
                                       [(DRA_DRIVER, NODE, "gpu-2-mig-3g20gb-0")])]
    instances = [MigInstance("MIG-a", 1, 3, "3g.20gb", (301,)),
                 MigInstance("MIG-b", 2, 4 if not twin else 3, "4g.20gb" if not twin
                             else "3g.20gb", ())]
    fake = FakeNvml([FakeGpu("GPU-2", model="NVIDIA A100-SXM4-40GB", mig_enabled=True,
                             instances=instances)])
    store = _store([make_resource_slice("s", [
        nvidia_gpu_device(2, "GPU-2"), nvidia_dynamic_mig_device(2, "GPU-2", "3g.20gb", 0)])])
    reader = GpuReader(fake, clock)
    reader.start()
    client = PodResourcesClient(server.socket_path, PATTERNS, dra_drivers=(DRA_DRIVER,))
    stage = GpuStage(reader, client, str(node.procfs), slices=store)
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
    try:
        sampler.sample()
        fake.gpus[0].energy_mj += 700_000
        node.add_node_cpu(idle_seconds=40)
        clock.advance(10)
        sampler.sample()
        containers, unattributed, total = gpu_energy(sampler.snapshot())
        assert total == pytest.approx(700.0)
        if not twin:
            # 3g busy: 300 J active + its 3/7 of the 400 J idle; the 4g's 4/7 unallocated.
            assert containers == pytest.approx({("lab", "nb", "jupyter"): 300 + 400 * 3 / 7})
            assert unattributed["unallocated"] == pytest.approx(400 * 4 / 7)
        else:
            assert containers == {}
            assert unattributed["unallocated"] == pytest.approx(700.0)
        assert_conserved(sampler.snapshot())
    finally:
        client.close()
        server.stop()


@pytest.mark.parametrize("versions", [{"v1beta1"}, set()])
def test_older_api_servers_beta_slices_or_none(tmp_path: Path, versions: set[str]) -> None:
    """Before 1.34 only beta versions are served: v1beta1 (attributes under "basic") is
    read. An API with no ResourceSlices at all (no DRA) is not a fault: the watch stops and
    the source stays up (nothing to read), so no stale 0 is left behind."""
    api = FakeKubeApi()
    api.slice_versions = versions
    api.add(make_resource_slice("node-a-gpu", [{"name": "gpu-0", "basic": {"attributes": {
        "type": {"string": "gpu"}, "uuid": {"string": "GPU-0"}}}}]))
    with api.serve() as url:
        config = kube_config(write_kubeconfig(tmp_path / "kubeconfig", url), "--gpu", "auto")
        store = SliceStore()
        parts = build_kubernetes(config, settings=FAST, slices=store)
        assert parts.slices is not None
        parts.slices.start()
        try:
            if versions:
                wait_until(lambda: store.lookup(DRA_DRIVER, NODE, "gpu-0") is not None,
                           what="beta list")
                assert parts.slices.api_version == "v1beta1"
                assert parts.stage.sample(0.0, {}).source_up["resourceslices"] is True
            else:
                wait_until(lambda: parts.slices is not None and not parts.slices.served,
                           what="given up")
                parts.slices.join(5)
                result = parts.stage.sample(0.0, {})
                assert result.source_up["resourceslices"] is True
                assert not [f for f in result.faults if f.source == "resourceslices"]
            paths = {r.path for r in api.requests if r.path.endswith("/resourceslices")}
            assert paths == {f"/apis/resource.k8s.io/{v}/resourceslices"
                             for v in ("v1", "v1beta2", "v1beta1")}
        finally:
            parts.slices.stop()
            api.close_watches()
            parts.slices.join(5)


def test_unplaced_claim_spreads_over_unheld_gpus_that_answer(sim, clock: FakeClock,
                                                             tmp_path: Path) -> None:
    """One claim on a device no slice names, three unheld GPUs of which one is lost: the
    two that answer each book half their energy as unidentified (min(1, 2) / 2)."""
    node: SimulatedNode = sim()
    namer = NamesNamer()
    server = PodResourcesServer(str(tmp_path / "kubelet.sock")).start()
    server.lister.dra = [DraAllocation("lab", "job", "main", "job-gpu",
                                       [(DRA_DRIVER, NODE, "gpu-9")])]
    fake = FakeNvml([FakeGpu("GPU-0"), FakeGpu("GPU-1"), FakeGpu("GPU-2")])
    reader = GpuReader(fake, clock)
    reader.start()
    client = PodResourcesClient(server.socket_path, PATTERNS, dra_drivers=(DRA_DRIVER,))
    stage = GpuStage(reader, client, str(node.procfs), slices=_store(_slices()))
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
    try:
        sampler.sample()
        fake.gpus[2].lost = True
        for gpu in fake.gpus:
            gpu.energy_mj += 1_000_000
        node.add_node_cpu(idle_seconds=40)
        clock.advance(10)
        sampler.sample()
        _, unattributed, total = gpu_energy(sampler.snapshot())
        assert total == pytest.approx(2000.0)
        assert unattributed["unidentified"] == pytest.approx(1000.0)
        assert unattributed["unallocated"] == pytest.approx(1000.0)
    finally:
        client.close()
        server.stop()
