"""Real cgroup path shapes of Kubernetes containers, as /proc/<pid>/cgroup shows them.

Each row: the path, then the pod UID and container id ("" for the pod-level cgroup) it
must map to. Shapes come from nodes running the named runtime and kubelet cgroup driver.
"""

from __future__ import annotations

import pytest
from kwatt.workloads.cgroups import identify_cgroup_path

UID = "0a3b5c7d-1e2f-4a5b-8c9d-0e1f2a3b4c5d"
US = UID.replace("-", "_")  # systemd slice names carry the UID with underscores
CID = "4f1e8b2a9c3d7e6f5a4b3c2d1e0f9a8b7c6d5e4f3a2b1c0d9e8f7a6b5c4d3e2f"

ROWS = [
    # cgroup v2 (unified), systemd driver
    ("v2 systemd containerd burstable",
     f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{US}.slice/"
     f"cri-containerd-{CID}.scope", "container", "containerd", "burstable"),
    ("v2 systemd containerd besteffort",
     f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{US}.slice/"
     f"cri-containerd-{CID}.scope", "container", "containerd", "besteffort"),
    ("v2 systemd containerd guaranteed",
     f"/kubepods.slice/kubepods-pod{US}.slice/cri-containerd-{CID}.scope",
     "container", "containerd", "guaranteed"),
    ("v2 systemd cri-o burstable",
     f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{US}.slice/"
     f"crio-{CID}.scope", "container", "cri-o", "burstable"),
    ("v2 systemd cri-o guaranteed",
     f"/kubepods.slice/kubepods-pod{US}.slice/crio-{CID}.scope", "container", "cri-o",
     "guaranteed"),
    ("v2 systemd cri-dockerd besteffort",
     f"/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{US}.slice/"
     f"docker-{CID}.scope", "container", "docker", "besteffort"),
    ("v2 systemd cri-o conmon is the pod's",
     f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{US}.slice/"
     f"crio-conmon-{CID}.scope", "pod", "", "burstable"),
    ("v2 systemd pod slice",
     f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{US}.slice",
     "pod", "", "burstable"),
    ("v2 systemd process in a container's own sub-cgroup",
     f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{US}.slice/"
     f"crio-{CID}.scope/container", "container", "cri-o", "burstable"),
    ("v2 systemd kind node (kubelet --cgroup-root=/kubelet)",
     f"/kubelet.slice/kubelet-kubepods.slice/kubelet-kubepods-besteffort.slice/"
     f"kubelet-kubepods-besteffort-pod{US}.slice/cri-containerd-{CID}.scope",
     "container", "containerd", "besteffort"),
    # cgroup v2, cgroupfs driver
    ("v2 cgroupfs containerd burstable", f"/kubepods/burstable/pod{UID}/{CID}",
     "container", "", "burstable"),
    ("v2 cgroupfs containerd guaranteed", f"/kubepods/pod{UID}/{CID}", "container", "",
     "guaranteed"),
    ("v2 cgroupfs cri-o besteffort", f"/kubepods/besteffort/pod{UID}/crio-{CID}",
     "container", "cri-o", "besteffort"),
    # cgroup v1 (the path in the cpu,cpuacct hierarchy)
    ("v1 cgroupfs docker besteffort", f"/kubepods/besteffort/pod{UID}/{CID}", "container", "",
     "besteffort"),
    ("v1 cgroupfs docker guaranteed", f"/kubepods/pod{UID}/{CID}", "container", "",
     "guaranteed"),
    ("v1 systemd containerd burstable",
     f"/kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod{US}.slice/"
     f"cri-containerd-{CID}.scope", "container", "containerd", "burstable"),
    ("v1 systemd docker guaranteed",
     f"/kubepods.slice/kubepods-pod{US}.slice/docker-{CID}.scope", "container", "docker",
     "guaranteed"),
    ("v1 cgroupfs pod", f"/kubepods/burstable/pod{UID}", "pod", "", "burstable"),
]


@pytest.mark.parametrize(("path", "kind", "runtime", "qos"),
                         [row[1:] for row in ROWS], ids=[row[0] for row in ROWS])
def test_path_maps_to_pod_uid_and_container_id(path: str, kind: str, runtime: str,
                                               qos: str) -> None:
    identity = identify_cgroup_path(path)
    assert identity is not None
    assert identity.kind == kind
    assert identity.pod_uid == UID
    assert identity.container_id == (CID if kind == "container" else "")
    assert identity.runtime == runtime
    assert identity.qos == qos


@pytest.mark.parametrize("path", [
    "/system.slice/kubelet.service/foo",  # not a pod
    "/kubepods.slice/kubepods-burstable.slice",  # QoS slice, no pod
    "/kubepods/burstable",
    f"/user.slice/pod{UID}/{CID}",  # pod-shaped but outside kubepods
])
def test_non_pod_paths_are_not_pods(path: str) -> None:
    identity = identify_cgroup_path(path)
    assert identity is None or identity.kind not in ("container", "pod")
