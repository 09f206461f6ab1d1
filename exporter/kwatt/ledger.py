"""Accumulated energy: the only mutable state between the sampler and the collector.

The sampler adds each interval's attribution here and then publishes an immutable
``LedgerSnapshot``; the collector renders whichever snapshot is current, so a scrape never
waits for a cycle and never sees half of one.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from kwatt.attribution import ComponentSplit
from kwatt.text import clean_text, is_clean

COMPONENTS = ("cpu", "dram", "gpu", "other")
# --metrics.level: the finest granularity of the container and workload series. Labels
# finer than the level are empty, so every query that sums by a coarser label still works.
METRIC_LEVELS = ("container", "pod", "workload", "namespace")


@dataclass(frozen=True, order=True)
class WorkloadLabels:
    """The names a container's series carries; match kube-state-metrics and cAdvisor."""

    namespace: str
    pod: str
    container: str
    workload: str
    workload_kind: str


def _series_order(item: tuple[WorkloadLabels, object]) -> tuple[str, ...]:
    """WorkloadLabels' own order, as one tuple: a dataclass's __lt__ builds two tuples
    per comparison, which was the largest single cost of a 330-container cycle."""
    labels = item[0]
    return (labels.namespace, labels.pod, labels.container, labels.workload,
            labels.workload_kind)


@dataclass
class _Account:
    """One workload cgroup (ledger key): what it earned, and under which name."""

    labels: WorkloadLabels | None
    energy: dict[str, float] = field(default_factory=dict)
    # Energy earned before the workload had a name; moved into the namespace counter
    # as soon as it gets one, so nothing is lost while a pod is known only by UID.
    unnamed: dict[str, float] = field(default_factory=dict)
    last_seen: float = 0.0
    present: bool = True


@dataclass
class _Counter:
    """One exposed label set: the energy of every account that carried it, cumulative.

    Accounts with identical labels (a restarted container, two cgroups whose names decode
    alike) share it, and it outlives each of them, so it never goes backwards.
    """

    energy: dict[str, float] = field(default_factory=dict)
    last_active: float = 0.0


WorkloadKey = tuple[str, str, str]  # namespace, workload, workload_kind

# A workload counter outlives its pods, so increase() sees each new pod's energy as growth
# of a series Prometheus already has (a new series' first sample is never counted). Kept a
# day and an hour past the last activity, so daily CronJobs keep one series; at most this
# many workloads per node (least recently active dropped first).
WORKLOAD_RETENTION_SECONDS = 25 * 3600.0
MAX_WORKLOADS = 2000
_MISSING = object()


@dataclass(frozen=True)
class ContainerRow:
    labels: WorkloadLabels
    energy: tuple[tuple[str, float], ...]  # (component, joules)


@dataclass(frozen=True)
class HistogramState:
    buckets: tuple[tuple[float, int], ...]  # (upper bound, cumulative count), +Inf last
    count: int
    total: float


@dataclass(frozen=True)
class LedgerSnapshot:
    node_energy: tuple[tuple[str, str, float], ...] = ()  # component, source, joules
    node_power: tuple[tuple[str, str, float], ...] = ()  # component, source, watts
    zone_energy: tuple[tuple[str, str, float], ...] = ()  # zone, index, joules
    platform_energy: tuple[tuple[str, str, float], ...] = ()  # source, sensor, joules
    containers: tuple[ContainerRow, ...] = ()
    namespace_energy: tuple[tuple[str, str, float], ...] = ()  # namespace, component, J
    unattributed: tuple[tuple[str, str, float], ...] = ()  # component, reason, joules
    source_up: tuple[tuple[str, bool], ...] = ()
    source_errors: tuple[tuple[str, str, int], ...] = ()  # source, reason, count
    sample_duration: HistogramState = HistogramState(((float("inf"), 0),), 0, 0.0)
    cycles: int = 0
    last_cycle_monotonic: float | None = None
    containers_retained: int = 0  # finished containers still exposed
    workload_energy: tuple[tuple[str, str, str, str, float], ...] = ()
    # namespace, workload, workload_kind, component, joules


SAMPLE_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


def project_labels(labels: WorkloadLabels, level: str) -> WorkloadLabels:
    """The series a workload's energy is booked to at a --metrics.level."""
    if level == "container":
        return labels
    if level == "pod":
        return WorkloadLabels(labels.namespace, labels.pod, "", labels.workload,
                              labels.workload_kind)
    if level == "workload":
        return WorkloadLabels(labels.namespace, "", "", labels.workload, labels.workload_kind)
    return WorkloadLabels(labels.namespace, "", "", "", "")


def _clean_labels(labels: WorkloadLabels) -> WorkloadLabels:
    """Labels that encode: names from the kernel or the API may hold lone surrogates."""
    values = (labels.namespace, labels.pod, labels.container, labels.workload,
              labels.workload_kind)
    if all(is_clean(v) for v in values):
        return labels
    return WorkloadLabels(*(clean_text(v) for v in values))


class EnergyLedger:
    """Accumulates energy; mutations between ``begin()`` and ``commit()`` are journalled
    so that a cycle that fails half-way can be undone whole (``rollback()``). Health
    (source_up, source_errors) is never rolled back: a failed cycle still counts."""

    def __init__(self, retention_seconds: float, max_retained: int,
                 workload_retention_seconds: float = WORKLOAD_RETENTION_SECONDS,
                 max_workloads: int = MAX_WORKLOADS, level: str = "container") -> None:
        """``level``: one of METRIC_LEVELS. Energy is booked to the series of the level
        (a pod's containers share one series at ``pod``), so an aggregated series is a
        counter of its own with its own retention and never goes backwards when one of
        its containers ages out."""
        if level not in METRIC_LEVELS:
            raise ValueError(f"unknown metrics level {level!r}")
        self._level = level
        self._projected: dict[WorkloadLabels, WorkloadLabels] = {}
        self._retention = retention_seconds
        self._max_retained = max_retained
        self._workload_retention = workload_retention_seconds
        self._max_workloads = max_workloads
        self.node_energy: dict[tuple[str, str], float] = {}
        self.node_power: dict[tuple[str, str], float] = {}
        self.zone_energy: dict[tuple[str, str], float] = {}
        self.platform_energy: dict[tuple[str, str], float] = {}
        self.namespace_energy: dict[tuple[str, str], float] = {}
        self.unattributed: dict[tuple[str, str], float] = {}
        self.source_up: dict[str, bool] = {}
        self.source_errors: dict[tuple[str, str], int] = {}
        self._accounts: dict[Hashable, _Account] = {}
        self._series: dict[WorkloadLabels, _Counter] = {}
        self._workloads: dict[WorkloadKey, _Counter] = {}
        self._active_series: frozenset[WorkloadLabels] = frozenset()
        self._now = 0.0
        self._journal: list[tuple[Any, ...]] | None = None
        self._duration_counts = [0] * (len(SAMPLE_DURATION_BUCKETS) + 1)
        self._duration_sum = 0.0
        self.cycles = 0
        self.last_cycle_monotonic: float | None = None

    # -- transactions ---------------------------------------------------------------------

    def begin(self) -> None:
        self._journal = []

    def commit(self) -> None:
        self._journal = None

    def rollback(self) -> None:
        """Undo every energy and lifecycle change since ``begin()``."""
        journal, self._journal = self._journal or [], None
        for entry in reversed(journal):
            if entry[0] == "item":
                _, table, key, old = entry
                if old is _MISSING:
                    table.pop(key, None)
                else:
                    table[key] = old
            else:
                _, target, name, old = entry
                setattr(target, name, old)

    def _set(self, table: dict[Any, Any], key: Any, value: Any) -> None:
        if self._journal is not None:
            self._journal.append(("item", table, key, table.get(key, _MISSING)))
        table[key] = value

    def _pop(self, table: dict[Any, Any], key: Any) -> Any:
        if self._journal is not None:
            self._journal.append(("item", table, key, table.get(key, _MISSING)))
        return table.pop(key)

    def _assign(self, target: object, name: str, value: object) -> None:
        if self._journal is not None:
            self._journal.append(("attr", target, name, getattr(target, name)))
        setattr(target, name, value)

    # -- energy -------------------------------------------------------------------------

    def _add(self, table: dict[Any, float], key: Any, joules: float) -> None:
        if joules >= 0:  # counters never go backwards; a 0 creates the series early
            self._set(table, key, table.get(key, 0.0) + joules)

    def add_node(self, component: str, source: str, joules: float) -> None:
        self._add(self.node_energy, (component, source), joules)

    def add_zone(self, zone: str, index: str, joules: float) -> None:
        self._add(self.zone_energy, (zone, index), joules)

    def add_platform(self, source: str, sensor: str, joules: float) -> None:
        """Raw energy of one platform meter sensor (detail; `other` is booked by split)."""
        self._add(self.platform_energy, (source, sensor), joules)

    def add_unattributed(self, component: str, reason: str, joules: float) -> None:
        self._add(self.unattributed, (component, reason), joules)

    def add_split(self, split: ComponentSplit[Hashable]) -> None:
        """Book one component's interval: node total, each workload, idle and system."""
        self.add_node(split.component, split.source, split.joules)
        for key, joules in split.to_workloads.items():
            self.add_workload(key, split.component, joules)
        self.add_unattributed(split.component, "idle", split.idle)
        self.add_unattributed(split.component, "system", split.system)
        for reason, joules in split.other.items():
            self.add_unattributed(split.component, reason, joules)

    def add_workload(self, key: Hashable, component: str, joules: float) -> None:
        if joules <= 0:
            return
        account = self._accounts.get(key)
        if account is None:
            account = _Account(labels=None)
            self._set(self._accounts, key, account)
        self._add(account.energy, component, joules)
        if account.labels is None:
            self._add(account.unnamed, component, joules)
        else:
            self._book_named(account.labels, component, joules)

    def _project(self, labels: WorkloadLabels) -> WorkloadLabels:
        if self._level == "container":
            return labels
        projected = self._projected.get(labels)
        if projected is None:
            if len(self._projected) > 4 * self._max_retained:  # bounded: names churn
                self._projected.clear()
            projected = self._projected[labels] = project_labels(labels, self._level)
        return projected

    def _book_named(self, labels: WorkloadLabels, component: str, joules: float) -> None:
        """Energy of a named workload: its container series, workload and namespace."""
        labels = self._project(labels)
        self._add(self.namespace_energy, (labels.namespace, component), joules)
        self._add(self._counter(self._series, labels).energy, component, joules)
        workload = (labels.namespace, labels.workload, labels.workload_kind)
        self._add(self._counter(self._workloads, workload).energy, component, joules)

    def _counter(self, table: dict[Any, _Counter], key: Any) -> _Counter:
        counter = table.get(key)
        if counter is None:
            counter = _Counter(last_active=self._now)
            self._set(table, key, counter)
        return counter

    # -- workload lifecycle ---------------------------------------------------------------

    def observe_workloads(self, labels: Mapping[Hashable, WorkloadLabels | None],
                          now: float) -> None:
        """Record which workloads exist now and their current names; expire finished ones."""
        self._assign(self, "_now", now)
        active: set[WorkloadLabels] = set()
        active_workloads: set[WorkloadKey] = set()
        for key, name in labels.items():
            account = self._accounts.get(key)
            if account is None:
                account = _Account(labels=None)
                self._set(self._accounts, key, account)
            if not account.present:
                self._assign(account, "present", True)
            self._assign(account, "last_seen", now)
            if name is not None and account.labels != name:  # stored labels are clean
                name = _clean_labels(name)
                if account.labels != name:
                    self._rename(account, name)
            current = account.labels  # a namer that forgets a name keeps the last one
            if current is not None:
                current = self._project(current)
                active.add(current)
                active_workloads.add(
                    (current.namespace, current.workload, current.workload_kind))
        for name in active:
            series = self._series.get(name)
            if series is not None:
                self._assign(series, "last_active", now)
        for workload in active_workloads:
            counter = self._workloads.get(workload)
            if counter is not None:
                self._assign(counter, "last_active", now)
        self._assign(self, "_active_series", frozenset(active))
        self._expire_accounts(labels, now)
        self._expire(self._series, active, now, self._retention, self._max_retained)
        self._expire(self._workloads, active_workloads, now, self._workload_retention,
                     self._max_workloads)

    def _expire_accounts(self, present: Mapping[Hashable, object], now: float) -> None:
        finished = [(a.last_seen, k) for k, a in self._accounts.items() if k not in present]
        for _, key in finished:
            if self._accounts[key].present:
                self._assign(self._accounts[key], "present", False)
        finished.sort(key=lambda item: item[0])
        overflow = len(finished) - self._max_retained
        for index, (last_seen, key) in enumerate(finished):
            if index < overflow or now - last_seen > self._retention:
                gone = self._pop(self._accounts, key)
                # Never named (its pod was never seen): keep the energy in the namespace
                # and workload totals under "" rather than dropping it.
                for component, joules in gone.unnamed.items():
                    self._add(self.namespace_energy, ("", component), joules)
                    self._add(self._counter(self._workloads, ("", "", "")).energy,
                              component, joules)

    def _expire(self, table: dict[Any, _Counter], active: set[Any], now: float,
                retention: float, cap: int) -> None:
        """Drop counters inactive for longer than ``retention``; keep at most ``cap``
        inactive ones (container series) or ``cap`` in all (workloads), oldest first."""
        idle = sorted((c.last_active, k) for k, c in table.items() if k not in active)
        keep = cap if table is self._series else cap - len(active)
        overflow = len(idle) - max(keep, 0)
        for index, (last_active, key) in enumerate(idle):
            if index < overflow or now - last_active > retention:
                self._pop(table, key)

    def unnamed_finished(self) -> list[Hashable]:
        """Keys of finished workloads still waiting for a name (their pod was not known
        while their cgroup existed); the sampler asks the namer again for these."""
        return [k for k, a in self._accounts.items() if not a.present and a.labels is None]

    def name_workload(self, key: Hashable, name: WorkloadLabels) -> None:
        """Name a workload that is gone but was known only by id until now."""
        account = self._accounts.get(key)
        name = _clean_labels(name)
        if account is not None and account.labels != name:
            self._rename(account, name)

    def _rename(self, account: _Account, name: WorkloadLabels) -> None:
        """From now on the account's energy goes to ``name``. Energy held while unnamed
        goes there too; energy shown under an earlier name stays with it, so no exposed
        counter goes backwards and none is shown twice."""
        for component, joules in account.unnamed.items():
            self._book_named(name, component, joules)
        for component in list(account.unnamed):
            self._pop(account.unnamed, component)
        self._assign(account, "labels", name)

    # -- health -------------------------------------------------------------------------

    def set_source_up(self, source: str, up: bool) -> None:
        self.source_up[source] = up

    def count_error(self, source: str, reason: str) -> None:
        self.source_errors[(source, reason)] = self.source_errors.get((source, reason), 0) + 1

    def observe_cycle(self, seconds: float, now: float) -> None:
        for index, bound in enumerate(SAMPLE_DURATION_BUCKETS):
            if seconds <= bound:
                self._duration_counts[index] += 1
                break
        else:
            self._duration_counts[-1] += 1
        self._duration_sum += seconds
        self.cycles += 1
        self.last_cycle_monotonic = now

    # -- publishing -----------------------------------------------------------------------

    def unnamed_energy(self) -> dict[str, float]:
        """Per component, energy booked to workloads that have no name yet."""
        out: dict[str, float] = {}
        for account in self._accounts.values():
            for component, joules in account.unnamed.items():
                out[component] = out.get(component, 0.0) + joules
        return out

    def workload_energy(self) -> dict[Hashable, dict[str, float]]:
        return {key: dict(a.energy) for key, a in self._accounts.items()}

    def snapshot(self) -> LedgerSnapshot:
        cumulative = []
        running = 0
        for bound, count in zip((*SAMPLE_DURATION_BUCKETS, float("inf")),
                                self._duration_counts, strict=True):
            running += count
            cumulative.append((bound, running))
        rows = tuple(ContainerRow(labels, tuple(sorted(series.energy.items())))
                     for labels, series in sorted(self._series.items(), key=_series_order)
                     if series.energy)
        return LedgerSnapshot(
            node_energy=tuple((c, s, j) for (c, s), j in sorted(self.node_energy.items())),
            node_power=tuple((c, s, w) for (c, s), w in sorted(self.node_power.items())),
            zone_energy=tuple((z, i, j) for (z, i), j in sorted(self.zone_energy.items())),
            platform_energy=tuple(
                (s, n, j) for (s, n), j in sorted(self.platform_energy.items())),
            containers=rows,
            namespace_energy=tuple(
                (n, c, j) for (n, c), j in sorted(self.namespace_energy.items())),
            unattributed=tuple((c, r, j) for (c, r), j in sorted(self.unattributed.items())),
            source_up=tuple(sorted(self.source_up.items())),
            source_errors=tuple((s, r, n) for (s, r), n in sorted(self.source_errors.items())),
            sample_duration=HistogramState(tuple(cumulative), running, self._duration_sum),
            cycles=self.cycles,
            last_cycle_monotonic=self.last_cycle_monotonic,
            containers_retained=sum(1 for row in rows
                                    if row.labels not in self._active_series),
            workload_energy=tuple(
                (namespace, workload, kind, component, joules)
                for (namespace, workload, kind), counter in sorted(self._workloads.items())
                for component, joules in sorted(counter.energy.items())),
        )
