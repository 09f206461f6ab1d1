"""Cgroup path shapes, hierarchy scans of committed fixture trees, and churn."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FIXTURES
from kwatt.workloads.cgroups import (
    CgroupIdentity,
    detect_cgroup_layout,
    identify_cgroup_path,
    scan_cgroups,
)
from simnode import SimulatedNode, container_id, pod_uid

UID = "0b5f4ac0-7f1e-4d9c-9c1d-5a0e7f3e2b11"
UID_ = UID.replace("-", "_")
CID = "8f2d" * 16

# Kubernetes shapes (every driver, runtime and QoS class) are in
# test_kubernetes_cgroup_paths.py; these are the host-mode ones.
PATHS = [
    (f"/system.slice/docker-{CID}.scope", "docker", "", CID, "docker", ""),
    (f"/docker/{CID}", "docker", "", CID, "docker", ""),
    (f"/machine.slice/libpod-{CID}.scope", "podman", "", CID, "podman", ""),
    ("/system.slice/nginx.service", "service", "", "", "", ""),
    ("/user.slice/user-1000.slice/session-4.scope", None, "", "", "", ""),
    ("/system.slice", None, "", "", "", ""),
]


@pytest.mark.parametrize(("path", "kind", "uid", "cid", "runtime", "qos"), PATHS)
def test_cgroup_path_shapes(path: str, kind: str | None, uid: str, cid: str, runtime: str,
                            qos: str) -> None:
    identity = identify_cgroup_path(path)
    if kind is None:
        assert identity is None
        return
    assert identity is not None
    assert (identity.kind, identity.pod_uid, identity.container_id, identity.runtime,
            identity.qos) == (kind, uid, cid, runtime, qos)


@pytest.mark.parametrize("tree", ["node-cgroup-v2-systemd", "node-cgroup-v2-cgroupfs",
                                  "node-cgroup-v1-systemd", "node-cgroup-v1-cgroupfs"])
def test_scan_finds_every_pod_and_container(tree: str) -> None:
    layout = detect_cgroup_layout(str(FIXTURES / tree / "sys"))
    assert layout is not None
    assert layout.version == (2 if "v2" in tree else 1)
    scan = scan_cgroups(layout, include_host_units=True)
    assert scan.faults == ()
    kinds: dict[str, set[str]] = {}
    for usage in scan.cgroups:
        kinds.setdefault(usage.identity.kind, set()).add(
            usage.identity.container_id or usage.identity.pod_uid or usage.identity.name)
    expected_containers = {container_id(f"{q}-{r}-{c}") for q in
                           ("guaranteed", "burstable", "besteffort")
                           for r in ("containerd", "cri-o", "docker")
                           for c in ("app", "sidecar")}
    assert kinds["container"] == expected_containers
    assert kinds["pod"] == {pod_uid(f"{q}-{r}") for q in ("guaranteed", "burstable",
                                                          "besteffort")
                            for r in ("containerd", "cri-o", "docker")}
    assert kinds["service"] == {"containerd.service", "kubelet.service"}
    assert kinds["docker"] == {container_id("plain-docker")}
    # Each container's parent is its pod, so the pod is charged only its own residue.
    by_path = {u.path: u for u in scan.cgroups}
    for usage in scan.cgroups:
        if usage.identity.kind == "container":
            assert usage.parent is not None
            assert by_path[usage.parent].identity.pod_uid == usage.identity.pod_uid


def test_kubernetes_mode_leaves_host_units_to_system() -> None:
    layout = detect_cgroup_layout(str(FIXTURES / "node-cgroup-v2-systemd" / "sys"))
    assert layout is not None
    scan = scan_cgroups(layout, include_host_units=False)
    assert {u.identity.kind for u in scan.cgroups} == {"pod", "container"}


def test_no_cgroupfs_is_none(tmp_path: Path) -> None:
    assert detect_cgroup_layout(str(tmp_path)) is None


def test_vanished_cgroup_is_quietly_skipped_and_garbage_is_a_fault(tmp_path: Path) -> None:
    node = SimulatedNode(tmp_path)
    pod = node.add_pod(pod_uid("x"))
    keep = node.add_container(pod, container_id("keep"))
    gone = node.add_container(pod, container_id("gone"))
    bad = node.add_container(pod, container_id("bad"))
    # A cgroup removed between the directory listing and the read: its cpu.stat is gone.
    (node.cgroup_root / gone.path.strip("/") / "cpu.stat").unlink()
    (node.cgroup_root / bad.path.strip("/") / "cpu.stat").write_text("usage_usec lots\n")
    layout = detect_cgroup_layout(str(node.sysfs))
    assert layout is not None
    scan = scan_cgroups(layout, include_host_units=True)
    ids = {u.identity.container_id for u in scan.cgroups if u.identity.kind == "container"}
    assert ids == {keep.container_id}
    assert [(f.source, f.reason, f.subject) for f in scan.faults] == [
        ("cgroup", "parse", bad.path)]


def test_identity_equality_between_scan_and_proc_pid_cgroup(tmp_path: Path) -> None:
    """GPU processes are matched by /proc/<pid>/cgroup: it must give the scanned identity."""
    node = SimulatedNode(tmp_path, driver="systemd")
    pod = node.add_pod(pod_uid("gpu"), "besteffort", "containerd")
    ctr = node.add_container(pod, container_id("gpu"))
    layout = detect_cgroup_layout(str(node.sysfs))
    assert layout is not None
    scanned = {u.path: u.identity for u in scan_cgroups(layout, include_host_units=True).cgroups}
    assert identify_cgroup_path(ctr.path) == scanned[ctr.path]
    assert identify_cgroup_path(ctr.path) == CgroupIdentity(
        "container", pod.uid, ctr.container_id, "containerd", "besteffort")
