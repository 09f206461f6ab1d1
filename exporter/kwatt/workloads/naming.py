"""Names for workload cgroups: the labels a container's energy series carries."""

from __future__ import annotations

from typing import Protocol

from kwatt.ledger import WorkloadLabels
from kwatt.workloads.cgroups import CgroupIdentity

POD_SANDBOX_CONTAINER = "POD"  # cAdvisor's name for the pod-level (sandbox) cgroup


class WorkloadNamer(Protocol):
    """Maps a cgroup identity to labels; None means "not known yet, hold the energy"."""

    def name(self, identity: CgroupIdentity) -> WorkloadLabels | None: ...

    def cpu_request(self, identity: CgroupIdentity) -> float:
        """Cores requested (0 when unknown); weight of the cpu-request idle policy."""
        ...


class HostNamer:
    """Names from the cgroup path alone: host mode, or Kubernetes without API access.

    Kubernetes containers get their pod UID as ``pod`` and a 12-character container id as
    ``container``; Docker and Podman containers their 12-character id; systemd services
    their unit name.
    """

    def name(self, identity: CgroupIdentity) -> WorkloadLabels | None:
        short = identity.container_id[:12]
        if identity.kind == "container":
            return WorkloadLabels("", identity.pod_uid, short, "", "")
        if identity.kind == "pod":
            return WorkloadLabels("", identity.pod_uid, POD_SANDBOX_CONTAINER, "", "")
        if identity.kind in ("docker", "podman"):
            return WorkloadLabels("", "", short, short, identity.kind)
        return WorkloadLabels("", "", identity.name, identity.name, "systemd")

    def cpu_request(self, identity: CgroupIdentity) -> float:
        return 0.0
