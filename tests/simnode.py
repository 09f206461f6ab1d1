"""A simulated node: real sysfs/procfs/cgroupfs files in a directory, advanced by tests.

Everything the exporter reads is a plain file written here, so the exporter runs unmodified
with ``--path.sysfs <root>/sys --path.procfs <root>/proc``. CPU time is hierarchical like
the kernel's: time given to a container is added to its pod, QoS slice and kubepods too,
and to the node's busy ticks in /proc/stat.
"""

from __future__ import annotations

import os
import uuid as uuidlib
from dataclasses import dataclass, field
from pathlib import Path

CLOCK_TICKS = 100
_RUNTIME_PREFIX = {"containerd": "cri-containerd", "cri-o": "crio", "docker": "docker"}
# Files a real cgroup directory holds besides the ones kwatt reads; the benchmark writes
# them so directory walks cost what they cost on a node.
_V2_NOISE = ("cgroup.procs", "cgroup.threads", "cgroup.type", "cgroup.events", "cpu.max",
             "cpu.weight", "cpu.pressure", "memory.current", "memory.max", "memory.stat",
             "memory.events", "io.stat", "pids.current", "pids.max")


def _write(path: str, text: str) -> None:
    # Write then rename, as the kernel's files never show a half-written value: a reader
    # racing with the test must see the old content or the new, never a torn one.
    temporary = f"{path}.tmp-{os.getpid()}"
    with open(temporary, "w") as handle:
        handle.write(text)
    os.replace(temporary, path)


def container_id(seed: str) -> str:
    """A deterministic 64-hex container id."""
    return (uuidlib.uuid5(uuidlib.NAMESPACE_OID, seed).hex * 2)[:64]


def pod_uid(seed: str) -> str:
    return str(uuidlib.uuid5(uuidlib.NAMESPACE_DNS, seed))


@dataclass
class SimZone:
    index: str
    name: str
    max_range_uj: int
    energy_uj: int = 0


@dataclass
class SimContainer:
    pod: SimPod
    container_id: str
    path: str  # cgroup path


@dataclass
class SimPod:
    uid: str
    qos: str
    runtime: str
    path: str
    containers: list[SimContainer] = field(default_factory=list)


class SimulatedNode:
    def __init__(self, root: Path | str, *, cgroup_version: int = 2, driver: str = "systemd",
                 vcpus: int = 4, memory_kb: int = 16 * 1024 * 1024,
                 noise_files: bool = False) -> None:
        self.root = Path(root)
        self.sysfs = self.root / "sys"
        self.procfs = self.root / "proc"
        self.cgroup_version = cgroup_version
        self.driver = driver
        self.vcpus = vcpus
        self.noise_files = noise_files
        self.busy_ticks = 0
        self.idle_ticks = 0
        self.zones: dict[str, SimZone] = {}
        self.pods: dict[str, SimPod] = {}
        self._usage_ns: dict[str, int] = {}
        if cgroup_version == 2:
            self.cgroup_root = self.sysfs / "fs" / "cgroup"
        else:
            self.cgroup_root = self.sysfs / "fs" / "cgroup" / "cpu,cpuacct"
        self.cgroup_root.mkdir(parents=True, exist_ok=True)
        if cgroup_version == 2:
            (self.cgroup_root / "cgroup.controllers").write_text("cpuset cpu io memory pids\n")
        self._write_usage("/")
        self.procfs.mkdir(parents=True, exist_ok=True)
        (self.procfs / "meminfo").write_text(
            f"MemTotal:       {memory_kb} kB\nMemFree:        {memory_kb // 2} kB\n")
        self._write_proc_stat()
        os.chmod(self.root, 0o755)

    # -- RAPL -------------------------------------------------------------------------------

    def _zone_dir(self, index: str) -> Path:
        return self.sysfs / "class" / "powercap" / f"intel-rapl:{index}"

    def add_rapl_zone(self, index: str, name: str, max_range_uj: int = 262143328850,
                      energy_uj: int = 0) -> SimZone:
        zone = SimZone(index, name, max_range_uj, energy_uj)
        self.zones[index] = zone
        directory = self._zone_dir(index)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "name").write_text(name + "\n")
        (directory / "max_energy_range_uj").write_text(f"{max_range_uj}\n")
        (directory / "enabled").write_text("1\n")
        self._write_zone(zone)
        return zone

    def add_mmio_duplicate(self, index: str) -> None:
        """intel-rapl-mmio:N repeats the package counter; the exporter must ignore it."""
        directory = self.sysfs / "class" / "powercap" / f"intel-rapl-mmio:{index}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "name").write_text(f"package-{index}\n")
        (directory / "energy_uj").write_text("123456789\n")
        (directory / "max_energy_range_uj").write_text("262143328850\n")

    def add_intel_server_zones(self, sockets: int = 2) -> None:
        for socket in range(sockets):
            self.add_rapl_zone(f"{socket}", f"package-{socket}")
            self.add_rapl_zone(f"{socket}:0", "core")
            self.add_rapl_zone(f"{socket}:1", "uncore")
            self.add_rapl_zone(f"{socket}:2", "dram")

    def _write_zone(self, zone: SimZone) -> None:
        _write(os.path.join(str(self.sysfs), "class", "powercap", f"intel-rapl:{zone.index}",
                            "energy_uj"), f"{zone.energy_uj}\n")

    def add_energy(self, index: str, joules: float) -> None:
        """Advance a zone by ``joules``, wrapping at max_energy_range_uj like the hardware."""
        zone = self.zones[index]
        zone.energy_uj = (zone.energy_uj + round(joules * 1e6)) % zone.max_range_uj
        self._write_zone(zone)

    def set_zone_content(self, index: str, text: str) -> None:
        (self._zone_dir(index) / "energy_uj").write_text(text)

    def make_zone_unreadable(self, index: str) -> None:
        """EACCES for non-root readers, as on kernels since the 2020 Platypus fix."""
        os.chmod(self._zone_dir(index) / "energy_uj", 0o000)

    # -- cgroups ----------------------------------------------------------------------------

    def _dir(self, cgroup_path: str) -> Path:
        return self.cgroup_root / cgroup_path.strip("/")

    def _write_usage(self, cgroup_path: str) -> None:
        # Plain strings, not pathlib: pathlib interns every path part, which would show up
        # as memory growth in the benchmark's measurements of the exporter.
        directory = os.path.join(str(self.cgroup_root), cgroup_path.strip("/"))
        os.makedirs(directory, exist_ok=True)
        ns = self._usage_ns.setdefault(cgroup_path, 0)
        if self.cgroup_version == 2:
            usec = ns // 1000
            _write(os.path.join(directory, "cpu.stat"),
                   f"usage_usec {usec}\nuser_usec {usec * 2 // 3}\nsystem_usec {usec // 3}\n"
                   "nr_periods 0\nnr_throttled 0\nthrottled_usec 0\n")
        else:
            _write(os.path.join(directory, "cpuacct.usage"), f"{ns}\n")
        if self.noise_files:
            for name in _V2_NOISE:
                noise = os.path.join(directory, name)
                if not os.path.exists(noise):
                    _write(noise, "0\n")

    def _ensure_path(self, cgroup_path: str) -> None:
        parts = [p for p in cgroup_path.split("/") if p]
        for depth in range(1, len(parts) + 1):
            sub = "/" + "/".join(parts[:depth])
            if sub not in self._usage_ns:
                self._write_usage(sub)

    def pod_path(self, uid: str, qos: str) -> str:
        if self.driver == "systemd":
            underscored = uid.replace("-", "_")
            if qos == "guaranteed":
                return f"/kubepods.slice/kubepods-pod{underscored}.slice"
            return (f"/kubepods.slice/kubepods-{qos}.slice/"
                    f"kubepods-{qos}-pod{underscored}.slice")
        if qos == "guaranteed":
            return f"/kubepods/pod{uid}"
        return f"/kubepods/{qos}/pod{uid}"

    def add_pod(self, uid: str, qos: str = "burstable", runtime: str = "containerd") -> SimPod:
        pod = SimPod(uid, qos, runtime, self.pod_path(uid, qos))
        self.pods[uid] = pod
        self._ensure_path(pod.path)
        return pod

    def add_container(self, pod: SimPod, cid: str) -> SimContainer:
        if self.driver == "systemd":
            leaf = f"{_RUNTIME_PREFIX[pod.runtime]}-{cid}.scope"
        else:
            leaf = f"crio-{cid}" if pod.runtime == "cri-o" else cid
        container = SimContainer(pod, cid, f"{pod.path}/{leaf}")
        pod.containers.append(container)
        self._ensure_path(container.path)
        return container

    def add_unit(self, cgroup_path: str) -> str:
        """A non-Kubernetes cgroup: /system.slice/foo.service, /system.slice/docker-<id>.scope."""
        self._ensure_path(cgroup_path)
        return cgroup_path

    def remove_cgroup(self, cgroup_path: str) -> None:
        """Remove a cgroup; its CPU time stays in its ancestors, as in the kernel."""
        directory = self._dir(cgroup_path)
        for child in sorted(directory.rglob("*"), key=lambda p: len(p.parts), reverse=True):
            if child.is_dir():
                child.rmdir()
            else:
                child.unlink()
        directory.rmdir()
        for key in [k for k in self._usage_ns if k == cgroup_path
                    or k.startswith(cgroup_path + "/")]:
            del self._usage_ns[key]

    def remove_pod(self, pod: SimPod) -> None:
        self.remove_cgroup(pod.path)
        del self.pods[pod.uid]

    def add_cpu(self, cgroup_path: str, seconds: float) -> None:
        """Charge CPU time to a cgroup (and, hierarchically, its ancestors and the node)."""
        ns = round(seconds * 1e9)
        parts = [p for p in cgroup_path.split("/") if p]
        for depth in range(len(parts) + 1):
            sub = "/" + "/".join(parts[:depth]) if depth else "/"
            self._usage_ns[sub] = self._usage_ns.get(sub, 0) + ns
            self._write_usage(sub)
        self.busy_ticks += round(seconds * CLOCK_TICKS)
        self._write_proc_stat()

    def add_node_cpu(self, busy_seconds: float = 0.0, idle_seconds: float = 0.0) -> None:
        """CPU time outside any workload cgroup (busy) and idle time."""
        self.busy_ticks += round(busy_seconds * CLOCK_TICKS)
        self.idle_ticks += round(idle_seconds * CLOCK_TICKS)
        self._write_proc_stat()

    def _write_proc_stat(self) -> None:
        user, system = self.busy_ticks * 3 // 4, self.busy_ticks - self.busy_ticks * 3 // 4
        lines = [f"cpu  {user} 0 {system} {self.idle_ticks} 0 0 0 0 0 0"]
        for cpu in range(self.vcpus):
            lines.append(f"cpu{cpu} {user // self.vcpus} 0 {system // self.vcpus} "
                         f"{self.idle_ticks // self.vcpus} 0 0 0 0 0 0")
        lines += ["intr 0", "ctxt 0", "btime 1700000000", "processes 1",
                  "procs_running 1", "procs_blocked 0"]
        _write(os.path.join(str(self.procfs), "stat"), "\n".join(lines) + "\n")

    def make_world_readable(self) -> None:
        """So a test can run the exporter as an unprivileged user over this tree."""
        for path in [self.root, *self.root.rglob("*")]:
            mode = path.stat().st_mode & 0o777
            if mode == 0:
                continue  # deliberately unreadable
            os.chmod(path, 0o755 if path.is_dir() else 0o644)
