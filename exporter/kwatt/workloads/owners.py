"""From a pod to the object its user created: the walk up controller ownerReferences.

A pod's ``workload`` is the top of its chain of controlling owners, e.g.
Pod -> Job -> JobSet -> TrainJob names the TrainJob. Each step reads one owner's metadata
(``OwnerSource.parent``); the walk stops at an object without a controller, at an owner
that is gone, at the depth cap, at a cycle, or where the owner cannot be read (kind not
looked up, RBAC refusal, API trouble). Where the walk could not read its top, operator
labels and name rules answer instead (``_fallback``).

This module does no I/O: ``podwatch.ApiOwnerResolver`` is the source that asks the API.
Operator facts (who owns whom, which labels) are cited in docs/kubernetes.md.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Longest chain walked above the pod's own owner; real chains are at most 5 deep
# (Pod -> ReplicaSet -> Deployment -> Revision -> Configuration -> Service).
MAX_OWNER_DEPTH = 8

_CRONJOB_JOB_NAME = re.compile(r"^(.+)-([0-9]{8,})$")


@dataclass(frozen=True)
class Owner:
    """The workload a pod belongs to: ``workload`` and ``workload_kind`` labels."""

    name: str
    kind: str


@dataclass(frozen=True)
class ObjectRef:
    """One ownerReference: enough to GET the object and to tell a recreated one apart."""

    api_version: str
    kind: str
    name: str
    uid: str = ""

    @property
    def group(self) -> str:
        return self.api_version.rpartition("/")[0]


@dataclass(frozen=True)
class Lookup:
    """What reading an owner's metadata told: ``state`` is

    * ``parent``: it has a controller, ``parent``;
    * ``top``: it has no controller: it is the workload;
    * ``gone``: it no longer exists (404, or the name now belongs to another uid) and no
      owner of it was known: the workload as named by the reference, or by name rules;
    * ``unknown``: it was not read (kind not looked up, forbidden, API trouble).
    """

    state: str
    parent: ObjectRef | None = None


UNKNOWN = Lookup("unknown")
TOP = Lookup("top")
GONE = Lookup("gone")


@dataclass(frozen=True)
class OwnerResolution:
    workload: Owner  # the top object: workload, workload_kind
    owner: Owner  # the pod's own controller (``Owner("", "")`` for a bare pod)
    exact: bool  # the top was read from the API (or is the pod itself), not guessed


# (API group, kind) -> resource, for the owners kwatt knows how to GET. Sources for each
# operator's chain are in docs/kubernetes.md.
KNOWN_OWNER_RESOURCES: dict[tuple[str, str], str] = {
    ("apps", "ReplicaSet"): "replicasets",
    ("apps", "Deployment"): "deployments",
    ("apps", "StatefulSet"): "statefulsets",
    ("apps", "DaemonSet"): "daemonsets",
    ("batch", "Job"): "jobs",
    ("batch", "CronJob"): "cronjobs",
    ("jobset.x-k8s.io", "JobSet"): "jobsets",
    ("trainer.kubeflow.org", "TrainJob"): "trainjobs",
    ("kubeflow.org", "PyTorchJob"): "pytorchjobs",
    ("kubeflow.org", "MPIJob"): "mpijobs",
    ("kubeflow.org", "TFJob"): "tfjobs",
    ("kubeflow.org", "XGBoostJob"): "xgboostjobs",
    ("kubeflow.org", "PaddleJob"): "paddlejobs",
    ("kubeflow.org", "JAXJob"): "jaxjobs",
    ("ray.io", "RayCluster"): "rayclusters",
    ("ray.io", "RayJob"): "rayjobs",
    ("ray.io", "RayService"): "rayservices",
    ("leaderworkerset.x-k8s.io", "LeaderWorkerSet"): "leaderworkersets",
    ("serving.kserve.io", "InferenceService"): "inferenceservices",
}

# What the exporter reads by default, and what the chart grants ``get`` on: the owners
# that sit between a pod and the object its user created.
DEFAULT_OWNER_LOOKUPS: tuple[str, ...] = (
    "replicasets.apps",
    "jobs.batch",
    "statefulsets.apps",
    "jobsets.jobset.x-k8s.io",
    "trainjobs.trainer.kubeflow.org",
    "pytorchjobs.kubeflow.org",
    "mpijobs.kubeflow.org",
    "rayclusters.ray.io",
    "rayjobs.ray.io",
    "rayservices.ray.io",
    "leaderworkersets.leaderworkerset.x-k8s.io",
    "inferenceservices.serving.kserve.io",
)


@dataclass(frozen=True)
class OwnerLookups:
    """The owner kinds the exporter reads, as RBAC names them: ``resource.group``."""

    entries: frozenset[tuple[str, str]]  # (resource, group)

    @classmethod
    def parse(cls, lookups: tuple[str, ...]) -> OwnerLookups:
        return cls(frozenset((entry.partition(".")[0], entry.partition(".")[2])
                             for entry in lookups))

    def resource(self, ref: ObjectRef) -> str | None:
        """The resource to GET for ``ref``, or None when its kind is not read. Kinds kwatt
        does not know are matched by the usual plural, the lower-case kind + "s"."""
        resource = KNOWN_OWNER_RESOURCES.get((ref.group, ref.kind), ref.kind.lower() + "s")
        return resource if (resource, ref.group) in self.entries else None


class OwnerSource:
    """Reads one owner's controller. This base reads nothing: name and label rules only."""

    def parent(self, namespace: str, ref: ObjectRef) -> Lookup:
        return UNKNOWN

    def cycle(self, namespace: str, ref: ObjectRef) -> None:
        """Called when a chain of ownerReferences loops back on itself."""


def controller_ref(metadata: Mapping[str, Any]) -> ObjectRef | None:
    """The controlling ownerReference (else the first one), or None."""
    refs = [r for r in metadata.get("ownerReferences") or [] if isinstance(r, Mapping)]
    chosen = next((r for r in refs if r.get("controller") is True), refs[0] if refs else None)
    if chosen is None:
        return None
    return ObjectRef(str(chosen.get("apiVersion", "")), str(chosen.get("kind", "")),
                     str(chosen.get("name", "")), str(chosen.get("uid", "")))


def resolve(pod: Mapping[str, Any], source: OwnerSource,
            max_depth: int = MAX_OWNER_DEPTH) -> OwnerResolution:
    metadata = pod.get("metadata") or {}
    pod_name = str(metadata.get("name", ""))
    namespace = str(metadata.get("namespace", ""))
    labels = metadata.get("labels") or {}
    if not isinstance(labels, Mapping):
        labels = {}
    first = controller_ref(metadata)
    if first is None:
        return _with_labels(OwnerResolution(Owner(pod_name, "Pod"), Owner("", ""), True),
                            labels, ())
    immediate = Owner(first.name, first.kind)
    if first.kind == "Node":  # mirror pod of a static pod
        return OwnerResolution(Owner(pod_name, "StaticPod"), immediate, True)
    chain = [first]
    seen = {(first.kind, first.name)}
    exact = False
    current = first
    for _ in range(max_depth):
        found = source.parent(namespace, current)
        if found.state == "top":
            exact = True
            break
        if found.state == "gone":
            break  # named by the reference; a ReplicaSet or Job gone: the name rules
        if found.state != "parent" or found.parent is None:
            break
        parent = found.parent
        if (parent.kind, parent.name) in seen:
            source.cycle(namespace, parent)
            exact = True  # the loop is the API's answer; stop where it closes
            break
        seen.add((parent.kind, parent.name))
        chain.append(parent)
        current = parent
    top = Owner(current.name or pod_name, current.kind or "Pod")
    resolution = OwnerResolution(top, immediate, exact)
    if not exact:
        resolution = _fallback(resolution, chain, labels)
    return _with_labels(resolution, labels, chain)


def _label(labels: Mapping[str, Any], key: str) -> str:
    value = labels.get(key)
    return value if isinstance(value, str) else ""


def _with_labels(resolution: OwnerResolution, labels: Mapping[str, Any],
                 chain: list[ObjectRef] | tuple[()]) -> OwnerResolution:
    """KServe: a predictor's chain may pass Knative (Service -> Configuration -> Revision ->
    Deployment), which kwatt does not walk; every InferenceService pod carries the label
    ``serving.kserve.io/inferenceservice`` (KServe's predictor, transformer and explainer
    object metadata), in serverless and raw deployment mode alike."""
    isvc = _label(labels, "serving.kserve.io/inferenceservice")
    if isvc and resolution.workload.kind != "InferenceService":
        return OwnerResolution(Owner(isvc, "InferenceService"), resolution.owner,
                               resolution.exact)
    return resolution


# Pod labels operators set, highest object first; used only when the walk could not read
# its top (RBAC, API trouble, or an owner kwatt does not read, such as a LeaderWorkerSet's
# leader Pod).
_LABEL_RULES = (
    ("leaderworkerset.sigs.k8s.io/name", "LeaderWorkerSet"),
    ("jobset.sigs.k8s.io/jobset-name", "JobSet"),
)


def _fallback(resolution: OwnerResolution, chain: list[ObjectRef],
              labels: Mapping[str, Any]) -> OwnerResolution:
    known = {(ref.kind, ref.name) for ref in chain}
    for key, kind in _LABEL_RULES:
        name = _label(labels, key)
        if name and (kind, name) not in known:
            return OwnerResolution(Owner(name, kind), resolution.owner, False)
        if name:
            break  # the walk reached that object already: its top is at least as high
    top = chain[-1]
    if len(chain) == 1 and top.kind == "ReplicaSet":
        template_hash = _label(labels, "pod-template-hash")
        if template_hash and top.name.endswith("-" + template_hash):
            return OwnerResolution(Owner(top.name[: -len(template_hash) - 1], "Deployment"),
                                   resolution.owner, False)
    if len(chain) == 1 and top.kind == "Job":
        match = _CRONJOB_JOB_NAME.match(top.name)
        if match is not None:
            return OwnerResolution(Owner(match.group(1), "CronJob"), resolution.owner, False)
    return resolution
