"""Names for workload cgroups: the labels a container's energy series carries."""

from __future__ import annotations

import json
import os
from typing import Protocol

from kwatt.ledger import WorkloadLabels
from kwatt.text import clean_text
from kwatt.workloads.cgroups import CgroupIdentity

POD_SANDBOX_CONTAINER = "POD"  # cAdvisor's name for the pod-level (sandbox) cgroup
_MAX_DOCKER_CONFIG_BYTES = 1 << 20  # a container's config.v2.json is a few KiB


class WorkloadNamer(Protocol):
    """Maps a cgroup identity to labels; None means "not known yet, hold the energy"."""

    def name(self, identity: CgroupIdentity) -> WorkloadLabels | None: ...

    def cpu_request(self, identity: CgroupIdentity) -> float:
        """Cores requested (0 when unknown); weight of the cpu-request idle policy."""
        ...


class HostNamer:
    """Names from the cgroup path alone: host mode, or Kubernetes without API access.

    Kubernetes containers get their pod UID as ``pod`` and a 12-character container id as
    ``container``; systemd services their unit name; Docker containers the name in
    ``<docker_root>/containers/<id>/config.v2.json`` when that is readable, else their
    12-character id (Podman containers always the id).
    """

    def __init__(self, docker_root: str | None = None) -> None:
        self._docker_root = docker_root
        self._docker_names: dict[str, str] = {}

    def _docker_name(self, container_id: str) -> str:
        name = self._docker_names.get(container_id)
        if name is None:
            name = container_id[:12]
            if self._docker_root is not None:
                path = os.path.join(self._docker_root, "containers", container_id,
                                    "config.v2.json")
                try:
                    with open(path, "rb") as handle:
                        found = json.loads(handle.read(_MAX_DOCKER_CONFIG_BYTES)).get("Name", "")
                    if isinstance(found, str) and found.strip("/"):
                        name = clean_text(found.strip("/"))
                except (OSError, ValueError, AttributeError, RecursionError):
                    # No access to Docker's state, or state kwatt cannot read (truncated at
                    # the bound, nested too deep): the short id is still a stable name.
                    pass
            if len(self._docker_names) > 10000:  # bounded: churned containers age out
                self._docker_names.clear()
            self._docker_names[container_id] = name
        return name

    def name(self, identity: CgroupIdentity) -> WorkloadLabels | None:
        short = identity.container_id[:12]
        if identity.kind == "container":
            return WorkloadLabels("", identity.pod_uid, short, "", "")
        if identity.kind == "pod":
            return WorkloadLabels("", identity.pod_uid, POD_SANDBOX_CONTAINER, "", "")
        if identity.kind == "docker":
            name = self._docker_name(identity.container_id)
            return WorkloadLabels("", "", name, name, "docker")
        if identity.kind == "podman":
            return WorkloadLabels("", "", short, short, "podman")
        unit = clean_text(identity.name)  # a cgroup name may be any bytes
        return WorkloadLabels("", "", unit, unit, "systemd")

    def cpu_request(self, identity: CgroupIdentity) -> float:
        return 0.0
