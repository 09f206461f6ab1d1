"""The GPU energy stage: NVML readings + who holds each GPU -> GPU splits for the ledger.

Run by the sampler once per cycle after CPU/DRAM (``EnergyStage``). Holders come from the
kubelet PodResources API when there is one, matched by (namespace, pod, container) to this
cycle's workload identities; in host mode, or while the kubelet does not answer, from
NVML's list of compute processes (PID -> <procfs>/<pid>/cgroup -> identity). Per-process
SM samples are mapped the same way to split shared GPUs. The stage also keeps the per-GPU
counters behind the kwatt_gpu_* metrics and returns them as an immutable snapshot in its
``StageResult``, which the sampler publishes with the ledger's at the end of the cycle.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Hashable, Mapping
from dataclasses import replace

from kwatt.attribution import ComponentSplit
from kwatt.config import Config
from kwatt.cycle_metrics import StageRenderer
from kwatt.faults import Fault
from kwatt.gpu_attribution import (
    GpuInterval,
    MigShare,
    Unattributed,
    attribute_gpu,
    merge_splits,
)
from kwatt.gpu_metrics import AllocationRow, GpuRow, GpuSnapshot, render_gpu
from kwatt.gpu_poller import GpuPoller, merge_cycles
from kwatt.ledger import WorkloadLabels
from kwatt.logs import RateLimitedLog
from kwatt.sampler import StageResult
from kwatt.sources import dcgm, nvml
from kwatt.sources.dcgm import DcgmActivitySource
from kwatt.sources.gpu import CombinedReader, GpuBackend, load_reader
from kwatt.sources.nvml import GpuReader, GpuReading, NvmlCycle
from kwatt.state import GpuCounter
from kwatt.text import decode_bytes
from kwatt.workloads import podresources
from kwatt.workloads.amdgpu_devices import amd_device_keys
from kwatt.workloads.cgroups import CgroupIdentity, identify_cgroup_path
from kwatt.workloads.podresources import (
    ClaimAllocation,
    DeviceAllocation,
    DeviceRef,
    PodResourcesClient,
    parse_device_id,
)
from kwatt.workloads.resourceslices import DraDevice, SliceStore

log = logging.getLogger("kwatt.gpu")

Holder = CgroupIdentity | Unattributed
# A PID whose /proc entry cannot be read: exited, or not in our PID namespace (no hostPID).
# Its SM samples are ignored rather than charged to "system", so that a shared GPU is split
# evenly when kwatt cannot see the processes at all.
INVISIBLE = CgroupIdentity("invisible")


# The GPU thread's NVML time per reading, as a fraction of the interval: slow MIG calls
# beyond it wait for the next reading, so readings keep up with the sampler.
READ_BUDGET_FRACTION = 0.8
# The sampler does not wait for the reading it asks for: it books the readings finished
# since its last cycle (the GPU figures lag by up to one interval), so whether a reading is
# fast or slow never moves the time at which the CPU figures are published.
READ_WAIT_SECONDS = 0.0
# A reading running longer than this (and at least 3 intervals) means a hung driver.
STALL_SECONDS = 10.0


class GpuUnavailable(Exception):
    """``--gpu on`` and NVML cannot be used: the exporter must not start."""


def identity_of_pid(procfs: str, pid: int) -> CgroupIdentity | None:
    """The workload cgroup of a process, from ``<procfs>/<pid>/cgroup`` (v1 or v2).

    Cgroup names need not be UTF-8: undecodable bytes become U+FFFD (kwatt.text), as in the
    cgroup scan, so one odd unit name affects only the PIDs in it, never the cycle."""
    try:
        with open(os.path.join(procfs, str(pid), "cgroup"), "rb") as handle:
            lines = decode_bytes(handle.read()).splitlines()
    except OSError:
        return INVISIBLE
    unified, accounting, rest = [], [], []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            unified.append(path)
        elif "cpuacct" in controllers.split(","):
            accounting.append(path)
        else:
            rest.append(path)
    for path in (*unified, *accounting, *rest):
        identity = identify_cgroup_path(path)
        if identity is not None:
            return identity
    return None


class GpuStage:
    """``EnergyStage`` for GPUs (NVIDIA through NVML, AMD through amdsmi)."""

    def __init__(self, reader: GpuReader | CombinedReader, client: PodResourcesClient | None,
                 procfs: str,
                 pid_identity: Callable[[str, int], CgroupIdentity | None] = identity_of_pid,
                 slices: SliceStore | None = None,
                 poller: GpuPoller | None = None, read_wait_seconds: float = 0.0,
                 stall_seconds: float = STALL_SECONDS, sysfs: str = "",
                 dcgm: DcgmActivitySource | None = None) -> None:
        """``poller``: read on its own thread, waiting ``read_wait_seconds`` for each
        reading; None: read inline in ``sample`` (``--once``, tests that step cycles)."""
        self._reader = reader
        self._dcgm = dcgm  # MIG instance activity from dcgm-exporter; None: on/off
        self._sources = reader.sources
        self._sysfs = sysfs  # AMD partitions' render nodes; empty: not resolved
        self._amd_keys: dict[str, tuple[str, ...]] = {}
        self._poller = poller
        self._read_wait = read_wait_seconds
        self._stall_seconds = stall_seconds
        # The raw counters of the readings booked so far (restart state): the reader's
        # own can be a reading ahead while the GPU thread runs.
        self._counters: dict[str, tuple[int, float]] = {}
        self._last_watts: dict[tuple[str, str], float] = {}
        self._last_up: dict[str, bool] = dict.fromkeys(self._sources, True)
        self._client = client
        self._slices = slices
        self._procfs = procfs
        self._pid_identity = pid_identity
        self._pid_cache: dict[int, CgroupIdentity | None] = {}
        self._energy: dict[str, float] = {}
        self._snapshot = GpuSnapshot(reader.driver_version)
        self._ratelog = RateLimitedLog(log, every=600.0)
        self.last_nvml_calls = 0
        # Set when a PodResources holder could not be matched by name last cycle: then the
        # compute process list is read too, to find that holder's container by PID.
        self._unmatched_holders = False

    def snapshot(self) -> GpuSnapshot:
        """The stage's latest snapshot, for tests; scrapes render the sampler's published
        cycle instead, which can lag this by the rest of a cycle."""
        return self._snapshot

    # -- restart state ----------------------------------------------------------------

    def export_counters(self) -> dict[str, GpuCounter]:
        return {uuid: GpuCounter(mj, when) for uuid, (mj, when) in self._counters.items()}

    def restore_counters(self, counters: Mapping[str, GpuCounter]) -> int:
        """Before the first cycle (the GPU thread starts with the first request)."""
        seeds = {uuid: (c.energy_mj, c.monotonic) for uuid, c in counters.items()}
        seeded = self._reader.seed(seeds)
        known = self._reader.counters()
        self._counters.update({u: v for u, v in seeds.items() if known.get(u) == v})
        return seeded

    def stop(self) -> None:
        if self._poller is not None:
            self._poller.stop()
        if self._dcgm is not None:
            self._dcgm.stop()

    def _read(self, want_pids: bool) -> NvmlCycle | None:
        """This cycle's reading; None when the GPU thread has none ready yet."""
        if self._poller is None:
            return self._reader.read(want_pids)
        if not self._poller.request(want_pids):
            self._ratelog.log(logging.WARNING, "overrun",
                              "GPU reading overran its interval; GPU energy is booked when "
                              "it completes", busy_seconds=round(self._poller.busy_seconds(), 3),
                              overruns=self._poller.overruns)
        cycles = self._poller.take(self._read_wait)
        return merge_cycles(cycles) if cycles else None

    def _no_reading(self, faults: list[Fault], source_up: dict[str, bool]) -> StageResult:
        """No new reading this cycle: book nothing (the energy waits in the counters),
        keep the last figures, and report a reading that hangs as an NVML timeout."""
        assert self._poller is not None
        busy = self._poller.busy_seconds()
        snap = self._snapshot
        if busy > self._stall_seconds:
            for source in self._sources:
                faults.append(Fault(source, "timeout", "gpu-thread",
                                    f"no GPU reading completed for {busy:.1f}s"))
                source_up[source] = False
            self._last_up = dict.fromkeys(self._sources, False)
            self._last_watts = {}
            snap = self._snapshot = replace(snap, gpus=tuple(
                replace(row, up=False, power_watts=None, utilisation=None)
                for row in snap.gpus))
        else:
            source_up.update(self._last_up)
        snap = self._snapshot = replace(snap, read_overruns=self._poller.overruns)
        return StageResult([], faults, source_up, dict(self._last_watts), snap)

    # -- one cycle --------------------------------------------------------------------

    def sample(self, now: float,
               workloads: Mapping[CgroupIdentity, WorkloadLabels | None]) -> StageResult:
        faults: list[Fault] = []
        source_up: dict[str, bool] = {}
        allocations: tuple[DeviceAllocation, ...] | None = None
        claims: tuple[ClaimAllocation, ...] = ()
        if self._client is not None:
            listed = self._client.list()
            allocations = listed.allocations
            claims = listed.claims
            source_up[podresources.SOURCE] = listed.fault is None
            if listed.fault is not None:
                faults.append(listed.fault)
                self._ratelog.log(logging.WARNING, "fallback",
                                  "kubelet PodResources unavailable; GPU holders come from "
                                  "NVML's process list until it answers",
                                  socket=self._client.socket_path, detail=listed.fault.detail)
            else:
                self._ratelog.forget("fallback")

        # NVML is read after the kubelet answered, however long that took: each GPU's
        # energy carries its own read time, so power is never skewed by the wait.
        cycle = self._read(want_pids=allocations is None or self._unmatched_holders)
        if cycle is None:
            return self._no_reading(faults, source_up)
        self.last_nvml_calls = cycle.calls
        faults.extend(cycle.faults)
        engine: Mapping[tuple[str, int], float] = {}
        if self._dcgm is not None:
            dcgm_faults, source_up[dcgm.SOURCE] = self._dcgm.take_faults()
            faults.extend(dcgm_faults)
            engine = self._dcgm.latest().by_instance
        failed = {f.source for f in cycle.faults}
        self._last_up = {source: source not in failed for source in self._sources}
        source_up.update(self._last_up)
        for gpu in cycle.gpus:
            if not gpu.up:
                self._counters.pop(gpu.uuid, None)
            elif gpu.counter_mj is not None and gpu.read_at is not None:
                self._counters[gpu.uuid] = (gpu.counter_mj, gpu.read_at)

        seen_pids: set[int] = set()
        gpu_pids = {g.uuid: g.compute_pids for g in cycle.gpus}
        mig_pids = {i.uuid: i.pids for g in cycle.gpus for i in g.instances}
        unresolved = 0
        if allocations is not None:
            resolved, unresolved = self._resolve_claims(claims, allocations, cycle.gpus)
            holders, mig_holders, rows = self._holders_from_allocations(
                (*((a, parse_device_id(a.device_id)) for a in allocations), *resolved),
                cycle.gpus, workloads)
            self._unmatched_holders = any(
                isinstance(h, Unattributed) for hs in (*holders.values(),
                                                       *mig_holders.values()) for h in hs)
            holders = {uuid: self._match_by_pid(hs, gpu_pids.get(uuid, ()), seen_pids)
                       for uuid, hs in holders.items()}
            mig_holders = {uuid: self._match_by_pid(hs, mig_pids.get(uuid, ()), seen_pids)
                           for uuid, hs in mig_holders.items()}
        else:
            holders, mig_holders = self._holders_from_processes(cycle.gpus, seen_pids)
            rows = ()

        splits: list[ComponentSplit[CgroupIdentity]] = []
        gpu_rows: list[GpuRow] = []
        # DRA devices no ResourceSlice names are held, but on which GPUs kwatt cannot say:
        # the whole GPUs nobody holds share that much of their energy as unidentified.
        unheld = [g for g in cycle.gpus if g.up and g.joules is not None
                  and not (g.mig_enabled and g.instances) and not holders.get(g.uuid)]
        unidentified_share = min(unresolved, len(unheld)) / len(unheld) if unheld else 0.0
        for gpu in cycle.gpus:
            interval = self._interval(gpu, holders.get(gpu.uuid, ()), mig_holders, seen_pids,
                                      unidentified_share, engine)
            if interval is not None:
                splits.append(attribute_gpu(interval))
            gpu_rows.append(self._account(gpu))
        for pid in [p for p in self._pid_cache if p not in seen_pids]:
            del self._pid_cache[pid]
        self._snapshot = GpuSnapshot(
            self._reader.driver_version, tuple(gpu_rows), rows, cycle.seconds,
            self._poller.overruns if self._poller is not None else 0)
        # One booking per cycle and source for all GPUs; a cycle with no GPU energy books
        # nothing.
        booked: list[ComponentSplit[Hashable]] = []
        watts: dict[tuple[str, str], float] = {}
        by_source: dict[str, list[ComponentSplit[CgroupIdentity]]] = {}
        for split in splits:
            by_source.setdefault(split.source, []).append(split)
        for source, group in by_source.items():
            merged = merge_splits(group)
            booked.append(merged)  # type: ignore[arg-type]
            # Node GPU power from each GPU's own interval, as kwatt_gpu_power_watts.
            watts[(merged.component, source)] = sum(
                row.power_watts for row, gpu in zip(gpu_rows, cycle.gpus, strict=True)
                if gpu.source == source and row.up and row.power_watts is not None)
        self._last_watts = watts
        return StageResult(booked, faults, source_up, watts, self._snapshot)

    def _account(self, gpu: GpuReading) -> GpuRow:
        total = self._energy.get(gpu.uuid, 0.0)
        power = None
        if gpu.joules is not None and gpu.joules >= 0:
            total += gpu.joules
            self._energy[gpu.uuid] = total
            if gpu.dt:
                power = gpu.joules / gpu.dt
        return GpuRow(gpu.index, gpu.uuid, gpu.model, gpu.mig_enabled, gpu.up, total, power,
                      gpu.utilisation, gpu.vendor, self._driver(gpu.vendor))

    def _driver(self, vendor: str) -> str:
        reader = self._reader
        if isinstance(reader, CombinedReader):
            return reader.driver_versions().get(vendor, "")
        return reader.driver_version

    def _identity(self, pid: int, seen: set[int]) -> CgroupIdentity | None:
        seen.add(pid)
        if pid not in self._pid_cache:
            self._pid_cache[pid] = self._pid_identity(self._procfs, pid)
        return self._pid_cache[pid]

    def _interval(self, gpu: GpuReading, holders: tuple[Holder, ...],
                  mig_holders: Mapping[str, tuple[Holder, ...]],
                  seen: set[int], unidentified_share: float = 0.0,
                  engine: Mapping[tuple[str, int], float] | None = None
                  ) -> GpuInterval[CgroupIdentity] | None:
        if not gpu.up or gpu.joules is None:
            return None
        if gpu.mig_enabled and gpu.instances:
            # Activity: the instance's own where the library measures it (AMD partitions'
            # GFX activity), else dcgm-exporter's engine activity where configured, else
            # on while it runs a compute process (MIG).
            engine = engine or {}
            shares = tuple(
                MigShare[CgroupIdentity](
                    i.slices,
                    i.activity if i.activity is not None else
                    engine.get((gpu.uuid, i.gpu_instance_id), 1.0 if i.pids else 0.0),
                    mig_holders.get(i.uuid, ()))
                for i in gpu.instances)
            return GpuInterval(gpu.uuid, gpu.joules, instances=shares, source=gpu.source)
        activity: dict[Holder, float] = {}
        if len(set(holders)) > 1:
            members = set(holders)
            for sample in gpu.process_samples:
                identity = self._identity(sample.pid, seen)
                if identity == INVISIBLE:
                    continue
                key: Holder = identity if identity in members and identity is not None \
                    else Unattributed("system")
                activity[key] = activity.get(key, 0.0) + sample.sm_percent
        return GpuInterval(gpu.uuid, gpu.joules, holders, gpu.utilisation, activity,
                           unidentified_share=unidentified_share if not holders else 0.0,
                           source=gpu.source)

    def _match_by_pid(self, holders: tuple[Holder, ...], pids: tuple[int, ...],
                      seen: set[int]) -> tuple[Holder, ...]:
        """Name-less matching for the common case: exactly one holder of a device could not
        be found by (namespace, pod, container) - e.g. the namer does not know the pod yet -
        and exactly one other workload container runs compute processes on it: that
        container is the holder."""
        unmatched = [h for h in holders if isinstance(h, Unattributed)]
        if len(unmatched) != 1 or not pids:
            return holders
        candidates = {identity for pid in pids
                      if (identity := self._identity(pid, seen)) is not None
                      and identity.kind == "container" and identity not in holders}
        if len(candidates) != 1:
            return holders
        (found,) = candidates
        return tuple(found if h == unmatched[0] else h for h in holders)

    def _resolve_claims(self, claims: tuple[ClaimAllocation, ...],
                        allocations: tuple[DeviceAllocation, ...],
                        gpus: tuple[GpuReading, ...]
                        ) -> tuple[list[tuple[DeviceAllocation, DeviceRef]], int]:
        """DRA devices as (allocation, GPU or MIG ref) through the ResourceSlices, with
        ``resource`` the claim's driver; and how many distinct devices no slice names."""
        resolved: list[tuple[DeviceAllocation, DeviceRef]] = []
        unknown: set[tuple[str, str, str]] = set()
        found = {key: self._slices.lookup(*key) if self._slices is not None else None
                 for key in {(c.driver, c.pool, c.device) for c in claims}}
        dynamic_mig = self._dynamic_mig(found, allocations, gpus)
        for c in claims:
            key = (c.driver, c.pool, c.device)
            device = found[key]
            allocation = DeviceAllocation(c.namespace, c.pod, c.container, c.driver,
                                          f"{c.driver}/{c.pool}/{c.device}")
            if key in dynamic_mig:
                resolved.append((allocation, DeviceRef("mig", dynamic_mig[key])))
                continue
            if device is None or not device.uuid:
                unknown.add((c.driver, c.pool, c.device))
                self._ratelog.log(
                    logging.INFO, f"unknown-dra|{allocation.device_id}",
                    "a DRA claim names a device no ResourceSlice of this node describes; "
                    "its GPU's energy is unidentified", device=allocation.device_id,
                    claim=f"{c.claim_namespace}/{c.claim_name}", namespace=c.namespace,
                    pod=c.pod, container=c.container)
                continue
            kind = "mig" if device.kind == "mig" or device.uuid.startswith("MIG-") else "gpu"
            resolved.append((allocation, DeviceRef(kind, device.uuid)))
        return resolved, len(unknown)

    @staticmethod
    def _dynamic_mig(found: Mapping[tuple[str, str, str], DraDevice | None],
                     allocations: tuple[DeviceAllocation, ...],
                     gpus: tuple[GpuReading, ...]) -> dict[tuple[str, str, str], str]:
        """MIG devices the driver publishes without a UUID (created when a claim is
        prepared) matched to NVML instances: by parent GPU and profile, only where one
        claimed device and one instance nobody else names share them."""
        named = {parse_device_id(a.device_id).value for a in allocations}
        named |= {d.uuid for d in found.values() if d is not None and d.uuid}
        wanted: dict[tuple[str, str], list[tuple[str, str, str]]] = {}
        for key, device in found.items():
            if device is not None and not device.uuid and device.kind == "mig" \
                    and device.parent_uuid and device.profile:
                wanted.setdefault((device.parent_uuid, device.profile), []).append(key)
        out: dict[tuple[str, str, str], str] = {}
        for gpu in gpus:
            for profile in {p for parent, p in wanted if parent == gpu.uuid}:
                candidates = [i.uuid for i in gpu.instances
                              if i.profile == profile and i.uuid not in named]
                keys = wanted[(gpu.uuid, profile)]
                if len(candidates) == 1 and len(keys) == 1:
                    out[keys[0]] = candidates[0]
        return out

    def _holders_from_allocations(
            self, allocations: tuple[tuple[DeviceAllocation, DeviceRef], ...],
            gpus: tuple[GpuReading, ...],
            workloads: Mapping[CgroupIdentity, WorkloadLabels | None]
    ) -> tuple[dict[str, tuple[Holder, ...]], dict[str, tuple[Holder, ...]],
               tuple[AllocationRow, ...]]:
        by_name: dict[tuple[str, str, str], CgroupIdentity] = {}
        for identity, labels in workloads.items():
            if labels is not None and identity.kind == "container":
                by_name[(labels.namespace, labels.pod, labels.container)] = identity
        by_uuid = {g.uuid: g for g in gpus}
        by_index = {str(g.index): g for g in gpus}
        mig_parent = {i.uuid: g for g in gpus for i in g.instances}
        holders: dict[str, list[Holder]] = {}
        mig_holders: dict[str, list[Holder]] = {}
        rows: dict[AllocationRow, None] = {}
        amd_targets = self._amd_targets(gpus)
        for a, ref in allocations:
            amd = self._amd_target(a.device_id, amd_targets)
            gpu: GpuReading | None
            if amd is not None:
                gpu, ref = amd
            elif ref.kind == "mig":
                gpu = mig_parent.get(ref.value)
            elif ref.kind == "index":
                gpu = by_index.get(ref.value)
            else:
                gpu = by_uuid.get(ref.value)
            if gpu is None:
                self._ratelog.log(logging.INFO, f"unknown-device|{a.device_id}",
                                  "PodResources names a GPU that no GPU library lists",
                                  device_id=a.device_id, resource=a.resource,
                                  namespace=a.namespace, pod=a.pod, container=a.container)
                continue
            key = (a.namespace, a.pod, a.container)
            holder: Holder = by_name.get(key) or Unattributed(
                "unidentified", "/".join(key))
            target = mig_holders.setdefault(ref.value, []) if ref.kind == "mig" \
                else holders.setdefault(gpu.uuid, [])
            if holder not in target:
                target.append(holder)
            rows[AllocationRow(gpu.index, gpu.uuid, a.namespace, a.pod, a.container,
                               a.resource)] = None
        return ({k: tuple(v) for k, v in holders.items()},
                {k: tuple(v) for k, v in mig_holders.items()}, tuple(rows))

    @staticmethod
    def _amd_targets(gpus: tuple[GpuReading, ...]
                     ) -> dict[str, tuple[GpuReading, DeviceRef]]:
        """AMD device plugin keys (PCI address, renderD<M>) -> GPU and what it names: a
        partition when the GPU is partitioned, else the whole GPU."""
        out: dict[str, tuple[GpuReading, DeviceRef]] = {}
        for gpu in gpus:
            if gpu.vendor != "amd":
                continue
            if gpu.bus_id:
                out[gpu.bus_id] = (gpu, DeviceRef("gpu", gpu.uuid))
            for instance in gpu.instances:
                for alias in instance.aliases:
                    out[alias] = (gpu, DeviceRef("mig", instance.uuid))
        return out

    def _amd_target(self, device_id: str,
                    targets: Mapping[str, tuple[GpuReading, DeviceRef]]
                    ) -> tuple[GpuReading, DeviceRef] | None:
        if not targets:
            return None
        keys = self._amd_keys.get(device_id)
        if keys is None:
            keys = self._amd_keys[device_id] = amd_device_keys(device_id, self._sysfs)
        for key in keys:
            if key in targets:
                return targets[key]
        return None

    def _holders_from_processes(self, gpus: tuple[GpuReading, ...], seen: set[int]
                                ) -> tuple[dict[str, tuple[Holder, ...]],
                                           dict[str, tuple[Holder, ...]]]:
        def keys(pids: tuple[int, ...]) -> tuple[Holder, ...]:
            out: dict[Holder, None] = {}
            for pid in pids:
                identity = self._identity(pid, seen)
                key: Holder = identity if identity is not None and identity != INVISIBLE \
                    else Unattributed("system")
                out[key] = None
            return tuple(out)

        holders = {g.uuid: keys(g.compute_pids) for g in gpus if not g.mig_enabled}
        mig_holders = {i.uuid: keys(i.pids) for g in gpus for i in g.instances}
        return holders, mig_holders


def _default_amd_backend() -> GpuBackend:
    from kwatt.sources.amdsmi import AmdSmiBackend

    return AmdSmiBackend()


def build_gpu_stage(config: Config,
                    backend_factory: Callable[[], GpuBackend] | None = None,
                    clock: Callable[[], float] = time.monotonic,
                    slices: SliceStore | None = None,
                    read_wait_seconds: float | None = None,
                    amd_backend_factory: Callable[[], GpuBackend] | None = None
                    ) -> tuple[GpuStage, StageRenderer] | None:
    """The GPU stage for ``--gpu auto|on|off``; None when GPUs are off or absent (auto).

    Every vendor library that loads and lists a GPU is used: NVML (``backend_factory``,
    default nvidia-ml-py) and AMD SMI (``amd_backend_factory``, default amdsmi).
    GPUs are read on their own thread (inline with ``--once``). ``read_wait_seconds``: how
    long a cycle waits for the reading it asked for (default ``READ_WAIT_SECONDS``).
    Raises ``GpuUnavailable`` for ``--gpu on`` when no library lists a GPU.
    """
    if config.gpu == "off":
        return None
    readers: list[GpuReader] = []
    why: list[str] = []
    for name, factory in (
            ("NVML", backend_factory or nvml.PynvmlBackend),
            ("amdsmi", amd_backend_factory or _default_amd_backend)):
        found, reason = load_reader(factory, clock, config.gpu_mig_refresh_seconds)
        if found is not None and not found.gpu_count:
            found, reason = None, "lists no GPU"
        if found is None:
            why.append(f"{name}: {reason}")
            continue
        readers.append(found)
        log.info("reading GPU energy", extra={
            "library": name, "gpus": found.gpu_count, "driver_version": found.driver_version})
    if not readers:
        if config.gpu == "on":
            raise GpuUnavailable(f"--gpu on: no GPU library lists a GPU ({'; '.join(why)})")
        log.info("GPU energy not measured: no GPU library (--gpu auto)",
                 extra={"why": "; ".join(why)})
        return None
    reader: GpuReader | CombinedReader = readers[0] if len(readers) == 1 \
        else CombinedReader(readers)
    client: PodResourcesClient | None = None
    socket = config.pod_resources_socket
    if config.kubernetes == "on" or (config.kubernetes == "auto" and os.path.exists(socket)):
        client = PodResourcesClient(socket, config.gpu_resource_names,
                                    timeout_seconds=min(2.0, config.interval_seconds / 2),
                                    dra_drivers=config.gpu_dra_drivers)
        allocatable, fault = client.allocatable()
        if fault is not None:
            log.warning("kubelet PodResources not answering yet", extra={
                "socket": socket, "reason": fault.reason, "detail": fault.detail})
        else:
            log.info("GPU holders from kubelet PodResources", extra={
                "socket": socket, "allocatable_devices": sum(
                    len(v) for v in (allocatable or {}).values())})
    else:
        log.info("GPU holders from NVML's process list (no kubelet PodResources)",
                 extra={"kubernetes": config.kubernetes, "socket": socket})
    interval = config.interval_seconds
    poller = None if config.once else GpuPoller(
        reader, READ_BUDGET_FRACTION * interval, clock)
    wait = READ_WAIT_SECONDS if read_wait_seconds is None else read_wait_seconds
    activity = None
    if config.gpu_dcgm_exporter_url:
        activity = DcgmActivitySource(config.gpu_dcgm_exporter_url,
                                      config.gpu_dcgm_exporter_interval_seconds,
                                      config.gpu_dcgm_exporter_timeout_seconds)
        log.info("MIG instances weighted by dcgm-exporter's engine activity", extra={
            "url": config.gpu_dcgm_exporter_url})
        if not config.once:
            activity.start()
        else:
            activity.refresh()
    stage = GpuStage(reader, client, config.procfs, slices=slices, poller=poller,
                     read_wait_seconds=wait,
                     stall_seconds=max(STALL_SECONDS, 3 * interval), sysfs=config.sysfs,
                     dcgm=activity)
    return stage, render_gpu(config.node_name)
