"""Workload cgroups and their cumulative CPU time, for cgroup v1 and v2.

Path shapes recognised (systemd and cgroupfs drivers; containerd, CRI-O, Docker):

    /kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid_>.slice/cri-containerd-<id>.scope
    /kubepods.slice/kubepods-pod<uid_>.slice/crio-<id>.scope          (guaranteed QoS)
    /kubepods/besteffort/pod<uid>/<id>                                 (cgroupfs driver)
    /kubepods/burstable/pod<uid>/crio-<id>
    /system.slice/docker-<id>.scope, /docker/<id>                      (Docker outside Kubernetes)
    /system.slice/<unit>.service                                       (systemd services)

CPU time is hierarchical: a pod's counter includes its containers'. Each workload cgroup is
returned with the path of the nearest enclosing workload cgroup, so the sampler can charge a
pod only what its containers did not use (the sandbox, conmon, exited containers).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from kwatt.faults import Fault, reason_for_oserror
from kwatt.text import clean_text

SOURCE = "cgroup"
_MAX_DEPTH = 24

_HEX_ID = r"[0-9a-f]{64}"
_UID = r"[0-9a-f]{8}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{4}[-_][0-9a-f]{12}"
# A custom kubelet --cgroup-root prefixes the slices (kind: kubelet-kubepods-...slice).
_SYSTEMD_POD = re.compile(
    rf"^(?:[a-z0-9]+-)?kubepods(?:-(burstable|besteffort))?-pod({_UID})\.slice$")
_SYSTEMD_QOS = re.compile(r"^(?:[a-z0-9]+-)?kubepods-(burstable|besteffort)\.slice$")
_CGROUPFS_POD = re.compile(rf"^pod({_UID})$")
_SYSTEMD_CONTAINER = re.compile(rf"^(cri-containerd|crio|docker)-({_HEX_ID})\.scope$")
_CGROUPFS_CONTAINER = re.compile(rf"^(?:(crio)-)?({_HEX_ID})$")
_PODMAN = re.compile(rf"^libpod-({_HEX_ID})\.scope$")
_RUNTIME = {"cri-containerd": "containerd", "crio": "cri-o", "docker": "docker"}


@dataclass(frozen=True)
class CgroupIdentity:
    """What a cgroup is, as far as its path can say.

    kind: ``container`` and ``pod`` (Kubernetes), ``docker``, ``podman``, ``service``.
    """

    kind: str
    pod_uid: str = ""
    container_id: str = ""
    runtime: str = ""  # containerd, cri-o, docker, podman; "" when the path does not say
    qos: str = ""  # guaranteed, burstable, besteffort
    name: str = ""  # systemd unit name


@dataclass(frozen=True)
class CgroupUsage:
    path: str  # cgroup path relative to the hierarchy root, starting with "/"
    identity: CgroupIdentity
    parent: str | None  # path of the nearest enclosing workload cgroup, if any
    usage_seconds: float


@dataclass(frozen=True)
class CgroupLayout:
    version: int  # 1 or 2
    root: str  # directory of the hierarchy that carries CPU accounting


@dataclass(frozen=True)
class CgroupScan:
    cgroups: tuple[CgroupUsage, ...]
    faults: tuple[Fault, ...]


def detect_cgroup_layout(sysfs: str) -> CgroupLayout | None:
    base = os.path.join(sysfs, "fs", "cgroup")
    if os.path.exists(os.path.join(base, "cgroup.controllers")):
        return CgroupLayout(2, base)
    for name in ("cpu,cpuacct", "cpuacct", "cpuacct,cpu"):
        candidate = os.path.join(base, name)
        if os.path.exists(os.path.join(candidate, "cpuacct.usage")):
            return CgroupLayout(1, candidate)
    return None


def _qos_from_component(component: str) -> str | None:
    if component in ("burstable", "besteffort"):
        return component
    match = _SYSTEMD_QOS.match(component)
    return match.group(1) if match else None


def _is_kubepods(component: str) -> bool:
    return component.startswith("kubepods") or "-kubepods" in component


def classify_cgroup(components: list[str], in_kubepods: bool, qos: str,
                    pod_uid: str) -> CgroupIdentity | None:
    """Identity of the last path component, given what the ancestors established."""
    name = components[-1]
    if in_kubepods:
        if not pod_uid:
            match = _SYSTEMD_POD.match(name) or _CGROUPFS_POD.match(name)
            if match is None:
                return None
            uid = match.group(match.lastindex or 1).replace("_", "-")
            return CgroupIdentity("pod", pod_uid=uid, qos=qos or "guaranteed")
        match = _SYSTEMD_CONTAINER.match(name)
        if match is not None:
            return CgroupIdentity("container", pod_uid=pod_uid, container_id=match.group(2),
                                  runtime=_RUNTIME[match.group(1)], qos=qos or "guaranteed")
        match = _CGROUPFS_CONTAINER.match(name)
        if match is not None:
            return CgroupIdentity("container", pod_uid=pod_uid, container_id=match.group(2),
                                  runtime="cri-o" if match.group(1) else "",
                                  qos=qos or "guaranteed")
        return None  # crio-conmon-<id>.scope and the like: charged to the pod itself
    match = _SYSTEMD_CONTAINER.match(name)
    if match is not None and match.group(1) == "docker":
        return CgroupIdentity("docker", container_id=match.group(2), runtime="docker")
    match = _PODMAN.match(name)
    if match is not None:
        return CgroupIdentity("podman", container_id=match.group(1), runtime="podman")
    if len(components) >= 2 and components[-2] == "docker" and re.fullmatch(_HEX_ID, name):
        return CgroupIdentity("docker", container_id=name, runtime="docker")
    if name.endswith(".service"):
        return CgroupIdentity("service", name=name)
    return None


def identify_cgroup_path(path: str) -> CgroupIdentity | None:
    """Identity of a whole cgroup path, e.g. from /proc/<pid>/cgroup.

    The deepest workload cgroup on the path wins, as in ``scan_cgroups``: a process in a
    container's own sub-cgroup belongs to the container, one in a pod's unrecognised child
    (crio-conmon-<id>.scope) to the pod.
    """
    components = [c for c in path.split("/") if c]
    in_kubepods = False
    qos = ""
    pod_uid = ""
    identity: CgroupIdentity | None = None
    for depth in range(len(components)):
        component = components[depth]
        if _is_kubepods(component):
            in_kubepods = True
        qos = _qos_from_component(component) or qos
        found = classify_cgroup(components[: depth + 1], in_kubepods, qos, pod_uid)
        if found is None:
            continue
        identity = found
        if found.kind == "pod":
            pod_uid = found.pod_uid
            qos = found.qos
        elif found.kind in ("container", "docker", "podman"):
            break  # a container's inner cgroups are its own business
    return identity


def _read_usage_seconds(directory: str, version: int) -> float:
    """Cumulative CPU seconds of one cgroup. Raises OSError or ValueError."""
    if version == 2:
        with open(os.path.join(directory, "cpu.stat"), "rb") as handle:
            data = handle.read(4096)
        for line in data.splitlines():
            if line.startswith(b"usage_usec "):
                value = int(line[len(b"usage_usec "):])
                break
        else:
            raise ValueError("no usage_usec line in cpu.stat")
        if value < 0:
            raise ValueError(f"negative usage_usec {value}")
        return value / 1e6
    with open(os.path.join(directory, "cpuacct.usage"), "rb") as handle:
        ns = int(handle.read(64))
    if ns < 0:
        raise ValueError(f"negative cpuacct.usage {ns}")
    return ns / 1e9


def scan_cgroups(layout: CgroupLayout, *, include_host_units: bool) -> CgroupScan:
    """Walk the hierarchy and read the CPU time of every workload cgroup.

    ``include_host_units``: also report systemd services, Docker and Podman containers
    (host mode). In Kubernetes mode those are left to the node's ``system`` share.
    A cgroup removed while it is being read is normal churn and is skipped quietly.
    """
    results: list[CgroupUsage] = []
    faults: list[Fault] = []
    # (directory, path components, in_kubepods, qos, pod uid, nearest workload path)
    stack: list[tuple[str, list[str], bool, str, str, str | None]] = [
        (layout.root, [], False, "", "", None)]
    while stack:
        directory, components, in_kubepods, qos, pod_uid, parent = stack.pop()
        try:
            entries = [e.name for e in os.scandir(directory) if e.is_dir(follow_symlinks=False)]
        except FileNotFoundError:
            continue
        except OSError as exc:
            faults.append(Fault(SOURCE, reason_for_oserror(exc),
                                clean_text("/" + "/".join(components)),
                                exc.strerror or str(exc)))
            continue
        for name in entries:
            child = [*components, name]
            child_kubepods = in_kubepods or _is_kubepods(name)
            child_qos = _qos_from_component(name) or qos
            identity = classify_cgroup(child, child_kubepods, child_qos, pod_uid)
            child_dir = os.path.join(directory, name)
            child_parent = parent
            if identity is not None and (child_kubepods or include_host_units):
                path = "/" + "/".join(child)
                try:
                    usage = _read_usage_seconds(child_dir, layout.version)
                except FileNotFoundError:
                    continue
                except OSError as exc:
                    if exc.errno == 19:  # ENODEV: cgroup being removed
                        continue
                    faults.append(Fault(SOURCE, reason_for_oserror(exc), clean_text(path),
                                        exc.strerror or str(exc)))
                    continue
                except ValueError as exc:
                    faults.append(Fault(SOURCE, "parse", clean_text(path), str(exc)))
                    continue
                results.append(CgroupUsage(path, identity, parent, usage))
                if identity.kind in ("container", "docker", "podman"):
                    continue  # a container's inner cgroups are its own business
                child_parent = path
            if len(child) < _MAX_DEPTH:
                child_pod = identity.pod_uid if identity is not None and identity.kind == "pod" \
                    else pod_uid
                child_qos = identity.qos if identity is not None and identity.kind == "pod" \
                    else child_qos
                stack.append((child_dir, child, child_kubepods, child_qos, child_pod,
                              child_parent))
    return CgroupScan(tuple(results), tuple(faults))
