"""CgroupReader on this machine's real cgroup v2 filesystem: held descriptors, removal,
and the open-files shortfall. Each test builds a scratch subtree, moves a CPU-burning
child into a container cgroup when it needs one, and always removes what it made."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import require_tool
from kwatt.workloads.cgroups import CgroupLayout, CgroupReader
from simnode import container_id, pod_uid

CANDIDATES = ("/sys/fs/cgroup/unified", "/sys/fs/cgroup")


def _cgroup2_root() -> Path | None:
    for candidate in CANDIDATES:
        root = Path(candidate)
        if (root / "cgroup.controllers").exists() and os.access(root, os.W_OK):
            return root
    return None


class ScratchTree:
    """A kubepods-shaped subtree of the real cgroupfs, removed deepest first."""

    def __init__(self, base: Path) -> None:
        self.root = base / f"kwatt-test-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.root.mkdir()
        self.pods = self.root / "kubepods.slice"
        self.pods.mkdir()
        self.children: list[subprocess.Popen[bytes]] = []

    def add_pod(self, seed: str) -> Path:
        uid = pod_uid(seed).replace("-", "_")
        directory = self.pods / f"kubepods-pod{uid}.slice"
        directory.mkdir()
        return directory

    def add_container(self, pod: Path, seed: str) -> Path:
        directory = pod / f"cri-containerd-{container_id(seed)}.scope"
        directory.mkdir()
        return directory

    def burn_in(self, cgroup: Path) -> subprocess.Popen[bytes]:
        child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        self.children.append(child)
        (cgroup / "cgroup.procs").write_text(f"{child.pid}\n")
        return child

    def stop(self, child: subprocess.Popen[bytes]) -> None:
        child.send_signal(signal.SIGKILL)
        child.wait()

    def path(self, directory: Path) -> str:
        return "/" + str(directory.relative_to(self.root))

    def remove(self, directory: Path) -> None:
        for sub in sorted((p for p in directory.rglob("*") if p.is_dir()),
                          key=lambda p: len(p.parts), reverse=True):
            sub.rmdir()
        directory.rmdir()

    def cleanup(self) -> None:
        for child in self.children:
            if child.poll() is None:
                self.stop(child)
        if self.root.exists():
            self.remove(self.root)


@pytest.fixture
def scratch() -> Iterator[ScratchTree]:
    base = _cgroup2_root()
    if base is None:
        # Outside CI a developer without root may lack one; under CI the missing
        # hierarchy is a failure, never a silent skip.
        if os.environ.get("CI") == "true":
            pytest.fail("needs a writable cgroup v2 hierarchy (run as root)")
        pytest.skip("needs a writable cgroup v2 hierarchy (run as root)")
    tree = ScratchTree(base)
    try:
        yield tree
    finally:
        tree.cleanup()


def _usage(scan: object, path: str) -> float:
    return {u.path: u.usage_seconds for u in scan.cgroups}[path]  # type: ignore[attr-defined]


def test_held_descriptors_see_fresh_values_without_walking_again(scratch: ScratchTree) -> None:
    pod = scratch.add_pod("p0")
    container = scratch.add_container(pod, "c0")
    scratch.burn_in(container)
    reader = CgroupReader(CgroupLayout(2, str(scratch.root)), include_host_units=False)
    try:
        first = reader.scan()
        assert reader.walks == 1 and reader.held == 2  # the pod's and the container's
        readings = [_usage(first, scratch.path(container))]
        for _ in range(3):
            time.sleep(0.2)
            readings.append(_usage(reader.scan(), scratch.path(container)))
        assert reader.walks == 1, "an unchanged tree must not be walked again"
        assert readings == sorted(readings) and readings[-1] > readings[0], readings
        assert not first.faults
    finally:
        reader.close()


def test_created_and_removed_cgroups_are_seen_on_the_next_scan(scratch: ScratchTree) -> None:
    pod = scratch.add_pod("p0")
    kept = scratch.add_container(pod, "kept")
    gone = scratch.add_container(pod, "gone")
    burner = scratch.burn_in(gone)
    reader = CgroupReader(CgroupLayout(2, str(scratch.root)), include_host_units=False)
    try:
        assert {u.path for u in reader.scan().cgroups} == {
            scratch.path(pod), scratch.path(kept), scratch.path(gone)}
        added = scratch.add_container(pod, "added")
        assert scratch.path(added) in {u.path for u in reader.scan().cgroups}
        assert reader.walks == 2

        # A removal and a creation in one interval leave nr_descendants unchanged: the
        # removed cgroup's held descriptor (ENODEV) is what says the tree changed.
        scratch.stop(burner)
        gone.rmdir()
        replacement = scratch.add_container(pod, "replacement")
        paths = {u.path for u in reader.scan().cgroups}
        assert scratch.path(gone) not in paths
        assert scratch.path(replacement) in paths
        assert reader.walks == 3 and reader.held == 4
    finally:
        reader.close()


def test_pread_of_a_removed_cgroup_fails_with_enodev(scratch: ScratchTree) -> None:
    """The kernel behaviour the reader's removal detection rests on."""
    pod = scratch.add_pod("p0")
    fd = os.open(pod / "cpu.stat", os.O_RDONLY)
    try:
        assert os.pread(fd, 4096, 0).startswith(b"usage_usec ")
        pod.rmdir()
        with pytest.raises(OSError) as raised:
            os.pread(fd, 4096, 0)
        assert raised.value.errno == 19  # ENODEV
    finally:
        os.close(fd)


def test_descriptor_shortfall_falls_back_to_open_read(scratch: ScratchTree) -> None:
    pod = scratch.add_pod("p0")
    containers = [scratch.add_container(pod, f"c{i}") for i in range(30)]
    scratch.burn_in(containers[0])
    in_use = len(os.listdir("/proc/self/fd"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    reader = CgroupReader(CgroupLayout(2, str(scratch.root)), include_host_units=False,
                          reserve_descriptors=0)
    try:
        # Room for the root's cgroup.stat, the walk's directory handle and ~18 more.
        resource.setrlimit(resource.RLIMIT_NOFILE, (in_use + 20, hard))
        try:
            first = reader.scan()
            time.sleep(0.2)
            second = reader.scan()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert len(first.cgroups) == 31 and not first.faults and not second.faults
        assert reader.descriptor_shortfalls > 0
        assert 0 < reader.held < 31 and reader.unheld == 31 - reader.held
        path = scratch.path(containers[0])
        assert _usage(second, path) > _usage(first, path)
    finally:
        reader.close()


def test_exporter_raises_the_open_files_soft_limit_to_the_hard_one(tmp_path: Path) -> None:
    from exporter_process import ExporterProcess
    from simnode import SimulatedNode

    require_tool("prlimit")
    node = SimulatedNode(tmp_path / "node")
    exporter = ExporterProcess(node, wrapper=("prlimit", "--nofile=1024:4096", "--"))
    try:
        limits = Path(f"/proc/{exporter.proc.pid}/limits").read_text()
    finally:
        exporter.stop()
    line = next(row for row in limits.splitlines() if row.startswith("Max open files"))
    assert line.split()[3:5] == ["4096", "4096"], line
