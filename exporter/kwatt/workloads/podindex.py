"""The pods of this node as an immutable index, and the namer that reads it.

The watcher thread is the only writer: every change builds a new ``PodIndex`` and swaps the
reference, so the sampler and the scrape path read a consistent index without locks or I/O.

Deleted pods stay in the index as tombstones for the retention window (bounded in number),
so a cgroup that is scanned after its pod's DELETED event, or a finished container known
only by id until now, still gets its pod's names.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any

from kwatt.ledger import WorkloadLabels
from kwatt.text import clean_text
from kwatt.workloads.cgroups import CgroupIdentity
from kwatt.workloads.naming import POD_SANDBOX_CONTAINER, HostNamer
from kwatt.workloads.owners import Owner, OwnerResolution, OwnerSource
from kwatt.workloads.owners import resolve as resolve_owners

__all__ = [
    "KubernetesNamer",
    "Owner",
    "OwnerResolver",
    "PodIndex",
    "PodRecord",
    "PodStore",
    "pod_record",
]

# Bound on deleted pods remembered for late naming; each costs well under 2 KiB.
MAX_TOMBSTONES = 2048

_CONTAINER_ID = re.compile(r"^(?:containerd|cri-o|docker)://([0-9a-f]{64})$")
_CPU_QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:e([+-]?[0-9]+))?(n|u|m|k|M|G|)$")
_CPU_SUFFIX = {"n": 1e-9, "u": 1e-6, "m": 1e-3, "": 1.0, "k": 1e3, "M": 1e6, "G": 1e9}


def parse_cpu_quantity(text: str) -> float | None:
    """Cores from a Kubernetes CPU quantity ("500m", "2", "1.5", "250000u"); None if invalid."""
    match = _CPU_QUANTITY.match(text.strip())
    if match is None:
        return None
    number = float(match.group(1))
    if match.group(2):
        number *= 10.0 ** int(match.group(2))
    return number * _CPU_SUFFIX[match.group(3)]


def container_id_from_status(value: object) -> str | None:
    """64-hex id from a status containerID like "containerd://<id>", "cri-o://<id>"."""
    if not isinstance(value, str):
        return None
    match = _CONTAINER_ID.match(value.strip().lower())
    return match.group(1) if match else None


class OwnerResolver(OwnerSource):
    """Names a pod's workload: the top of its controlling owners (owners.py). This base
    reads no owner, so name and label rules answer: ReplicaSet -> Deployment when the
    ReplicaSet name ends with "-" + the pod's ``pod-template-hash``; Job -> CronJob when
    the Job name ends in "-<8 or more digits>" (the CronJob controller names Jobs
    "<cronjob>-<minutes since epoch>"); operator labels (JobSet, LeaderWorkerSet, KServe).
    ``podwatch.ApiOwnerResolver`` reads each owner's metadata from the API instead.
    """

    def resolve(self, pod: Mapping[str, Any]) -> OwnerResolution:
        return resolve_owners(pod, self)


@dataclass(frozen=True)
class PodRecord:
    uid: str
    namespace: str
    name: str
    workload: str
    workload_kind: str
    qos_class: str
    owner_name: str  # the pod's own controller (a Job, a StatefulSet), "" for a bare pod
    owner_kind: str
    labels: tuple[tuple[str, str], ...]  # allowlisted pod labels present on the pod
    containers: tuple[tuple[str, str], ...]  # (container id, container name)
    cpu_requests: tuple[tuple[str, float], ...]  # (container name, cores)
    resource_version: str = ""
    deleted_at: float | None = None

    def cpu_request(self, container: str) -> float:
        for name, cores in self.cpu_requests:
            if name == container:
                return cores
        return 0.0


def _label(value: object) -> str:
    """An API string as a label value: JSON may carry lone surrogates ("\\ud800"), which
    would make the whole exposition unencodable; they become U+FFFD."""
    return clean_text(str(value))


def pod_record(pod: Mapping[str, Any], owners: OwnerResolver,
               label_allowlist: tuple[str, ...]) -> PodRecord | None:
    """The parts of a Pod object kwatt uses, every string label-safe; None when it has no
    uid."""
    metadata = pod.get("metadata") or {}
    uid = metadata.get("uid")
    if not isinstance(uid, str) or not uid:
        return None
    spec = pod.get("spec") or {}
    status = pod.get("status") or {}
    containers: dict[str, str] = {}
    for key in ("initContainerStatuses", "containerStatuses", "ephemeralContainerStatuses"):
        for entry in status.get(key) or []:
            if not isinstance(entry, Mapping):
                continue
            cname = _label(entry.get("name", ""))
            # A restarted container's previous cgroup may still be retained in the ledger.
            last = (entry.get("lastState") or {}).get("terminated") or {}
            for raw in (last.get("containerID"), entry.get("containerID")):
                cid = container_id_from_status(raw)
                if cid is not None:
                    containers[cid] = cname
    requests: list[tuple[str, float]] = []
    for key in ("initContainers", "containers"):
        for entry in spec.get(key) or []:
            if not isinstance(entry, Mapping):
                continue
            raw_cpu = ((entry.get("resources") or {}).get("requests") or {}).get("cpu")
            cores = parse_cpu_quantity(raw_cpu) if isinstance(raw_cpu, str) else None
            if isinstance(raw_cpu, int | float) and not isinstance(raw_cpu, bool):
                cores = float(raw_cpu)
            if cores is not None and cores > 0:
                requests.append((_label(entry.get("name", "")), cores))
    labels = metadata.get("labels") or {}
    allowed = tuple((k, _label(labels[k])) for k in label_allowlist
                    if isinstance(labels, Mapping) and k in labels)
    owner = owners.resolve(pod)
    return PodRecord(
        uid=_label(uid), namespace=_label(metadata.get("namespace", "")),
        name=_label(metadata.get("name", "")), workload=_label(owner.workload.name),
        workload_kind=_label(owner.workload.kind), owner_name=_label(owner.owner.name),
        owner_kind=_label(owner.owner.kind),
        qos_class=_label(status.get("qosClass", "")), labels=allowed,
        containers=tuple(sorted(containers.items())), cpu_requests=tuple(requests),
        resource_version=str(metadata.get("resourceVersion", "")))


@dataclass(frozen=True)
class PodIndex:
    """One consistent view of the node's pods. Never mutated after construction."""

    pods: Mapping[str, PodRecord]  # uid -> pod, tombstones included
    containers: Mapping[str, tuple[str, str]]  # container id -> (pod uid, container name)
    synced: bool = False  # a full list has been applied at least once


EMPTY_INDEX = PodIndex(MappingProxyType({}), MappingProxyType({}))


class PodStore:
    """Builds successive PodIndex values. One writer thread; readers call ``current()``."""

    def __init__(self, retention_seconds: float, clock: Callable[[], float],
                 max_tombstones: int = MAX_TOMBSTONES) -> None:
        self._retention = retention_seconds
        self._clock = clock
        self._max_tombstones = max_tombstones
        self._index = EMPTY_INDEX
        self._write = threading.Lock()  # writers are one thread; tests may call directly
        self.changes = 0

    def current(self) -> PodIndex:
        return self._index

    def _publish(self, pods: dict[str, PodRecord], synced: bool) -> None:
        containers: dict[str, tuple[str, str]] = {}
        # Live pods win over tombstones when a container id appears in both.
        for record in sorted(pods.values(), key=lambda r: r.deleted_at is None):
            for cid, cname in record.containers:
                containers[cid] = (record.uid, cname)
        self._index = PodIndex(MappingProxyType(pods), MappingProxyType(containers), synced)
        self.changes += 1

    def _prune(self, pods: dict[str, PodRecord]) -> None:
        now = self._clock()
        tombstones = sorted((r.deleted_at, uid) for uid, r in pods.items()
                            if r.deleted_at is not None)
        overflow = len(tombstones) - self._max_tombstones
        for index, (deleted_at, uid) in enumerate(tombstones):
            if index < overflow or now - deleted_at > self._retention:
                del pods[uid]

    def upsert(self, record: PodRecord) -> None:
        with self._write:
            pods = dict(self._index.pods)
            pods[record.uid] = record
            self._prune(pods)
            self._publish(pods, self._index.synced)

    def delete(self, record: PodRecord) -> None:
        """Tombstone a pod, keeping its final container ids for late naming."""
        with self._write:
            pods = dict(self._index.pods)
            pods[record.uid] = replace(record, deleted_at=self._clock())
            self._prune(pods)
            self._publish(pods, self._index.synced)

    def replace_all(self, records: list[PodRecord]) -> None:
        """Apply a full list: pods missing from it were deleted while we were not watching."""
        with self._write:
            now = self._clock()
            listed = {r.uid: r for r in records}
            pods = dict(listed)
            for uid, old in self._index.pods.items():
                if uid not in listed:
                    pods[uid] = old if old.deleted_at is not None else \
                        replace(old, deleted_at=now)
            self._prune(pods)
            self._publish(pods, True)

    def prune(self) -> None:
        with self._write:
            pods = dict(self._index.pods)
            before = len(pods)
            self._prune(pods)
            if len(pods) != before:
                self._publish(pods, self._index.synced)


class KubernetesNamer:
    """``WorkloadNamer`` over the pod index: no I/O, safe to call from the sampler.

    A container is named once its id appears in its pod's status (containerStatuses,
    initContainerStatuses - native sidecars included - or ephemeralContainerStatuses); the
    pod-level cgroup (sandbox, conmon, exited containers) is ``container="POD"``. Until then
    ``name`` returns None and the ledger keeps the energy under the cgroup identity.
    """

    def __init__(self, index: Callable[[], PodIndex]) -> None:
        self._index = index
        self._host = HostNamer()

    def _pod_labels(self, record: PodRecord, container: str) -> WorkloadLabels:
        return WorkloadLabels(record.namespace, record.name, container, record.workload,
                              record.workload_kind)

    def name(self, identity: CgroupIdentity) -> WorkloadLabels | None:
        index = self._index()
        if identity.kind == "container":
            found = index.containers.get(identity.container_id)
            if found is not None and found[0] == identity.pod_uid:
                return self._pod_labels(index.pods[found[0]], found[1])
            record = index.pods.get(identity.pod_uid)
            if record is not None and record.deleted_at is not None:
                # The pod's final status never listed this container (it died before the
                # kubelet reported it): its name will never come, its namespace is known.
                return self._pod_labels(record, identity.container_id[:12])
            return None
        if identity.kind == "pod":
            record = index.pods.get(identity.pod_uid)
            if record is None:
                return None
            return self._pod_labels(record, POD_SANDBOX_CONTAINER)
        return self._host.name(identity)

    def cpu_request(self, identity: CgroupIdentity) -> float:
        if identity.kind != "container":
            return 0.0
        index = self._index()
        found = index.containers.get(identity.container_id)
        if found is None:
            return 0.0
        return index.pods[found[0]].cpu_request(found[1])
