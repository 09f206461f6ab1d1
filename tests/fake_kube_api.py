"""A local HTTP server that speaks enough of the Kubernetes API for kwatt's watchers.

Serves ``/api/v1/pods`` and ``/apis/resource.k8s.io/v1/resourceslices`` list and watch
(chunked, one JSON event per line, bookmarks, 410 Gone as an ERROR event or as an HTTP
status), single ReplicaSets and Jobs for owner lookups, and can be told to answer 500, 403
or to hang. ResourceSlices (``make_resource_slice``) follow the layout of NVIDIA's DRA
driver; they share the pods' resourceVersion history, as objects of one etcd do. The real
``kubernetes`` client talks to it through a kubeconfig written by ``write_kubeconfig``.
"""

from __future__ import annotations

import copy
import functools
import json
import threading
import time
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit


@dataclass
class Request:
    path: str
    query: dict[str, str]
    accept: str = ""


PARTIAL_OBJECT_METADATA = "as=PartialObjectMetadata;g=meta.k8s.io;v=v1"
# apiVersion of each owner kind the tests use (an ownerReference carries it).
API_VERSIONS = {
    "ReplicaSet": "apps/v1", "Deployment": "apps/v1", "StatefulSet": "apps/v1",
    "DaemonSet": "apps/v1", "Job": "batch/v1", "CronJob": "batch/v1", "Node": "v1",
    "Pod": "v1", "JobSet": "jobset.x-k8s.io/v1alpha2",
    "TrainJob": "trainer.kubeflow.org/v1alpha1", "PyTorchJob": "kubeflow.org/v1",
    "MPIJob": "kubeflow.org/v1", "RayCluster": "ray.io/v1", "RayJob": "ray.io/v1",
    "RayService": "ray.io/v1", "LeaderWorkerSet": "leaderworkerset.x-k8s.io/v1",
    "InferenceService": "serving.kserve.io/v1beta1",
    "Revision": "serving.knative.dev/v1",
}
RESOURCES = {kind: kind.lower() + "s" for kind in API_VERSIONS}


def owner_uid(kind: str, name: str, namespace: str = "default") -> str:
    """The uid of an owner object, the same for every pod that refers to it."""
    key = f"{namespace}/{kind}/{name}".encode("utf-8", "surrogatepass").hex()
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_URL, key))


def owner_ref(kind: str, name: str, uid: str = "") -> dict[str, Any]:
    return {"apiVersion": API_VERSIONS.get(kind, "example.com/v1"), "kind": kind,
            "name": name, "uid": uid or owner_uid(kind, name), "controller": True,
            "blockOwnerDeletion": True}


SLICES_PATH = "/apis/resource.k8s.io/v1/resourceslices"
DRA_DRIVER = "gpu.nvidia.com"


def _attrs(**values: str) -> dict[str, dict[str, str]]:
    return {name: ({"version": v} if name.endswith("Version") or name.endswith(
        "Capability") else {"string": v}) for name, v in values.items()}


def nvidia_gpu_device(minor: int, uuid: str, product: str = "NVIDIA H100 80GB HBM3"
                      ) -> dict[str, Any]:
    """A whole GPU as NVIDIA's DRA driver publishes it (k8s-dra-driver-gpu,
    cmd/gpu-kubelet-plugin/deviceinfo.go: name gpu-<minor>, attributes type, uuid, ...)."""
    return {"name": f"gpu-{minor}", "attributes": _attrs(
        type="gpu", uuid=uuid, productName=product, brand="Nvidia", architecture="Hopper",
        cudaComputeCapability="9.0.0", driverVersion="550.54.15",
        cudaDriverVersion="12.4.0", pcieBusID=f"0000:{minor + 0x18:02x}:00.0"),
        "capacity": {"memory": {"value": "80Gi"}}}


def nvidia_mig_device(parent_minor: int, parent_uuid: str, uuid: str, profile: str,
                      profile_id: int, start: int, size: int) -> dict[str, Any]:
    """A MIG device as NVIDIA's DRA driver publishes it: name
    gpu-<minor>-mig-<profile id>-<start>-<size>, attributes type=mig, uuid, parentUUID."""
    return {"name": f"gpu-{parent_minor}-mig-{profile_id}-{start}-{size}",
            "attributes": _attrs(type="mig", uuid=uuid, parentUUID=parent_uuid,
                                 profile=profile, productName="NVIDIA A100-SXM4-40GB",
                                 driverVersion="550.54.15"),
            "capacity": {"multiprocessors": {"value": "42"}}}


def nvidia_dynamic_mig_device(parent_minor: int, parent_uuid: str, profile: str,
                              start: int) -> dict[str, Any]:
    """An abstract MIG device of the driver's DynamicMIG mode (kubernetes-sigs/
    dra-driver-nvidia-gpu, partitions.go, CommonAttributesMig): no uuid until prepared."""
    return {"name": f"gpu-{parent_minor}-mig-{profile.replace('.', '')}-{start}",
            "attributes": _attrs(type="mig", parentUUID=parent_uuid, profile=profile,
                                 productName="NVIDIA A100-SXM4-40GB")}


def make_resource_slice(name: str, devices: list[dict[str, Any]], *, node: str = "node-a",
                        driver: str = DRA_DRIVER, pool: str | None = None,
                        generation: int = 1) -> dict[str, Any]:
    """A resource.k8s.io/v1 ResourceSlice of one node (the pool is named after the node,
    as NVIDIA's driver does). ``metadata.uid`` is the key the fake stores it under."""
    return {"apiVersion": "resource.k8s.io/v1", "kind": "ResourceSlice",
            "metadata": {"name": name, "uid": f"slice-{name}"},
            "spec": {"driver": driver, "nodeName": node,
                     "pool": {"name": pool or node, "generation": generation,
                              "resourceSliceCount": 1},
                     "devices": devices}}


def make_pod(name: str, *, namespace: str = "default", uid: str | None = None,
             node: str = "node-a", containers: dict[str, str] | None = None,
             init_containers: dict[str, str] | None = None,
             ephemeral_containers: dict[str, str] | None = None,
             owner: tuple[str, str] | tuple[str, str, str] | None = None,
             labels: dict[str, str] | None = None,
             qos: str = "Burstable", requests: dict[str, str] | None = None,
             sidecars: tuple[str, ...] = ()) -> dict[str, Any]:
    """A Pod object; ``containers`` maps container name to runtime-prefixed containerID."""
    containers = containers or {}
    init_containers = init_containers or {}
    requests = requests or {}
    metadata: dict[str, Any] = {"name": name, "namespace": namespace,
                                "uid": uid or str(uuidlib.uuid4()), "labels": labels or {}}
    if owner is not None:  # (kind, name) or (kind, name, uid)
        metadata["ownerReferences"] = [owner_ref(*owner)]

    def spec_container(cname: str) -> dict[str, Any]:
        body: dict[str, Any] = {"name": cname, "image": "busybox"}
        if cname in requests:
            body["resources"] = {"requests": {"cpu": requests[cname]}}
        if cname in sidecars:
            body["restartPolicy"] = "Always"
        return body

    def status(cname: str, cid: str) -> dict[str, Any]:
        return {"name": cname, "containerID": cid, "ready": True, "restartCount": 0,
                "image": "busybox", "imageID": "", "state": {"running": {}}}

    pod: dict[str, Any] = {
        "apiVersion": "v1", "kind": "Pod", "metadata": metadata,
        "spec": {"nodeName": node,
                 "containers": [spec_container(c) for c in containers],
                 "initContainers": [spec_container(c) for c in init_containers]},
        "status": {"phase": "Running", "qosClass": qos,
                   "containerStatuses": [status(c, i) for c, i in containers.items()],
                   "initContainerStatuses": [status(c, i) for c, i in init_containers.items()]},
    }
    if ephemeral_containers:
        pod["spec"]["ephemeralContainers"] = [{"name": c} for c in ephemeral_containers]
        pod["status"]["ephemeralContainerStatuses"] = [
            status(c, i) for c, i in ephemeral_containers.items()]
    return pod


class FakeKubeApi:
    """State plus failure switches; the handler reads them under ``cond``."""

    def __init__(self, max_history: int = 100_000) -> None:
        self.max_history = max_history  # events kept for watches to resume from
        self.cond = threading.Condition()
        self.rv = 100
        self.pods: dict[str, dict[str, Any]] = {}  # uid -> pod
        self.events: list[tuple[int, str, dict[str, Any]]] = []  # (rv, type, object)
        self.compacted_below = 0  # watches from an rv under this get 410
        self.gone_as_http = False  # 410 as an HTTP status instead of an ERROR event
        self.fail_status: int | None = None  # answer every pod request with this status
        self.hang = False  # accept pod requests and never answer
        self.hang_watch = False  # answer watches with headers, then send nothing
        self.forbid_owners = False
        # Serve every pod whatever the fieldSelector says, as some proxies and API
        # aggregators do.
        self.ignore_field_selector = False
        self.owner_fail_status: int | None = None
        self.slice_fail_status: int | None = None  # answer resourceslice requests with this
        self.slice_versions = {"v1"}  # resource.k8s.io versions served (older servers: beta)
        self.replicasets: dict[tuple[str, str], dict[str, Any]] = {}
        self.jobs: dict[tuple[str, str], dict[str, Any]] = {}
        self.nodes: dict[str, dict[str, Any]] = {}  # name -> Node object (GET only)
        self.forbid_nodes = False
        # Any other owner: (resource, namespace, name) -> object; see add_owner.
        self.owners: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.forbidden_resources: set[str] = set()  # 403 for GETs of these resources
        self.requests: list[Request] = []
        self._bookmark_pending = 0
        self.watching = 0  # watch streams that have started (and will see bookmarks)
        self._close_watches = 0
        self.server: ThreadingHTTPServer | None = None

    # -- state changes (tests) ---------------------------------------------------------

    def _stamp(self, pod: dict[str, Any]) -> dict[str, Any]:
        self.rv += 1
        pod = copy.deepcopy(pod)
        pod["metadata"]["resourceVersion"] = str(self.rv)
        return pod

    def add(self, pod: dict[str, Any]) -> None:
        self._change("ADDED", pod)

    def modify(self, pod: dict[str, Any]) -> None:
        self._change("MODIFIED", pod)

    def delete(self, pod: dict[str, Any]) -> None:
        self._change("DELETED", pod)

    def _change(self, kind: str, pod: dict[str, Any]) -> None:
        with self.cond:
            stamped = self._stamp(pod)
            uid = stamped["metadata"]["uid"]
            if kind == "DELETED":
                self.pods.pop(uid, None)
            else:
                self.pods[uid] = stamped
            self.events.append((self.rv, kind, stamped))
            if len(self.events) > self.max_history:
                dropped = self.events[: len(self.events) - self.max_history]
                del self.events[: len(dropped)]
                self.compacted_below = max(self.compacted_below, dropped[-1][0])
            self.cond.notify_all()

    def compact(self) -> None:
        """Forget history: every watch from an older resourceVersion gets 410 Gone."""
        with self.cond:
            self.rv += 1
            self.compacted_below = self.rv
            self.events.clear()
            self._close_watches += 1
            self.cond.notify_all()

    def bookmark(self) -> None:
        with self.cond:
            self.rv += 1
            self._bookmark_pending += 1
            self.cond.notify_all()

    def close_watches(self) -> None:
        with self.cond:
            self._close_watches += 1
            self.cond.notify_all()

    def set_failure(self, status: int | None = None, hang: bool = False) -> None:
        with self.cond:
            self.fail_status = status
            self.hang = hang
            self._close_watches += 1
            self.cond.notify_all()

    def add_owner(self, kind: str, name: str, namespace: str = "default",
                  owner: tuple[str, str, str] | None = None) -> str:
        """Store an owner object (with a spec, so a metadata-only answer is visible);
        ``owner`` is its own controller (kind, name, uid). Returns the new object's uid."""
        uid = owner_uid(kind, name, namespace)
        metadata: dict[str, Any] = {"name": name, "namespace": namespace, "uid": uid,
                                    "resourceVersion": str(self.rv)}
        if owner is not None:
            metadata["ownerReferences"] = [owner_ref(*owner)]
        with self.cond:
            self.owners[(RESOURCES[kind], namespace, name)] = {
                "apiVersion": API_VERSIONS[kind], "kind": kind, "metadata": metadata,
                "spec": {"template": {"spec": {"containers": [{"env": [
                    {"name": "TOKEN", "value": "not-for-kwatt"}]}]}}}}
        return uid

    def remove_owner(self, kind: str, name: str, namespace: str = "default") -> None:
        with self.cond:
            self.owners.pop((RESOURCES[kind], namespace, name), None)

    def owner_requests(self) -> list[Request]:
        with self.cond:
            return [r for r in self.requests if r.path.startswith("/apis/")
                    or (r.path.startswith("/api/v1/namespaces/") and
                        len(r.path.split("/")) == 7)]

    def pod_requests(self) -> list[Request]:
        with self.cond:
            return [r for r in self.requests if r.path.endswith("/pods")]

    # -- serving ----------------------------------------------------------------------

    @contextmanager
    def serve(self) -> Iterator[str]:
        api = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                api._handle(self)

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        server.daemon_threads = True
        self.server = server
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield f"http://127.0.0.1:{server.server_address[1]}"
        finally:
            with self.cond:
                self.hang = False
                self.hang_watch = False
                self._close_watches += 1
                self.cond.notify_all()
            server.shutdown()
            server.server_close()

    def _json(self, handler: BaseHTTPRequestHandler, status: int, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    @staticmethod
    def _status(code: int, reason: str, message: str) -> dict[str, Any]:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": message, "reason": reason, "code": code}

    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        with self.cond:
            self.requests.append(Request(parts.path, query,
                                         handler.headers.get("Accept", "")))
        segments = [s for s in parts.path.split("/") if s]
        if parts.path == "/api/v1/pods" or (len(segments) == 5 and segments[4] == "pods"):
            self._pods(handler, query)
        elif len(segments) == 4 and segments[:2] == ["apis", "resource.k8s.io"] \
                and segments[3] == "resourceslices":
            if segments[2] not in self.slice_versions:
                self._json(handler, 404, self._status(404, "NotFound", handler.path))
            elif self.slice_fail_status is not None:
                self._json(handler, self.slice_fail_status, self._status(
                    self.slice_fail_status, "Forbidden", "injected failure"))
            else:
                self._pods(handler, query, kind="ResourceSlice")
        elif len(segments) == 7 and segments[:2] == ["apis", "apps"] \
                and segments[5] == "replicasets":
            self._owner(handler, self.replicasets.get((segments[4], segments[6])))
        elif len(segments) == 7 and segments[:2] == ["apis", "batch"] and segments[5] == "jobs" \
                and (segments[4], segments[6]) in self.jobs:
            self._owner(handler, self.jobs.get((segments[4], segments[6])))
        elif len(segments) == 4 and segments[:3] == ["api", "v1", "nodes"]:
            node = self.nodes.get(segments[3])
            if self.forbid_nodes:
                self._json(handler, 403, self._status(403, "Forbidden", "forbidden"))
            elif node is None:
                self._json(handler, 404, self._status(404, "NotFound", "not found"))
            else:
                self._json(handler, 200, node)
        elif (len(segments) == 7 and segments[0] == "apis" and segments[3] == "namespaces") \
                or (len(segments) == 6 and segments[:3] == ["api", "v1", "namespaces"]):
            resource, namespace, name = segments[-2], segments[-3], segments[-1]
            if resource in self.forbidden_resources:
                self._json(handler, 403, self._status(403, "Forbidden", "forbidden"))
                return
            with self.cond:
                obj = copy.deepcopy(self.owners.get((resource, namespace, name)))
            if obj is not None and PARTIAL_OBJECT_METADATA in handler.headers.get("Accept", ""):
                obj = {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
                       "metadata": obj["metadata"]}
            self._owner(handler, obj)
        else:
            self._json(handler, 404, self._status(404, "NotFound", handler.path))

    def _owner(self, handler: BaseHTTPRequestHandler, obj: dict[str, Any] | None) -> None:
        if self.owner_fail_status is not None:
            self._json(handler, self.owner_fail_status,
                       self._status(self.owner_fail_status, "InternalError", "injected"))
        elif self.forbid_owners:
            self._json(handler, 403, self._status(403, "Forbidden", "forbidden"))
        elif obj is None:
            self._json(handler, 404, self._status(404, "NotFound", "not found"))
        else:
            self._json(handler, 200, obj)

    def _selected(self, pod: dict[str, Any], query: dict[str, str]) -> bool:
        selector = query.get("fieldSelector", "")
        if self.ignore_field_selector:
            return True
        if selector.startswith("spec.nodeName="):
            return bool(pod["spec"].get("nodeName") == selector[len("spec.nodeName="):])
        return True

    def _pods(self, handler: BaseHTTPRequestHandler, query: dict[str, str],
              kind: str = "Pod") -> None:
        with self.cond:
            hang, fail = self.hang, self.fail_status
            generation = self._close_watches
        if hang:
            with self.cond:
                self.cond.wait_for(lambda: not self.hang or self._close_watches != generation,
                                   timeout=30)
            handler.close_connection = True  # gave up without answering: hang up
            return
        if fail is not None:
            self._json(handler, fail, self._status(fail, "InternalError", "injected failure"))
            return
        if query.get("watch") in ("true", "1"):
            self._watch(handler, query, kind)
            return
        with self.cond:
            items = [p for p in self.pods.values()
                     if p.get("kind", "Pod") == kind and self._selected(p, query)]
            body = {"kind": f"{kind}List", "apiVersion": "v1",
                    "metadata": {"resourceVersion": str(self.rv)}, "items": items}
        self._json(handler, 200, body)

    def _watch_ready(self, generation: int, bookmarks_seen: int, sent_rv: int) -> bool:
        return (self._close_watches != generation
                or self._bookmark_pending != bookmarks_seen
                or (not self.hang_watch and any(rv > sent_rv for rv, _, _ in self.events)))

    def _watch(self, handler: BaseHTTPRequestHandler, query: dict[str, str],
               object_kind: str = "Pod") -> None:
        start_rv = int(query.get("resourceVersion") or "0")
        timeout = float(query.get("timeoutSeconds") or "30")
        with self.cond:
            gone = start_rv < self.compacted_below
        if gone and self.gone_as_http:
            self._json(handler, 410, self._status(410, "Expired", "too old resource version"))
            return
        handler.send_response(200)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()

        def send(event: dict[str, Any]) -> None:
            data = (json.dumps(event) + "\n").encode()
            handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
            handler.wfile.flush()

        try:
            if gone:
                send({"type": "ERROR", "object": self._status(
                    410, "Expired", "too old resource version")})
                handler.wfile.write(b"0\r\n\r\n")
                return
            deadline = time.monotonic() + timeout
            sent_rv = start_rv
            with self.cond:
                generation = self._close_watches
                bookmarks_seen = self._bookmark_pending
                self.watching += 1  # from here on a bookmark() reaches this stream
            while True:
                with self.cond:
                    self.cond.wait_for(
                        functools.partial(self._watch_ready, generation, bookmarks_seen,
                                          sent_rv),
                        timeout=max(deadline - time.monotonic(), 0))
                    if self._close_watches != generation or time.monotonic() >= deadline:
                        break
                    pending = [] if self.hang_watch else [
                        (rv, kind, obj) for rv, kind, obj in self.events
                        if rv > sent_rv and obj.get("kind", "Pod") == object_kind
                        and self._selected(obj, query)]
                    if not self.hang_watch:
                        sent_rv = max([sent_rv, *(rv for rv, _, _ in self.events)])
                    bookmark = self._bookmark_pending != bookmarks_seen
                    bookmarks_seen = self._bookmark_pending
                    current_rv = self.rv
                for _, kind, obj in pending:
                    send({"type": kind, "object": obj})
                if bookmark and query.get("allowWatchBookmarks") == "true":
                    send({"type": "BOOKMARK", "object": {
                        "kind": object_kind, "apiVersion": "v1",
                        "metadata": {"resourceVersion": str(current_rv)}}})
            handler.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass


def write_kubeconfig(path: Path, server: str) -> Path:
    path.write_text(json.dumps({
        "apiVersion": "v1", "kind": "Config", "current-context": "fake",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "kwatt", "user": {"token": "test-token"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "kwatt"}}],
    }))
    return path
