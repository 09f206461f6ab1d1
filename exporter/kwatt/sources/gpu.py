"""GPU energy and activity behind one vendor-neutral interface.

``GpuBackend`` is the handful of calls kwatt makes on a GPU management library, addressed
by GPU UUID: ``kwatt.sources.nvml.PynvmlBackend`` implements it over nvidia-ml-py,
``kwatt.sources.amdsmi.AmdSmiBackend`` over AMD's amdsmi (tests/ implement it over scripted
values). ``GpuReader`` holds everything that is not a plain library call: discovery,
turning the energy counter (or integrated power) into per-interval joules that pass the
plausibility rule of ``kwatt.counters``, each stamped with the time it was read, the
last-seen timestamp of per-process samples, cached instance layouts (MIG instances, AMD
compute partitions), GPUs that get lost and come back. Per-call errors become ``Fault``
objects under the backend's source (``nvml``, ``amdsmi``); one bad GPU never stops the
others.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol

from kwatt.counters import CounterLimits, ceiling_from_limits, checked_step
from kwatt.faults import Fault

# The highest average power one GPU can honestly show when it states no power limit
# (kwatt.counters): twice the largest board power shipping today (B300, ~1.4 kW; MI355X
# 1.4 kW).
GPU_BOUND_WATTS = 3000.0
# How many GPUs' MIG layouts are enumerated at the same time, where the library allows
# concurrent calls (``GpuBackend.concurrent_calls``): one per GPU of a usual 8-GPU node, so
# start-up costs one layout's time, not one per GPU.
LAYOUT_THREADS = 8
log = logging.getLogger("kwatt.gpu")


class GpuCallError(Exception):
    """One library call failed. ``kind``: lost, not_supported, not_found, permission,
    timeout, unknown."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


class GpuLibraryUnavailable(Exception):
    """The library cannot be initialised (no driver, no library, no GPU)."""


_FAULT_REASON = {"lost": "absent", "not_found": "absent", "permission": "permission",
                 "timeout": "timeout", "not_supported": "api", "unknown": "api"}


@dataclass(frozen=True)
class ProcessSample:
    """One ``nvmlDeviceGetProcessUtilization`` sample: SM percent of one PID."""

    pid: int
    sm_percent: float
    timestamp_us: int


@dataclass(frozen=True)
class EnergyCounter:
    """One reading of a GPU's energy counter, in the device's own unit."""

    value: int
    unit_joules: float  # joules per count: 1e-3 for NVML (mJ); amdsmi's resolution x 1e-6
    wrap_at: int | None = None  # where the counter wraps; None: it never does


@dataclass(frozen=True)
class MigInstance:
    """A slice of a GPU that is handed out on its own: a MIG instance, or an AMD compute
    partition (then ``slices`` is 1 per partition and ``activity`` its GFX activity)."""

    uuid: str  # MIG-<uuid>, as the device plugin reports it; AMD: the partition's id
    gpu_instance_id: int
    slices: int  # GPU instance slice count (3 for 3g.20gb)
    profile: str  # e.g. "3g.20gb" or the device name when NVML gives no profile
    pids: tuple[int, ...] = ()  # compute processes running in the instance
    activity: float | None = None  # 0..1 where the library measures it; else from pids
    aliases: tuple[str, ...] = ()  # other device ids a device plugin may give it


class GpuBackend(Protocol):
    """The calls kwatt makes on one vendor's GPU library. Each raises ``GpuCallError``."""

    source: str  # kwatt_source_* name: nvml, amdsmi
    vendor: str  # kwatt_gpu_info's vendor label: nvidia, amd
    instance_activity_supported: bool  # False: never ask instance_activity
    # True: calls on different GPUs may run on several threads at once (NVML is
    # thread-safe); False: one call at a time.
    concurrent_calls: bool

    def init(self) -> None:
        """Load and initialise the library; raise ``GpuLibraryUnavailable`` when it cannot."""

    def driver_version(self) -> str: ...
    def device_uuids(self) -> list[str]:
        """UUIDs of all GPUs, in NVML index order."""
    def name(self, uuid: str) -> str: ...
    def index(self, uuid: str) -> int: ...
    def energy_counter(self, uuid: str) -> EnergyCounter: ...
    def power_mw(self, uuid: str) -> int: ...
    def power_limit_mw(self, uuid: str) -> int:
        """The enforced power limit (``nvmlDeviceGetEnforcedPowerLimit``)."""
    def utilisation_percent(self, uuid: str) -> int: ...
    def process_utilisation(self, uuid: str, since_us: int) -> list[ProcessSample]: ...
    def compute_pids(self, uuid: str) -> list[int]: ...
    def mig_enabled(self, uuid: str) -> bool: ...
    def mig_layout(self, uuid: str) -> list[MigInstance]:
        """The MIG instances of a GPU without their processes: UUID, GPU-instance id,
        slices, profile. Expensive (several calls per instance): the reader caches it."""
    def instance_pids(self, instance_uuid: str) -> list[int]:
        """Compute processes running in one MIG instance (one call on its device)."""
    def instance_activity(self, instance_uuid: str) -> float | None:
        """The instance's own activity 0..1 where the library has it (AMD partitions'
        GFX activity); None: weigh it by whether it runs processes."""
    def bus_id(self, uuid: str) -> str:
        """The GPU's PCI address, domain:bus:device.function in lower case."""


@dataclass(frozen=True)
class GpuReading:
    """One GPU over one interval, as the attribution needs it."""

    index: int
    uuid: str
    model: str
    mig_enabled: bool
    up: bool
    joules: float | None = None  # None on the first reading and after a re-baseline
    dt: float | None = None
    utilisation: float | None = None  # 0..1
    process_samples: tuple[ProcessSample, ...] = ()
    compute_pids: tuple[int, ...] = ()
    instances: tuple[MigInstance, ...] = ()
    energy_source: str = "counter"  # counter or power (integrated nvmlDeviceGetPowerUsage)
    read_at: float | None = None  # when the energy was read, on the reader's clock


    counter_mj: int | None = None  # the raw energy counter read, device units (restart state)
    vendor: str = "nvidia"
    source: str = "nvml"
    bus_id: str = ""  # PCI address, 0000:3b:00.0 (matches AMD device plugin ids)


@dataclass(frozen=True)
class GpuCycle:
    gpus: tuple[GpuReading, ...]
    faults: tuple[Fault, ...]
    calls: int  # NVML calls made this cycle, for the benchmark
    deferred: int = 0  # MIG calls left for a later cycle because the budget was spent
    seconds: float = 0.0  # how long the cycle took, on the reader's clock


@dataclass
class _GpuState:
    uuid: str
    index: int
    model: str = ""
    mig_enabled: bool = False
    up: bool = True
    has_counter: bool = True
    has_process_utilisation: bool = True
    last_counter: int | None = None
    last_power_mw: int | None = None
    last_time: float | None = None
    last_seen_us: int = 0
    static_known: bool = False
    ceiling_watts: float = GPU_BOUND_WATTS
    mig_capable: bool = True  # False once the MIG mode query says "not supported"
    bus_id: str = ""
    # The MIG layout (instances without processes) is cached: it changes only when MIG is
    # reconfigured, and enumerating it costs several slow calls per instance.
    layout_known: bool = False
    layout_read_at: float | None = None
    instances: tuple[MigInstance, ...] = field(default_factory=tuple)
    instance_pids: dict[str, tuple[int, ...]] = field(default_factory=dict)
    instance_activity: dict[str, float | None] = field(default_factory=dict)
    instance_activity_known: bool = True  # False once the library says "not supported"


class GpuReader:
    """Reads every GPU once per cycle through a backend; keeps the counter state.

    ``mig_refresh_seconds``: how often a cached MIG layout is enumerated again although
    nothing signalled a reconfiguration (an instance created in free slices signals
    nothing). MIG mode changes and instances that vanish trigger a refresh at once.
    """

    def __init__(self, backend: GpuBackend,
                 clock: Callable[[], float] = time.monotonic,
                 mig_refresh_seconds: float = 60.0) -> None:
        self._backend = backend
        self._source = backend.source
        self.vendor = backend.vendor
        self.source = backend.source
        self.sources = (backend.source,)
        # Each GPU's energy is stamped when it is read, not when the cycle began: the
        # stage may have waited on the kubelet first, and power is joules over these times.
        self._clock = clock
        self._mig_refresh = mig_refresh_seconds
        self._gpus: dict[str, _GpuState] = {}
        self._calls = 0
        self._next_instance = 0  # round-robin start for instance reads cut by the budget
        self.driver_version = ""

    @property
    def gpu_count(self) -> int:
        return len(self._gpus)

    def start(self) -> list[Fault]:
        """Initialise the library and discover the GPUs. Raises ``GpuLibraryUnavailable``."""
        self._backend.init()
        faults: list[Fault] = []
        self.driver_version = self._call(faults, "driver", self._backend.driver_version) or ""
        self._discover(faults)
        return faults

    def _call(self, faults: list[Fault], subject: str, fn: Callable[..., Any],
              *args: Any) -> Any:
        self._calls += 1
        try:
            return fn(*args)
        except GpuCallError as exc:
            faults.append(Fault(self._source, _FAULT_REASON.get(exc.kind, "api"), subject,
                                f"{getattr(fn, '__name__', 'nvml')}: {exc.detail}"))
            return None

    def _discover(self, faults: list[Fault]) -> None:
        uuids = self._call(faults, "devices", self._backend.device_uuids)
        for position, uuid in enumerate(uuids or []):
            if uuid not in self._gpus:
                self._gpus[uuid] = _GpuState(uuid, position)
                log.info("found GPU", extra={"gpu": position, "uuid": uuid})

    def _mig_mode(self, gpu: _GpuState, faults: list[Fault]) -> bool | None:
        """The MIG mode now; None when the query failed (a fault)."""
        if not gpu.mig_capable:
            return False
        try:
            self._calls += 1
            return bool(self._backend.mig_enabled(gpu.uuid))
        except GpuCallError as exc:
            if exc.kind == "not_supported":  # pre-Ampere GPUs: MIG simply does not exist
                gpu.mig_capable = False
                return False
            faults.append(Fault(self._source, _FAULT_REASON.get(exc.kind, "api"), gpu.uuid,
                                f"mig_enabled: {exc.detail}"))
            return None

    def _learn_static(self, gpu: _GpuState, faults: list[Fault]) -> bool:
        before = len(faults)
        b = self._backend
        index = self._call(faults, gpu.uuid, b.index, gpu.uuid)
        model = self._call(faults, gpu.uuid, b.name, gpu.uuid)
        mig = self._mig_mode(gpu, faults)
        if len(faults) > before:
            return False
        gpu.index, gpu.model = int(index), str(model)
        try:
            self._calls += 1
            gpu.bus_id = b.bus_id(gpu.uuid)
        except GpuCallError:
            gpu.bus_id = ""  # only device plugins that name GPUs by PCI address need it
        self._set_mig_mode(gpu, bool(mig))
        gpu.ceiling_watts = self._current_ceiling(gpu)
        gpu.static_known = True
        return True

    def _set_mig_mode(self, gpu: _GpuState, enabled: bool) -> None:
        if enabled != gpu.mig_enabled or not enabled:
            gpu.layout_known = False
            gpu.layout_read_at = None
            gpu.instances = ()
            gpu.instance_pids = {}
        gpu.mig_enabled = enabled

    def _current_ceiling(self, gpu: _GpuState) -> float:
        """Twice the enforced power limit as it is now, at most ``GPU_BOUND_WATTS``."""
        try:
            self._calls += 1
            limits = [self._backend.power_limit_mw(gpu.uuid) / 1000.0]
        except GpuCallError:
            limits = []  # the limit only narrows the ceiling; without it the bound applies
        return ceiling_from_limits(limits, GPU_BOUND_WATTS)

    def read(self, want_pids: bool, budget_seconds: float | None = None) -> GpuCycle:
        """One reading of every GPU. ``want_pids``: also list compute processes (host mode).

        Every GPU's energy is read in every cycle. The slow MIG calls (layouts, instance
        processes) start only while ``budget_seconds`` (None: no bound) has not been spent
        since the cycle began; the rest wait for the next cycle, round-robin, and keep
        their last known processes meanwhile."""
        self._calls = 0
        started = self._clock()
        faults: list[Fault] = []
        if any(not g.up for g in self._gpus.values()):
            self._discover(faults)  # a GPU that fell off the bus may come back renumbered
        readings = {uuid: self._read_gpu(gpu, want_pids, faults)
                    for uuid, gpu in self._gpus.items()}
        deferred = self._read_mig(readings, faults, started, budget_seconds)
        out = sorted(readings.values(), key=lambda r: r.index)
        return GpuCycle(tuple(out), tuple(faults), self._calls, deferred,
                         self._clock() - started)

    def counters(self) -> dict[str, tuple[int, float]]:
        """UUID -> (energy mJ, when read) the next deltas start from (restart state)."""
        return {g.uuid: (g.last_counter, g.last_time) for g in self._gpus.values()
                if g.has_counter and g.last_counter is not None and g.last_time is not None}

    def seed(self, counters: Mapping[str, tuple[int, float]]) -> int:
        """Start the next deltas from counters read before a restart; returns how many
        GPUs were seeded. A counter that is lower by then (driver reload) takes the
        normal backwards path: re-baselined, nothing booked."""
        seeded = 0
        for uuid, (energy_mj, when) in counters.items():
            gpu = self._gpus.get(uuid)
            if gpu is not None and gpu.has_counter:
                gpu.last_counter, gpu.last_time = energy_mj, when
                seeded += 1
        return seeded

    def _mark_down(self, gpu: _GpuState) -> GpuReading:
        if gpu.up:
            log.warning("GPU is down; its energy is not counted until it answers again",
                        extra={"gpu": gpu.index, "uuid": gpu.uuid})
        gpu.up = False
        # Energy spent while it was unreadable cannot be attributed to anyone: start over.
        gpu.last_counter = gpu.last_power_mw = None
        gpu.last_time = None
        gpu.static_known = False
        gpu.layout_known = False
        return GpuReading(gpu.index, gpu.uuid, gpu.model, gpu.mig_enabled, up=False,
                          vendor=self.vendor, source=self.source)

    def _read_gpu(self, gpu: _GpuState, want_pids: bool,
                  faults: list[Fault]) -> GpuReading:
        b = self._backend
        before = len(faults)
        known_before = gpu.static_known
        if not gpu.static_known and not self._learn_static(gpu, faults):
            return self._mark_down(gpu)
        if not gpu.up:
            log.info("GPU is back", extra={"gpu": gpu.index, "uuid": gpu.uuid})
            gpu.up = True
        if known_before and gpu.mig_enabled:
            # The cheap reconfiguration check: one call on the parent, every cycle. (Turning
            # MIG on needs a GPU reset, which re-learns everything anyway.)
            mig = self._mig_mode(gpu, faults)
            if mig is None:
                return self._mark_down(gpu)
            if mig != gpu.mig_enabled:
                log.info("GPU MIG mode changed", extra={
                    "gpu": gpu.index, "uuid": gpu.uuid, "mig": mig})
                self._set_mig_mode(gpu, mig)
        if gpu.mig_enabled and not gpu.layout_known and gpu.last_time is not None:
            # Until the layout is known the energy cannot be split: it stays in the
            # counter and is booked, whole, by the first reading after the layout is read.
            return GpuReading(gpu.index, gpu.uuid, gpu.model, True, True,
                              vendor=self.vendor, source=self.source, bus_id=gpu.bus_id)

        implausible: list[Fault] = []
        joules, energy_source, read_at = self._energy(gpu, faults, implausible)
        if len(faults) > before:
            return self._mark_down(gpu)
        # An implausible step is counted, but the GPU answered: it stays up.
        faults.extend(implausible)
        before = len(faults)
        dt = None if gpu.last_time is None else read_at - gpu.last_time
        gpu.last_time = read_at

        utilisation: float | None = None
        samples: tuple[ProcessSample, ...] = ()
        pids: tuple[int, ...] = ()
        if not gpu.mig_enabled:
            # MIG has no device or per-process utilisation; instance activity comes from
            # the processes running in each instance (read in _read_mig).
            percent = self._optional(gpu, faults, b.utilisation_percent, gpu.uuid)
            utilisation = None if percent is None else min(max(percent / 100.0, 0.0), 1.0)
            samples = self._process_samples(gpu, faults)
            if want_pids:
                found = self._call(faults, gpu.uuid, b.compute_pids, gpu.uuid)
                pids = tuple(found or ())
        if any(f.reason == "absent" for f in faults[before:]):
            return self._mark_down(gpu)
        counter = gpu.last_counter if energy_source == "counter" else None
        return GpuReading(gpu.index, gpu.uuid, gpu.model, gpu.mig_enabled, True,
                          joules if dt is not None else None, dt, utilisation, samples, pids,
                          (), energy_source, read_at, counter, self.vendor, self.source,
                          gpu.bus_id)

    def _read_mig(self, readings: dict[str, GpuReading], faults: list[Fault],
                  started: float, budget: float | None) -> int:
        """Layouts that are unknown or due, then instance processes, within the budget.
        Returns how many calls were left for later."""
        mig = [g for g in self._gpus.values()
               if g.up and g.mig_enabled and g.static_known]
        if not mig:
            return 0
        now = self._clock()
        unknown = [g for g in mig if not g.layout_known]
        due = [g for g in mig if g.layout_known and g.layout_read_at is not None
               and now - g.layout_read_at >= self._mig_refresh]
        deferred = 0

        def spent() -> bool:
            return budget is not None and self._clock() - started >= budget

        # Unknown layouts hold their GPU's energy back: they are enumerated side by side
        # where the library is thread-safe. A due refresh of a known layout holds nothing
        # back and goes one GPU at a time, so a driver that serialises concurrent calls
        # costs a long reading only at start-up and reconfiguration, never every refresh.
        width = LAYOUT_THREADS if self._backend.concurrent_calls else 1
        batches = [unknown[i:i + width] for i in range(0, len(unknown), width)]
        batches += [[g] for g in due]
        for position, batch in enumerate(batches):
            if spent():
                deferred += sum(len(b) for b in batches[position:])
                break
            self._read_layouts(batch, faults)
        for gpu in unknown:
            if gpu.up and gpu.layout_known:
                readings[gpu.uuid] = self._energy_after_layout(gpu, readings[gpu.uuid],
                                                               faults)
        # Instance processes, round-robin so that a budget cut never starves the same ones.
        instances = [(g, i) for g in mig if g.up and g.layout_known for i in g.instances]
        if instances:
            start = self._next_instance % len(instances)
            order = instances[start:] + instances[:start]
            for done, (gpu, instance) in enumerate(order):
                if spent():
                    deferred += len(order) - done
                    self._next_instance = start + done
                    break
                if gpu.up and gpu.layout_known:
                    self._read_instance_pids(gpu, instance, faults)
            else:
                self._next_instance = 0
        for gpu in mig:
            reading = readings[gpu.uuid]
            if not gpu.up:
                readings[gpu.uuid] = GpuReading(gpu.index, gpu.uuid, gpu.model, True, False,
                                                vendor=self.vendor, source=self.source)
            elif reading.up:
                readings[gpu.uuid] = replace(reading, instances=tuple(
                    replace(i, pids=gpu.instance_pids.get(i.uuid, ()),
                            activity=gpu.instance_activity.get(i.uuid))
                    for i in gpu.instances))
        return deferred

    def _energy_after_layout(self, gpu: _GpuState, reading: GpuReading,
                             faults: list[Fault]) -> GpuReading:
        """A GPU whose layout was learned in this reading: its energy is read once more, so
        that the energy it held while the layout was unknown (or, on the first reading,
        since the baseline) is booked now, whole, with the layout, not one reading later."""
        before = len(faults)
        implausible: list[Fault] = []
        joules, energy_source, read_at = self._energy(gpu, faults, implausible)
        if len(faults) > before:
            return self._mark_down(gpu)
        faults.extend(implausible)
        dt = None if gpu.last_time is None else read_at - gpu.last_time
        gpu.last_time = read_at
        return replace(reading, joules=joules if dt is not None else None, dt=dt,
                       energy_source=energy_source, read_at=read_at,
                       counter_mj=gpu.last_counter if energy_source == "counter" else None)

    def _read_layouts(self, gpus: Sequence[_GpuState], faults: list[Fault]) -> None:
        """Enumerate the layouts of ``gpus``, side by side when there are several; the
        answers are applied here, on the reading's thread, in GPU order."""
        answers: list[list[MigInstance] | Exception] = [GpuCallError("unknown", "no answer")
                                                        ] * len(gpus)

        def enumerate_layout(position: int) -> None:  # on its own thread: no reader state
            try:
                answers[position] = self._backend.mig_layout(gpus[position].uuid)
            except Exception as exc:  # a bug is raised on the reading's thread below
                answers[position] = exc

        if len(gpus) == 1:
            enumerate_layout(0)
        else:
            # Daemon threads, not a ThreadPoolExecutor: a call hung in the driver must not
            # hold up the process's exit (the executor joins its workers at exit).
            threads = [threading.Thread(target=enumerate_layout, args=(position,),
                                        name=f"kwatt-gpu-layout-{position}", daemon=True)
                       for position in range(len(gpus))]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        for gpu, answer in zip(gpus, answers, strict=True):
            self._calls += 1
            if isinstance(answer, GpuCallError):
                faults.append(Fault(self._source, _FAULT_REASON.get(answer.kind, "api"),
                                    gpu.uuid, f"mig_layout: {answer.detail}"))
                if answer.kind in ("lost", "not_found"):
                    self._mark_down(gpu)
                continue
            if isinstance(answer, Exception):
                raise answer
            self._apply_layout(gpu, answer)

    def _apply_layout(self, gpu: _GpuState, found: Sequence[MigInstance]) -> None:
        layout = tuple(replace(i, pids=(), activity=None) for i in found)
        if gpu.layout_known and {i.uuid for i in layout} != {i.uuid for i in gpu.instances}:
            log.info("MIG layout changed", extra={
                "gpu": gpu.index, "uuid": gpu.uuid,
                "instances": ",".join(f"{i.profile}:{i.uuid}" for i in layout)})
        gpu.instances = layout
        gpu.instance_pids = {i.uuid: gpu.instance_pids.get(i.uuid, ()) for i in layout}
        gpu.layout_known = True
        gpu.layout_read_at = self._clock()

    def _read_instance_pids(self, gpu: _GpuState, instance: MigInstance,
                            faults: list[Fault]) -> None:
        self._calls += 1
        try:
            pids = self._backend.instance_pids(instance.uuid)
        except GpuCallError as exc:
            if exc.kind == "not_found":
                # The instance is gone: MIG was reconfigured. Read the layout again; until
                # then the GPU's energy waits in its counter.
                log.info("MIG instance vanished; reading the layout again", extra={
                    "gpu": gpu.index, "uuid": gpu.uuid, "instance": instance.uuid})
                gpu.layout_known = False
                return
            faults.append(Fault(self._source, _FAULT_REASON.get(exc.kind, "api"), gpu.uuid,
                                f"instance_pids {instance.uuid}: {exc.detail}"))
            if exc.kind == "lost":
                self._mark_down(gpu)
            return
        gpu.instance_pids[instance.uuid] = tuple(int(p) for p in pids)
        if gpu.instance_activity_known and self._backend.instance_activity_supported:
            try:
                self._calls += 1
                gpu.instance_activity[instance.uuid] = self._backend.instance_activity(
                    instance.uuid)
            except GpuCallError as exc:
                if exc.kind == "not_supported":
                    gpu.instance_activity_known = False
                else:
                    gpu.instance_activity.pop(instance.uuid, None)

    def _optional(self, gpu: _GpuState, faults: list[Fault], fn: Callable[..., Any],
                  *args: Any) -> Any:
        self._calls += 1
        try:
            return fn(*args)
        except GpuCallError as exc:
            if exc.kind != "not_supported":
                faults.append(Fault(self._source, _FAULT_REASON.get(exc.kind, "api"), gpu.uuid,
                                    f"{getattr(fn, '__name__', 'nvml')}: {exc.detail}"))
            return None

    def _energy(self, gpu: _GpuState, faults: list[Fault], implausible: list[Fault]
                ) -> tuple[float | None, str, float]:
        """This interval's joules (None: unknown), where they come from, and when read."""
        b = self._backend
        if gpu.has_counter:
            self._calls += 1
            try:
                reading = b.energy_counter(gpu.uuid)
            except GpuCallError as exc:
                if exc.kind != "not_supported":
                    faults.append(Fault(self._source, _FAULT_REASON.get(exc.kind, "api"),
                                        gpu.uuid, f"energy_counter: {exc.detail}"))
                    return None, "counter", self._clock()
                log.info("GPU has no energy counter; integrating its power readings",
                         extra={"gpu": gpu.index, "uuid": gpu.uuid})
                gpu.has_counter = False
            else:
                read_at = self._clock()
                previous = gpu.last_counter
                # Re-baselined on every reading: after a driver reload (the counter counts
                # since driver load) or a glitch, the next interval is measured again.
                gpu.last_counter = reading.value
                if previous is None:
                    return None, "counter", read_at
                dt = None if gpu.last_time is None else read_at - gpu.last_time
                # NVML's 64-bit mJ counter never wraps: going back is a reset. A counter
                # that states its wrap point (amdsmi) wraps through the same rule.
                # A limit raised since discovery (nvidia-smi -pl) is re-read on rejection.
                step, gpu.ceiling_watts = checked_step(
                    previous, reading.value, dt,
                    CounterLimits(reading.unit_joules, gpu.ceiling_watts, reading.wrap_at),
                    lambda: self._current_ceiling(gpu))
                if step.problem is not None:
                    implausible.append(Fault(self._source, "implausible", gpu.uuid,
                                             f"energy_counter: {step.problem}"))
                return step.joules, "counter", read_at
        mw = self._call(faults, gpu.uuid, b.power_mw, gpu.uuid)
        read_at = self._clock()
        if mw is None:
            return None, "power", read_at
        previous_mw, gpu.last_power_mw = gpu.last_power_mw, int(mw)
        if previous_mw is None or gpu.last_time is None:
            return None, "power", read_at
        # Trapezoid over the interval: both ends are ~1 s averages NVML keeps for us.
        watts = max((previous_mw + int(mw)) / 2.0 / 1000.0, 0.0)
        if watts > gpu.ceiling_watts:
            gpu.ceiling_watts = max(gpu.ceiling_watts, self._current_ceiling(gpu))
        if watts > gpu.ceiling_watts:
            implausible.append(Fault(self._source, "implausible", gpu.uuid,
                                     f"power_mw: {watts:.0f} W is above the "
                                     f"{gpu.ceiling_watts:.0f} W ceiling"))
            gpu.last_power_mw = None
            return None, "power", read_at
        return watts * (read_at - gpu.last_time), "power", read_at

    def _process_samples(self, gpu: _GpuState,
                         faults: list[Fault]) -> tuple[ProcessSample, ...]:
        if not gpu.has_process_utilisation:
            return ()
        self._calls += 1
        try:
            samples = self._backend.process_utilisation(gpu.uuid, gpu.last_seen_us)
        except GpuCallError as exc:
            if exc.kind == "not_found":  # no process had activity since last_seen
                return ()
            if exc.kind == "not_supported":
                log.info("GPU has no per-process utilisation; shared GPUs split evenly",
                         extra={"gpu": gpu.index, "uuid": gpu.uuid})
                gpu.has_process_utilisation = False
                return ()
            faults.append(Fault(self._source, _FAULT_REASON.get(exc.kind, "api"), gpu.uuid,
                                f"process_utilisation: {exc.detail}"))
            return ()
        fresh = tuple(s for s in samples if s.timestamp_us > gpu.last_seen_us)
        if fresh:
            gpu.last_seen_us = max(s.timestamp_us for s in fresh)
        return fresh




def normalise_bus_id(bus_id: str) -> str:
    """'00000000:3B:00.0' (NVML) or '0000:3b:00.0' -> '0000:3b:00.0'."""
    text = bus_id.strip().lower()
    domain, sep, rest = text.partition(":")
    if not sep or rest.count(":") != 1:
        return text
    try:
        return f"{int(domain, 16):04x}:{rest}"
    except ValueError:
        return text


class CombinedReader:
    """Several vendors' readers as one (``--gpu auto`` on a node with NVIDIA and AMD GPUs):
    readings concatenated, counters keyed by UUID (unique across vendors)."""

    def __init__(self, readers: Sequence[GpuReader]) -> None:
        self.readers = tuple(readers)

    @property
    def gpu_count(self) -> int:
        return sum(r.gpu_count for r in self.readers)

    @property
    def sources(self) -> tuple[str, ...]:
        return tuple(r.source for r in self.readers)

    @property
    def driver_version(self) -> str:
        return self.readers[0].driver_version if len(self.readers) == 1 else ""

    def driver_versions(self) -> dict[str, str]:
        """vendor -> driver version."""
        return {r.vendor: r.driver_version for r in self.readers}

    def read(self, want_pids: bool, budget_seconds: float | None = None) -> GpuCycle:
        cycles = [r.read(want_pids, budget_seconds) for r in self.readers]
        if len(cycles) == 1:
            return cycles[0]
        return GpuCycle(tuple(g for c in cycles for g in c.gpus),
                        tuple(f for c in cycles for f in c.faults),
                        sum(c.calls for c in cycles), sum(c.deferred for c in cycles),
                        sum(c.seconds for c in cycles))

    def counters(self) -> dict[str, tuple[int, float]]:
        out: dict[str, tuple[int, float]] = {}
        for reader in self.readers:
            out.update(reader.counters())
        return out

    def seed(self, counters: Mapping[str, tuple[int, float]]) -> int:
        return sum(r.seed(counters) for r in self.readers)


def load_reader(factory: Callable[[], GpuBackend],
                clock: Callable[[], float] = time.monotonic,
                mig_refresh_seconds: float = 60.0) -> tuple[GpuReader | None, str]:
    """A started reader over ``factory()``, or None and a one-line reason why the library
    cannot be used (not installed, not loadable, not initialisable)."""
    try:
        backend = factory()
        reader = GpuReader(backend, clock, mig_refresh_seconds)
        faults = reader.start()
    except (GpuLibraryUnavailable, ImportError, OSError) as exc:
        return None, str(exc) or type(exc).__name__
    for fault in faults:
        log.warning("GPU discovery failed", extra={"source": fault.source,
                                                   "subject": fault.subject,
                                                   "reason": fault.reason,
                                                   "detail": fault.detail})
    return reader, ""
