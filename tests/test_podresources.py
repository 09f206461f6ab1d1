"""The PodResources client against a real gRPC server on a temp unix socket."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kwatt.workloads.podresources import (
    DeviceAllocation,
    DeviceRef,
    PodResourcesClient,
    parse_device_id,
)
from podresources_server import Allocation, PodResourcesServer

GPU_A = "GPU-1f0c1c2a-0000-4000-8000-00000000000a"
GPU_B = "GPU-1f0c1c2a-0000-4000-8000-00000000000b"
MIG_1 = "MIG-7e5a0000-0000-4000-8000-000000000001"
PATTERNS = ("nvidia.com/gpu", "nvidia.com/mig-*")


@pytest.fixture
def server(tmp_path: Path) -> Iterator[PodResourcesServer]:
    srv = PodResourcesServer(str(tmp_path / "kubelet.sock")).start()
    yield srv
    srv.stop()


def test_parse_device_ids() -> None:
    assert parse_device_id(GPU_A) == DeviceRef("gpu", GPU_A)
    assert parse_device_id(f"{GPU_A}::3") == DeviceRef("gpu", GPU_A, 3)
    assert parse_device_id(MIG_1) == DeviceRef("mig", MIG_1)
    old_mig = "MIG-GPU-1f0c1c2a-0000-4000-8000-00000000000a/1/0"
    assert parse_device_id(old_mig) == DeviceRef("mig", old_mig)
    assert parse_device_id(f"{MIG_1}::1") == DeviceRef("mig", MIG_1, 1)
    assert parse_device_id("nvidia0") == DeviceRef("index", "0")
    assert parse_device_id("nvidia12") == DeviceRef("index", "12")


def test_list_exclusive_time_sliced_mig_and_mixed(server: PodResourcesServer) -> None:
    server.lister.allocations = [
        Allocation("ml", "train-0", "trainer", "nvidia.com/gpu", [GPU_A]),
        Allocation("ml", "infer-a", "server", "nvidia.com/gpu", [f"{GPU_B}::0"]),
        Allocation("ml", "infer-b", "server", "nvidia.com/gpu", [f"{GPU_B}::1", f"{GPU_B}::2"]),
        Allocation("lab", "nb", "jupyter", "nvidia.com/mig-3g.40gb", [MIG_1]),
        Allocation("gke", "job", "main", "nvidia.com/gpu", ["nvidia1"]),
        # Not a GPU resource: filtered out.
        Allocation("net", "sriov", "app", "intel.com/sriov_netdevice", ["0000:3b:02.1"]),
        # A pod holding a GPU and a MIG instance in two containers of one pod.
        Allocation("mixed", "p", "a", "nvidia.com/gpu", [GPU_A]),
        Allocation("mixed", "p", "b", "nvidia.com/mig-1g.10gb", [MIG_1]),
    ]
    client = PodResourcesClient(server.socket_path, PATTERNS, timeout_seconds=2)
    result = client.list()
    assert result.fault is None
    assert result.allocations is not None
    assert set(result.allocations) == {
        DeviceAllocation("ml", "train-0", "trainer", "nvidia.com/gpu", GPU_A),
        DeviceAllocation("ml", "infer-a", "server", "nvidia.com/gpu", f"{GPU_B}::0"),
        DeviceAllocation("ml", "infer-b", "server", "nvidia.com/gpu", f"{GPU_B}::1"),
        DeviceAllocation("ml", "infer-b", "server", "nvidia.com/gpu", f"{GPU_B}::2"),
        DeviceAllocation("lab", "nb", "jupyter", "nvidia.com/mig-3g.40gb", MIG_1),
        DeviceAllocation("gke", "job", "main", "nvidia.com/gpu", "nvidia1"),
        DeviceAllocation("mixed", "p", "a", "nvidia.com/gpu", GPU_A),
        DeviceAllocation("mixed", "p", "b", "nvidia.com/mig-1g.10gb", MIG_1),
    }
    client.close()


def test_configurable_resource_names(server: PodResourcesServer) -> None:
    server.lister.allocations = [
        Allocation("ml", "a", "c", "nvidia.com/gpu", [GPU_A]),
        Allocation("ml", "b", "c", "example.com/shared-gpu", [GPU_B]),
    ]
    client = PodResourcesClient(server.socket_path, ("example.com/*",))
    result = client.list()
    assert result.allocations == (
        DeviceAllocation("ml", "b", "c", "example.com/shared-gpu", GPU_B),)


def test_allocatable(server: PodResourcesServer) -> None:
    server.lister.allocatable = {"nvidia.com/gpu": [GPU_A, GPU_B],
                                 "nvidia.com/mig-3g.40gb": [MIG_1],
                                 "cpu.example/other": ["x"]}
    client = PodResourcesClient(server.socket_path, PATTERNS)
    allocatable, fault = client.allocatable()
    assert fault is None
    assert allocatable == {"nvidia.com/gpu": (GPU_A, GPU_B), "nvidia.com/mig-3g.40gb": (MIG_1,)}


def test_missing_socket_is_an_absent_fault(tmp_path: Path) -> None:
    client = PodResourcesClient(str(tmp_path / "nope.sock"), PATTERNS)
    result = client.list()
    assert result.allocations is None
    assert result.fault is not None
    assert (result.fault.source, result.fault.reason) == ("podresources", "absent")
    assert "does not exist" in result.fault.detail


def test_hanging_server_times_out_then_recovers(server: PodResourcesServer) -> None:
    server.lister.allocations = [Allocation("ml", "a", "c", "nvidia.com/gpu", [GPU_A])]
    client = PodResourcesClient(server.socket_path, PATTERNS, timeout_seconds=0.3)
    server.lister.hang.set()
    started = time.monotonic()
    result = client.list()
    elapsed = time.monotonic() - started
    assert result.allocations is None
    assert result.fault is not None
    assert (result.fault.source, result.fault.reason) == ("podresources", "timeout")
    assert elapsed < 2.0, "the per-call deadline did not bound the call"
    server.lister.hang.clear()
    server.lister.release.set()
    again = client.list()
    assert again.fault is None
    assert again.allocations == (DeviceAllocation("ml", "a", "c", "nvidia.com/gpu", GPU_A),)


def test_kubelet_restart_is_picked_up(tmp_path: Path) -> None:
    path = str(tmp_path / "kubelet.sock")
    first = PodResourcesServer(path).start()
    first.lister.allocations = [Allocation("ml", "a", "c", "nvidia.com/gpu", [GPU_A])]
    client = PodResourcesClient(path, PATTERNS, timeout_seconds=1)
    assert client.list().fault is None
    first.stop()
    Path(path).unlink(missing_ok=True)
    down = client.list()
    assert down.fault is not None and down.fault.reason == "absent"
    second = PodResourcesServer(path).start()
    try:
        second.lister.allocations = [Allocation("ml", "b", "c", "nvidia.com/gpu", [GPU_B])]
        back = client.list()
        assert back.fault is None
        assert back.allocations == (DeviceAllocation("ml", "b", "c", "nvidia.com/gpu", GPU_B),)
    finally:
        second.stop()
