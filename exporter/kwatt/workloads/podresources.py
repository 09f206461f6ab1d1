"""Which container holds which device: the kubelet PodResources v1 API over its unix socket.

Only ``List`` and ``GetAllocatableResources`` are used, through stubs generated from our
own minimal copy of the kubelet's api.proto (workloads/_proto). Every call has a deadline;
failures come back as ``Fault`` objects (source ``podresources``), never as exceptions,
and the channel is rebuilt after one so that a restarted kubelet is picked up at once.

Device ids name GPUs in four ways, all handled by ``parse_device_id``:
``GPU-<uuid>`` (whole GPU), ``GPU-<uuid>::N`` (time-slicing replica N of it),
``MIG-<uuid>`` or ``MIG-GPU-<uuid>/gi/ci`` (a MIG instance) and, on GKE, ``nvidiaN``
(the GPU with NVML index N).

Devices handed out through Dynamic Resource Allocation come in ``dynamic_resources``: per
claim, (driver, pool, device) triplets that only the node's ResourceSlices
(workloads/resourceslices.py) turn into a GPU UUID. ``List`` returns them as
``ClaimAllocation``s, for the configured DRA drivers only.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from kwatt.faults import Fault

SOURCE = "podresources"
_GKE_NAME = re.compile(r"^nvidia(\d+)$")


@dataclass(frozen=True)
class DeviceAllocation:
    """One device id held by one container."""

    namespace: str
    pod: str
    container: str
    resource: str
    device_id: str


@dataclass(frozen=True)
class ClaimAllocation:
    """One DRA device, allocated through one ResourceClaim, used by one container."""

    namespace: str
    pod: str
    container: str
    claim_namespace: str
    claim_name: str
    driver: str
    pool: str
    device: str


@dataclass(frozen=True)
class DeviceRef:
    """What a device id points at. kind: ``gpu`` (value: UUID), ``mig`` (value: MIG UUID),
    ``index`` (value: NVML index as text)."""

    kind: str
    value: str
    replica: int | None = None


def parse_device_id(device_id: str) -> DeviceRef:
    base, sep, replica_text = device_id.strip().partition("::")
    replica = int(replica_text) if sep and replica_text.isdigit() else None
    if base.startswith("MIG-"):
        return DeviceRef("mig", base, replica)
    match = _GKE_NAME.match(base)
    if match is not None:
        return DeviceRef("index", match.group(1), replica)
    return DeviceRef("gpu", base, replica)


def resource_matches(resource: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(resource, p) for p in patterns)


@dataclass(frozen=True)
class ListResult:
    allocations: tuple[DeviceAllocation, ...] | None  # None when the call failed
    fault: Fault | None = None
    claims: tuple[ClaimAllocation, ...] = ()


class PodResourcesClient:
    """A kubelet PodResources v1 client with a per-call deadline."""

    def __init__(self, socket_path: str, resource_patterns: Sequence[str],
                 timeout_seconds: float = 2.0, dra_drivers: Sequence[str] = ()) -> None:
        self._socket = socket_path
        self._patterns = tuple(resource_patterns)
        self._dra_drivers = tuple(dra_drivers)
        self._timeout = timeout_seconds
        self._channel: Any = None
        self._stub: Any = None

    @property
    def socket_path(self) -> str:
        return self._socket

    def close(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._channel = self._stub = None

    def _connect(self) -> Any:
        if self._stub is None:
            import grpc

            from kwatt.workloads._proto import podresources_pb2_grpc

            self._channel = grpc.insecure_channel(f"unix://{self._socket}")
            self._stub = podresources_pb2_grpc.PodResourcesListerStub(  # type: ignore[no-untyped-call]
                self._channel)
        return self._stub

    def _call(self, method: str) -> tuple[Any, Fault | None]:
        if not os.path.exists(self._socket):
            self.close()
            return None, Fault(SOURCE, "absent", self._socket,
                               "kubelet PodResources socket does not exist; is "
                               "/var/lib/kubelet/pod-resources mounted?")
        import grpc

        from kwatt.workloads._proto import podresources_pb2

        stub = self._connect()
        request = (podresources_pb2.ListPodResourcesRequest() if method == "List"
                   else podresources_pb2.AllocatableResourcesRequest())
        try:
            return getattr(stub, method)(request, timeout=self._timeout), None
        except grpc.RpcError as exc:
            self.close()
            code = exc.code() if hasattr(exc, "code") else None
            if code == grpc.StatusCode.DEADLINE_EXCEEDED:
                return None, Fault(SOURCE, "timeout", self._socket,
                                   f"{method} took longer than {self._timeout:g}s")
            if code == grpc.StatusCode.PERMISSION_DENIED:
                reason = "permission"
            elif code == grpc.StatusCode.UNAVAILABLE:
                reason = "absent"
            else:
                reason = "api"
            details = exc.details() if hasattr(exc, "details") else str(exc)
            return None, Fault(SOURCE, reason, self._socket,
                               f"{method}: {getattr(code, 'name', code)}: {details}")

    def list(self) -> ListResult:
        """Device allocations of the configured resources and DRA drivers, per container."""
        response, fault = self._call("List")
        if response is None:
            return ListResult(None, fault)
        out = []
        claims: list[ClaimAllocation] = []
        for pod in response.pod_resources:
            for container in pod.containers:
                for claim in container.dynamic_resources:
                    for device in claim.claim_resources:
                        if resource_matches(device.driver_name, self._dra_drivers):
                            claims.append(ClaimAllocation(
                                pod.namespace, pod.name, container.name,
                                claim.claim_namespace, claim.claim_name,
                                device.driver_name, device.pool_name, device.device_name))
                for devices in container.devices:
                    if not resource_matches(devices.resource_name, self._patterns):
                        continue
                    for device_id in devices.device_ids:
                        out.append(DeviceAllocation(pod.namespace, pod.name, container.name,
                                                    devices.resource_name, device_id))
        return ListResult(tuple(out), claims=tuple(claims))

    def allocatable(self) -> tuple[dict[str, tuple[str, ...]] | None, Fault | None]:
        """Device ids the kubelet can hand out, per configured resource name."""
        response, fault = self._call("GetAllocatableResources")
        if response is None:
            return None, fault
        out: dict[str, list[str]] = {}
        for devices in response.devices:
            if resource_matches(devices.resource_name, self._patterns):
                out.setdefault(devices.resource_name, []).extend(devices.device_ids)
        return {k: tuple(v) for k, v in out.items()}, None
