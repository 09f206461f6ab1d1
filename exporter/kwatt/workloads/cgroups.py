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

import errno
import logging
import os
import re
import resource
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from kwatt.faults import Fault, reason_for_oserror
from kwatt.text import clean_text

log = logging.getLogger("kwatt.cgroups")

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


def _parse_usage_seconds(data: bytes, version: int) -> float:
    """Cumulative CPU seconds from the text of cpu.stat (v2) or cpuacct.usage (v1).

    Raises ValueError."""
    if version == 2:
        if data.startswith(b"usage_usec "):
            at = 0
        else:
            at = data.find(b"\nusage_usec ")
            if at < 0:
                raise ValueError("no usage_usec line in cpu.stat")
            at += 1
        end = data.find(b"\n", at)
        value = int(data[at + len(b"usage_usec "):end if end >= 0 else None])
        if value < 0:
            raise ValueError(f"negative usage_usec {value}")
        return value / 1e6
    ns = int(data)
    if ns < 0:
        raise ValueError(f"negative cpuacct.usage {ns}")
    return ns / 1e9


def _counter_file(directory: str, version: int) -> str:
    return os.path.join(directory, "cpu.stat" if version == 2 else "cpuacct.usage")


def _read_usage_seconds(directory: str, version: int) -> float:
    """Cumulative CPU seconds of one cgroup. Raises OSError or ValueError."""
    with open(_counter_file(directory, version), "rb") as handle:
        return _parse_usage_seconds(handle.read(4096), version)


@dataclass(frozen=True)
class _Found:
    """A workload cgroup found by a walk of the hierarchy."""

    path: str
    identity: CgroupIdentity
    parent: str | None
    directory: str


def _walk(layout: CgroupLayout, include_host_units: bool
          ) -> tuple[list[_Found], list[Fault]]:
    """Every workload cgroup of the hierarchy, in a stable order, without reading it."""
    found: list[_Found] = []
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
                found.append(_Found(path, identity, parent, child_dir))
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
    return found, faults


# errnos of a read from a cgroup that is gone: kernfs answers ENODEV on a descriptor of a
# removed cgroup's file (verified by tests/test_cgroup_reader.py on the real cgroupfs).
_GONE = (errno.ENOENT, errno.ENODEV, errno.ESTALE)


_SPARE_DESCRIPTORS = 8  # given back when an open for holding fails with EMFILE


class _Removed(Exception):
    """A held cgroup file belongs to a cgroup that was removed: the tree changed."""


class CgroupReader:
    """Reads the CPU time of every workload cgroup, holding the counter files open.

    On cgroup v2 each cycle ``pread``s the held ``cpu.stat`` descriptors at offset 0 (kernfs
    regenerates the text on every read, so a held descriptor sees fresh values) and walks
    the tree again only when it may have changed:

    - the hierarchy root's ``cgroup.stat`` ``nr_descendants`` differs (a cgroup was
      created or removed anywhere below; directory mtimes cannot say it: kernfs does not
      update them on mkdir/rmdir, checked on this kernel);
    - a held descriptor answers ENODEV (its cgroup was removed; this also catches a
      removal and a creation in the same interval, which leave the count unchanged);
    - ``full_rescan_seconds`` passed since the last walk (a renamed cgroup keeps both the
      count and its descriptors; kubelet and runtimes never rename, so this is a backstop).

    Without ``nr_descendants`` (cgroup v1, fixture trees) nothing says the tree is
    unchanged, so every cycle walks it and reads each file by open/read, as before.

    Held descriptors count against RLIMIT_NOFILE: at most ``soft limit - reserve`` are held;
    the rest, and any whose open fails with EMFILE/ENFILE, are read by open/read/close.
    """

    def __init__(self, layout: CgroupLayout, *, include_host_units: bool,
                 full_rescan_seconds: float = 60.0,
                 clock: Callable[[], float] = time.monotonic,
                 reserve_descriptors: int = 512) -> None:
        self._layout = layout
        self._include_host_units = include_host_units
        self._full_rescan_seconds = full_rescan_seconds
        self._clock = clock
        self._reserve = reserve_descriptors
        self._found: list[_Found] = []
        self._fds: list[int] = []  # parallel to _found; -1: not held, read by open/read
        self._descendants: bytes | None = None
        self._stat_fd = -1
        self._walked_at: float | None = None
        self._short_logged = False
        self.walks = 0  # full walks of the tree, for tests and the benchmark
        self.unheld = 0  # cgroups read by open/read in the last cycle although held reading was on
        self.descriptor_shortfalls = 0  # times an open for holding failed with EMFILE/ENFILE

    @property
    def held(self) -> int:
        return sum(1 for fd in self._fds if fd >= 0)

    def close(self) -> None:
        self._release()
        if self._stat_fd >= 0:
            os.close(self._stat_fd)
            self._stat_fd = -1

    def _release(self) -> None:
        for fd in self._fds:
            if fd >= 0:
                os.close(fd)
        self._fds = []
        self._found = []

    def _nr_descendants(self) -> bytes | None:
        """The root's descendant count as raw text, or None where the kernel has none."""
        if self._layout.version != 2:
            return None
        try:
            if self._stat_fd < 0:
                self._stat_fd = os.open(os.path.join(self._layout.root, "cgroup.stat"),
                                        os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(self._stat_fd, 4096, 0)
        except OSError:
            return None
        at = data.find(b"nr_descendants ")
        if at != 0:
            return None
        return data[:data.find(b"\n")]

    def scan(self) -> CgroupScan:
        descendants = self._nr_descendants()
        now = self._clock()
        if (descendants is None or descendants != self._descendants
                or self._walked_at is None
                or now - self._walked_at >= self._full_rescan_seconds):
            return self._rescan(descendants, now)
        try:
            return self._read_held()
        except _Removed:
            return self._rescan(self._nr_descendants(), now)

    def _read_held(self) -> CgroupScan:
        version = self._layout.version
        results: list[CgroupUsage] = []
        faults: list[Fault] = []
        for found, fd in zip(self._found, self._fds, strict=True):
            try:
                if fd >= 0:
                    usage = _parse_usage_seconds(os.pread(fd, 4096, 0), version)
                else:
                    usage = _read_usage_seconds(found.directory, version)
            except OSError as exc:
                if exc.errno in _GONE:
                    raise _Removed from exc
                faults.append(Fault(SOURCE, reason_for_oserror(exc), clean_text(found.path),
                                    exc.strerror or str(exc)))
                continue
            except ValueError as exc:
                faults.append(Fault(SOURCE, "parse", clean_text(found.path), str(exc)))
                continue
            results.append(CgroupUsage(found.path, found.identity, found.parent, usage))
        return CgroupScan(tuple(results), tuple(faults))

    def _rescan(self, descendants: bytes | None, now: float) -> CgroupScan:
        self._release()
        self.walks += 1
        found, faults = _walk(self._layout, self._include_host_units)
        hold = descendants is not None
        budget = _descriptor_budget(self._reserve) if hold else 0
        results: list[CgroupUsage] = []
        kept: list[_Found] = []
        fds: list[int] = []
        version = self._layout.version
        self.unheld = 0
        for item in found:
            fd = -1
            try:
                if hold and len(fds) - fds.count(-1) < budget:
                    fd = self._open_held(item)
                    if fd < 0:
                        # Out of descriptors: hold no more, and give back a few so that
                        # open/read (and the HTTP server) still find some.
                        budget = 0
                        self._give_back(fds, _SPARE_DESCRIPTORS)
                if fd >= 0:
                    data = os.pread(fd, 4096, 0)
                else:
                    if hold:
                        self.unheld += 1
                    with open(_counter_file(item.directory, version), "rb") as handle:
                        data = handle.read(4096)
                usage = _parse_usage_seconds(data, version)
            except OSError as exc:
                if fd >= 0:
                    os.close(fd)
                if exc.errno in _GONE:
                    continue  # removed while being read: normal churn, skipped quietly
                faults.append(Fault(SOURCE, reason_for_oserror(exc), clean_text(item.path),
                                    exc.strerror or str(exc)))
                continue
            except ValueError as exc:
                if fd >= 0:
                    os.close(fd)
                faults.append(Fault(SOURCE, "parse", clean_text(item.path), str(exc)))
                continue
            kept.append(item)
            fds.append(fd)
            results.append(CgroupUsage(item.path, item.identity, item.parent, usage))
        if self.unheld and not self._short_logged:
            self._short_logged = True
            log.warning("cannot hold every cgroup counter file open: reading the rest by "
                        "open/read (slower, same values); raise the open-files limit",
                        extra={"held": len(fds) - fds.count(-1), "unheld": self.unheld})
        self._found, self._fds = kept, fds
        self._descendants = descendants
        self._walked_at = now
        return CgroupScan(tuple(results), tuple(faults))

    def _give_back(self, fds: list[int], count: int) -> None:
        for at in range(len(fds) - 1, -1, -1):
            if count == 0:
                return
            if fds[at] >= 0:
                os.close(fds[at])
                fds[at] = -1
                self.unheld += 1
                count -= 1

    def _open_held(self, item: _Found) -> int:
        try:
            return os.open(_counter_file(item.directory, self._layout.version),
                           os.O_RDONLY | os.O_CLOEXEC)
        except OSError as exc:
            if exc.errno in (errno.EMFILE, errno.ENFILE):
                self.descriptor_shortfalls += 1
                return -1
            raise


def _descriptor_budget(reserve: int) -> int:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 1 << 20
    return max(soft - reserve, 0)


# One reader per hierarchy and mode, behind the call the sampler makes: it holds the
# descriptors across cycles. Bounded, so that tests building many fixture trees do not
# accumulate descriptors.
_READERS: OrderedDict[tuple[CgroupLayout, bool], CgroupReader] = OrderedDict()
_READERS_LOCK = threading.Lock()
_MAX_READERS = 4


def scan_cgroups(layout: CgroupLayout, *, include_host_units: bool) -> CgroupScan:
    """The CPU time of every workload cgroup, read through the hierarchy's CgroupReader.

    ``include_host_units``: also report systemd services, Docker and Podman containers
    (host mode). In Kubernetes mode those are left to the node's ``system`` share.
    A cgroup removed while it is being read is normal churn and is skipped quietly.
    """
    key = (layout, include_host_units)
    with _READERS_LOCK:
        reader = _READERS.pop(key, None)
        if reader is None:
            reader = CgroupReader(layout, include_host_units=include_host_units)
        _READERS[key] = reader
        while len(_READERS) > _MAX_READERS:
            _, evicted = _READERS.popitem(last=False)
            evicted.close()
        return reader.scan()
