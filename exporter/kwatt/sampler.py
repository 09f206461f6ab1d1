"""The sampling loop: read sources and workloads, attribute, accumulate, publish.

One cycle per ``--interval``, on its own thread, independent of scrapes. The sampler reads
what every stage shares (node CPU time, workload cgroups and their names) and runs the
stages: CPU/DRAM (kwatt.stages.cpu), the extra ``EnergyStage``s (GPUs), then the
``CycleStage`` that needs their results (the platform meter's `other`). It books their
splits in the ledger and ends by publishing an immutable snapshot that the collector
renders.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from kwatt.attribution import (
    ComponentSplit,
    WorkloadActivity,
    exclusive_cpu_seconds,
)
from kwatt.config import Config
from kwatt.faults import Fault
from kwatt.ledger import EnergyLedger, LedgerSnapshot, WorkloadLabels
from kwatt.logs import RateLimitedLog
from kwatt.sources import model as estimation
from kwatt.sources.meter import PlatformMeter
from kwatt.sources.procfs import NodeCpuTimes, read_memory_bytes, read_node_cpu
from kwatt.stages.cpu import CpuStage
from kwatt.state import Counters, StateRejected
from kwatt.text import clean_text, is_clean
from kwatt.workloads.cgroups import (
    CgroupIdentity,
    CgroupLayout,
    CgroupUsage,
    detect_cgroup_layout,
    scan_cgroups,
)
from kwatt.workloads.naming import WorkloadNamer

log = logging.getLogger("kwatt.sampler")


@dataclass(frozen=True)
class StageResult:
    """What an extra energy stage (e.g. GPUs) contributes to one cycle."""

    splits: Sequence[ComponentSplit[Hashable]] = ()  # booked like CPU/DRAM splits
    faults: Sequence[Fault] = ()
    source_up: Mapping[str, bool] = field(default_factory=dict)
    # Average power per (component, source) over the stage's own readings, each stamped
    # when it was taken. Splits without an entry here are divided by the cycle's dt.
    watts: Mapping[tuple[str, str], float] = field(default_factory=dict)
    # What the stage's collector renders, published together with the ledger's snapshot
    # at the end of the cycle so that a scrape never mixes two cycles. None: nothing.
    snapshot: object | None = None
    # Raw platform meter energy per (source, sensor) measured this cycle; detail only.
    platform_energy: Mapping[tuple[str, str], float] = field(default_factory=dict)


@dataclass(frozen=True)
class CycleEnergy:
    """What the stages before it booked this cycle, handed to a stage that depends on it
    (the platform stage's `other` is a meter minus cpu, dram and gpu)."""

    dt: float | None
    utilisation: float | None
    splits: Sequence[ComponentSplit[Hashable]]
    activities: Sequence[WorkloadActivity[Hashable]]


class CycleStage(Protocol):
    """A stage run last in each cycle, given the cycle's other splits."""

    def sample(self, now: float, cycle: CycleEnergy) -> StageResult: ...


class EnergyStage(Protocol):
    """A further energy source with its own attribution, run once per cycle after CPU/DRAM.

    ``workloads`` maps every workload cgroup identity present this cycle to its labels
    (None while unnamed), so a stage can find the ledger key of a container it knows by
    name (PodResources) or by cgroup path (a PID's /proc/<pid>/cgroup).
    """

    def sample(self, now: float,
               workloads: Mapping[CgroupIdentity, WorkloadLabels | None]) -> StageResult: ...


@dataclass(frozen=True)
class PublishedCycle:
    """One completed cycle as scrapes see it: the ledger's snapshot and, per stage (in
    stage order), the snapshot its collector renders. Replaced as a whole, never edited."""

    ledger: LedgerSnapshot = field(default_factory=LedgerSnapshot)
    stages: tuple[object | None, ...] = ()


@dataclass(frozen=True)
class CycleReport:
    """What one cycle did, for --once and for tests that step the sampler."""

    dt: float | None
    utilisation: float | None
    node_watts: dict[tuple[str, str], float]
    workload_watts: dict[Hashable, float]


class Sampler:
    def __init__(self, config: Config, namer: WorkloadNamer,
                 clock: Callable[[], float] = time.monotonic,
                 include_host_units: bool = True,
                 stages: Sequence[EnergyStage] = (),
                 platform: CycleStage | None = None,
                 hwmon_cpu: PlatformMeter | None = None) -> None:
        self._config = config
        self._stages = tuple(stages)
        self._platform = platform
        self._namer = namer
        self._clock = clock
        self._include_host_units = include_host_units
        self.ledger = EnergyLedger(config.retention_seconds, config.max_retained_containers,
                                   config.workload_retention_seconds, config.max_workloads,
                                   level=config.metrics_level)
        self._published = PublishedCycle(stages=(None,) * len(self._stages))
        self._faultlog = RateLimitedLog(log)
        self._cgroup_layout: CgroupLayout | None = None
        self._previous_cpu: NodeCpuTimes | None = None
        self._previous_time: float | None = None
        self._previous_usage: dict[str, float] = {}
        self._cpu = CpuStage(config, hwmon_cpu)
        self._memory_bytes: int | None = None
        self._last_faults: set[tuple[str, str, str]] = set()
        # Called in this thread after each cycle has published its snapshot (restart state).
        self.on_cycle: Callable[[LedgerSnapshot], None] | None = None
        self._discover()

    # -- setup ----------------------------------------------------------------------------

    def _discover(self) -> None:
        cfg = self._config
        for fault in self._cpu.discover():
            self._report(fault)
        self._cgroup_layout = detect_cgroup_layout(cfg.sysfs)
        if self._cgroup_layout is None:
            self._report(Fault("cgroup", "absent", f"{cfg.sysfs}/fs/cgroup",
                               "no cgroup v2 hierarchy nor v1 cpuacct controller"))
        else:
            log.info("reading cgroup CPU time", extra={
                "cgroup_version": self._cgroup_layout.version, "root": self._cgroup_layout.root})
        memory, memory_fault = read_memory_bytes(cfg.procfs)
        self._memory_bytes = memory
        if memory_fault is not None and cfg.model.estimate_dram:
            self._report(memory_fault)

    # -- health ---------------------------------------------------------------------------

    def _report(self, fault: Fault) -> None:
        self.ledger.count_error(fault.source, fault.reason)
        key = f"{fault.source}|{fault.reason}|{fault.subject}"
        self._faultlog.log(logging.WARNING, key, "source read failed", source=fault.source,
                           reason=fault.reason, subject=fault.subject, detail=fault.detail)

    # -- one cycle ------------------------------------------------------------------------

    def snapshot(self) -> LedgerSnapshot:
        return self._published.ledger

    def published(self) -> PublishedCycle:
        """The last completed cycle; a scrape takes it once and renders everything from it."""
        return self._published

    def _publish(self, stages: Sequence[object | None] | None = None) -> None:
        """Publish the ledger with the stages' snapshots of the same cycle (None: keep the
        previous ones, for a cycle whose stages did not run)."""
        self._published = PublishedCycle(
            self.ledger.snapshot(),
            self._published.stages if stages is None else tuple(stages))

    def sample(self) -> CycleReport:
        started = time.perf_counter()
        now = self._clock()
        cfg = self._config
        faults: list[Fault] = []

        cpu_times, fault = read_node_cpu(cfg.procfs)
        if fault is not None:
            faults.append(fault)
        dt = None if self._previous_time is None else now - self._previous_time
        # Energy right after /proc/stat and before the cgroup scan: the windows line up.
        energy = self._cpu.read(dt)
        faults.extend(energy.faults)
        cgroups: tuple[CgroupUsage, ...] = ()
        if self._cgroup_layout is not None:
            scan = scan_cgroups(self._cgroup_layout,
                                include_host_units=self._include_host_units)
            cgroups = scan.cgroups
            faults.extend(scan.faults)

        utilisation: float | None = None
        node_busy_seconds = 0.0
        if cpu_times is not None and self._previous_cpu is not None:
            busy = cpu_times.busy_ticks - self._previous_cpu.busy_ticks
            idle = cpu_times.idle_ticks - self._previous_cpu.idle_ticks
            if busy >= 0 and idle >= 0 and busy + idle > 0:
                utilisation = busy / (busy + idle)
                node_busy_seconds = busy / cfg.clock_ticks_per_second

        activities, present = self._workload_activity(cgroups, first=dt is None)
        report_watts: dict[tuple[str, str], float] = {}
        workload_joules: dict[Hashable, float] = {}
        cycle_splits: list[ComponentSplit[Hashable]] = []
        if dt is not None and dt > 0:
            cpu = self._cpu.split(energy, now, dt, cpu_times, utilisation, node_busy_seconds,
                                  activities, self._memory_bytes)
            for zone, index, joules in cpu.zone_joules:
                self.ledger.add_zone(zone, index, joules)
            for unsplit in cpu.unsplit:
                # Without node CPU time nothing can be split: book it, charge nobody.
                self.ledger.add_node(unsplit.component, unsplit.source, unsplit.joules)
                self.ledger.add_unattributed(unsplit.component, "system", unsplit.joules)
                cycle_splits.append(ComponentSplit(unsplit.component, unsplit.source,
                                                   unsplit.joules, {}, 0.0, unsplit.joules))
                report_watts[(unsplit.component, unsplit.source)] = unsplit.joules / dt
            for split in cpu.splits:
                self.ledger.add_split(split)
                cycle_splits.append(split)
                for key, joules in split.to_workloads.items():
                    workload_joules[key] = workload_joules.get(key, 0.0) + joules
                report_watts[(split.component, split.source)] = split.joules / dt
        identities = {k: v for k, v in present.items() if isinstance(k, CgroupIdentity)}
        stage_snapshots: list[object | None] = []
        results = [stage.sample(now, identities) for stage in self._stages]
        for result in results:
            stage_snapshots.append(result.snapshot)
            cycle_splits.extend(result.splits)
        if self._platform is not None:
            results.append(self._platform.sample(now, CycleEnergy(
                dt, utilisation, tuple(cycle_splits), tuple(activities))))
        for result in results:
            faults.extend(result.faults)
            for (source, sensor), joules in result.platform_energy.items():
                self.ledger.add_platform(source, sensor, joules)
            for source, up in result.source_up.items():
                self.ledger.set_source_up(source, up)
            for split in result.splits:
                self.ledger.add_split(split)
                for key, joules in split.to_workloads.items():
                    workload_joules[key] = workload_joules.get(key, 0.0) + joules
                if dt and (split.component, split.source) not in result.watts:
                    report_watts[(split.component, split.source)] = (
                        report_watts.get((split.component, split.source), 0.0)
                        + split.joules / dt)
            for key, watts in result.watts.items():
                report_watts[key] = report_watts.get(key, 0.0) + watts
        if dt is not None and dt > 0:
            self.ledger.node_power = dict(report_watts)

        self.ledger.observe_workloads(present, now)
        # A cgroup that ended before its pod was known (watch lag, API outage) is named
        # as soon as the pod appears, so its energy lands in the right namespace.
        for key in self.ledger.unnamed_finished():
            if isinstance(key, CgroupIdentity):
                late = self._namer.name(key)
                if late is not None:
                    self.ledger.name_workload(key, late)
        self._previous_time = now
        if cpu_times is not None:
            self._previous_cpu = cpu_times
        estimating = any(source == estimation.SOURCE for _, source in report_watts)
        self._publish_health(faults, energy.rapl_in_use, estimating)
        if self._cpu.uses_hwmon:
            self.ledger.set_source_up("hwmon", not energy.hwmon_failed and all(
                r.source_up.get("hwmon", True) for r in results))
        self.ledger.observe_cycle(time.perf_counter() - started, now)
        self._publish(stage_snapshots)
        if self.on_cycle is not None:
            self.on_cycle(self._published.ledger)
        return CycleReport(dt, utilisation, report_watts,
                           {k: j / dt for k, j in workload_joules.items()} if dt else {})

    def _workload_activity(self, cgroups: tuple[CgroupUsage, ...], first: bool
                           ) -> tuple[list[WorkloadActivity[Hashable]],
                                      dict[Hashable, WorkloadLabels | None]]:
        deltas: dict[str, float] = {}
        parents: dict[str, str | None] = {}
        identities: dict[str, CgroupIdentity] = {}
        usage_now: dict[str, float] = {}
        for cgroup in cgroups:
            usage_now[cgroup.path] = cgroup.usage_seconds
            parents[cgroup.path] = cgroup.parent
            identities[cgroup.path] = cgroup.identity
            previous = self._previous_usage.get(cgroup.path)
            if previous is None and not is_clean(cgroup.path):
                # Accounted all the same, under a name with U+FFFD; counted once when it
                # appears, so one odd unit does not mark the whole cgroup source down.
                self._report(Fault("cgroup", "parse", clean_text(cgroup.path),
                                   "cgroup name is not valid UTF-8; its labels show U+FFFD "
                                   "for each undecodable byte"))
            if previous is None:
                # New since the last cycle: all of its CPU time was spent in this interval.
                # On the very first cycle we cannot know that, so it only sets the baseline.
                deltas[cgroup.path] = 0.0 if first else cgroup.usage_seconds
            elif cgroup.usage_seconds < previous:
                deltas[cgroup.path] = cgroup.usage_seconds  # recreated under the same path
            else:
                deltas[cgroup.path] = cgroup.usage_seconds - previous
        self._previous_usage = usage_now
        exclusive = exclusive_cpu_seconds(deltas, parents)
        activities: list[WorkloadActivity[Hashable]] = []
        present: dict[Hashable, WorkloadLabels | None] = {}
        for path, seconds in exclusive.items():
            identity = identities[path]
            try:
                request = self._namer.cpu_request(identity)
                name = self._namer.name(identity)
            except Exception as exc:  # one workload's bad name must not stop the others
                self._report(Fault("cgroup", "parse", clean_text(path),
                                   f"cannot name the workload: {exc!r}"))
                request, name = 0.0, None  # held by id, as while its pod is unknown
            activities.append(WorkloadActivity(identity, seconds, request))
            present[identity] = name
        return activities, present

    def _publish_health(self, faults: list[Fault], rapl_in_use: bool,
                        estimating: bool) -> None:
        for fault in faults:
            self._report(fault)
        failed = {f.source for f in faults}
        self.ledger.set_source_up("procfs", "procfs" not in failed)
        self.ledger.set_source_up("cgroup", self._cgroup_layout is not None
                                  and "cgroup" not in failed)
        if rapl_in_use:
            self.ledger.set_source_up("rapl", "rapl" not in failed)
        if estimating:
            self.ledger.set_source_up("model", True)
        elif "model" in self.ledger.source_up:
            if "procfs" in failed:  # the model needs node utilisation: it could not run
                self.ledger.set_source_up("model", False)
            else:  # measured again (RAPL came back): the model is no longer a source
                del self.ledger.source_up["model"]
        current = {(f.source, f.reason, f.subject) for f in faults}
        for source, reason, subject in self._last_faults - current:
            self._faultlog.forget(f"{source}|{reason}|{subject}")
            log.info("source read recovered", extra={"source": source, "subject": subject})
        self._last_faults = current

    # -- restart state --------------------------------------------------------------------

    def export_counters(self) -> Counters | None:
        """The raw counters the last completed cycle ended on; None before the first."""
        if self._previous_time is None:
            return None
        cpu = self._previous_cpu
        return Counters(
            self._previous_time,
            self._cgroup_layout.version if self._cgroup_layout is not None else 0,
            self._include_host_units,
            None if cpu is None else cpu.busy_ticks, None if cpu is None else cpu.idle_ticks,
            self._cpu.export_rapl(),
            {}, dict(self._previous_usage))

    def restore_counters(self, counters: Counters) -> None:
        """Continue from counters saved before a restart, so that the first cycle books the
        gap's energy from the deltas. Raises ``StateRejected`` (nothing seeded) when they
        do not belong to this node as it is now: another cgroup layout, or a counter that
        is now lower (a RAPL wrap in the gap cannot be told from a foreign file)."""
        version = self._cgroup_layout.version if self._cgroup_layout is not None else 0
        if (counters.cgroup_version, counters.host_units) != (version,
                                                              self._include_host_units):
            raise StateRejected("inconsistent: saved under another cgroup layout or mode")
        cpu, _ = read_node_cpu(self._config.procfs)
        if cpu is not None and counters.node_busy_ticks is not None and (
                cpu.busy_ticks < counters.node_busy_ticks
                or cpu.idle_ticks < (counters.node_idle_ticks or 0)):
            raise StateRejected("inconsistent: node CPU time is lower now than saved")
        self._cpu.restore_rapl(counters.rapl_uj)
        if cpu is not None and counters.node_busy_ticks is not None:
            self._previous_cpu = NodeCpuTimes(counters.node_busy_ticks,
                                              counters.node_idle_ticks or 0, cpu.vcpus)
        self._previous_usage = dict(counters.cgroup_usage)
        self._previous_time = counters.monotonic

    # -- the loop -------------------------------------------------------------------------

    def _cursors(self) -> tuple[object, ...]:
        """Where the sampler's own readings stand before a cycle."""
        return (self._previous_time, self._previous_cpu, self._previous_usage,
                self._cpu.cursor())

    def _undo_cycle(self, cursors: tuple[object, ...]) -> None:
        """A cycle failed half-way: undo what it booked and where its readings stand, so
        the next cycle measures the whole span from the last good one and books it once
        (nothing lost, nothing twice; an extra stage's own interval is lost). Then publish,
        so the failure is counted on /metrics although the cycle did not complete."""
        self.ledger.rollback()
        (self._previous_time, self._previous_cpu, self._previous_usage,
         cpu) = cursors  # type: ignore[assignment]
        self._cpu.set_cursor(cpu)
        self.ledger.count_error("sampler", "api")
        self._publish()

    def run(self, stop: threading.Event) -> None:
        interval = self._config.interval_seconds
        deadline = self._clock()
        behind = RateLimitedLog(log, every=300.0, clock=self._clock)
        while not stop.is_set():
            cursors = self._cursors()
            self.ledger.begin()
            try:
                self.sample()
            except Exception:  # a bug must not kill the loop: log, count, go on
                log.exception("sampler cycle failed")
                self._undo_cycle(cursors)
            self.ledger.commit()
            deadline += interval
            delay = deadline - self._clock()
            if delay < 0:
                skipped = int(-delay // interval) + 1
                behind.log(logging.WARNING, "behind", "sampling is falling behind; skipping "
                           "missed intervals", skipped=skipped, interval_seconds=interval)
                deadline += skipped * interval
                delay = deadline - self._clock()
            stop.wait(max(delay, 0.0))
