"""A real kubelet PodResources v1 gRPC server on a unix socket, for tests.

It serves whatever allocations the test puts in ``allocations`` (mutable between calls) and
DRA allocations (``dra``: ResourceClaim devices per container, as the kubelet reports them in
``dynamic_resources`` since Kubernetes 1.34) are served next to device-plugin ones. It can
be told to hang, to exercise the client's per-call deadline, or to take time over each
``List`` (``on_list`` runs before it answers: a test advances its fake clock there, so a
slow kubelet is modelled without depending on wall-clock speed).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from kwatt.workloads._proto import podresources_pb2 as pb
from kwatt.workloads._proto import podresources_pb2_grpc as pb_grpc


@dataclass
class Allocation:
    namespace: str
    pod: str
    container: str
    resource: str
    device_ids: list[str]


@dataclass
class DraAllocation:
    """One ResourceClaim used by one container; devices are (driver, pool, device)."""

    namespace: str
    pod: str
    container: str
    claim: str
    devices: list[tuple[str, str, str]]
    claim_namespace: str | None = None  # default: the pod's namespace


@dataclass
class Lister(pb_grpc.PodResourcesListerServicer):  # type: ignore[misc]
    allocations: list[Allocation] = field(default_factory=list)
    dra: list[DraAllocation] = field(default_factory=list)
    allocatable: dict[str, list[str]] = field(default_factory=dict)
    hang: threading.Event = field(default_factory=threading.Event)
    release: threading.Event = field(default_factory=threading.Event)
    calls: int = 0
    on_list: Callable[[], None] | None = None

    def List(self, request: Any, context: Any) -> Any:
        self.calls += 1
        if self.on_list is not None:
            self.on_list()
        if self.hang.is_set():
            self.release.wait(10)
        pods: dict[tuple[str, str], Any] = {}

        def container_of(namespace: str, pod_name: str, name: str) -> Any:
            pod = pods.get((namespace, pod_name))
            if pod is None:
                pod = pods[(namespace, pod_name)] = pb.PodResources(
                    name=pod_name, namespace=namespace)
            container = next((c for c in pod.containers if c.name == name), None)
            if container is None:
                container = pod.containers.add(name=name)
            return container

        for a in self.allocations:
            container = container_of(a.namespace, a.pod, a.container)
            container.devices.add(resource_name=a.resource, device_ids=a.device_ids)
        for d in self.dra:
            container = container_of(d.namespace, d.pod, d.container)
            container.dynamic_resources.add(
                claim_name=d.claim, claim_namespace=d.claim_namespace or d.namespace,
                claim_resources=[pb.ClaimResource(driver_name=driver, pool_name=pool,
                                                  device_name=device)
                                 for driver, pool, device in d.devices])
        return pb.ListPodResourcesResponse(pod_resources=list(pods.values()))

    def GetAllocatableResources(self, request: Any, context: Any) -> Any:
        self.calls += 1
        if self.hang.is_set():
            self.release.wait(10)
        return pb.AllocatableResourcesResponse(devices=[
            pb.ContainerDevices(resource_name=name, device_ids=ids)
            for name, ids in self.allocatable.items()])


class PodResourcesServer:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.lister = Lister()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pb_grpc.add_PodResourcesListerServicer_to_server(self.lister, self._server)
        self._server.add_insecure_port(f"unix://{socket_path}")

    def start(self) -> PodResourcesServer:
        self._server.start()
        return self

    def stop(self) -> None:
        self.lister.release.set()
        self._server.stop(grace=None)
