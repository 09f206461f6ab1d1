"""Accumulated energy: the only mutable state between the sampler and the collector.

The sampler adds each interval's attribution here and then publishes an immutable
``LedgerSnapshot``; the collector renders whichever snapshot is current, so a scrape never
waits for a cycle and never sees half of one.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field

from kwatt.attribution import ComponentSplit

COMPONENTS = ("cpu", "dram", "gpu")


@dataclass(frozen=True, order=True)
class WorkloadLabels:
    """The names a container's series carries; match kube-state-metrics and cAdvisor."""

    namespace: str
    pod: str
    container: str
    workload: str
    workload_kind: str


@dataclass
class _Account:
    labels: WorkloadLabels | None
    energy: dict[str, float] = field(default_factory=dict)
    # Energy earned before the workload had a name; moved into the namespace counter
    # as soon as it gets one, so nothing is lost while a pod is known only by UID.
    unnamed: dict[str, float] = field(default_factory=dict)
    last_seen: float = 0.0
    present: bool = True


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
    containers: tuple[ContainerRow, ...] = ()
    namespace_energy: tuple[tuple[str, str, float], ...] = ()  # namespace, component, J
    unattributed: tuple[tuple[str, str, float], ...] = ()  # component, reason, joules
    source_up: tuple[tuple[str, bool], ...] = ()
    source_errors: tuple[tuple[str, str, int], ...] = ()  # source, reason, count
    sample_duration: HistogramState = HistogramState(((float("inf"), 0),), 0, 0.0)
    cycles: int = 0
    last_cycle_monotonic: float | None = None
    containers_retained: int = 0  # finished containers still exposed


SAMPLE_DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class EnergyLedger:
    def __init__(self, retention_seconds: float, max_retained: int) -> None:
        self._retention = retention_seconds
        self._max_retained = max_retained
        self.node_energy: dict[tuple[str, str], float] = {}
        self.node_power: dict[tuple[str, str], float] = {}
        self.zone_energy: dict[tuple[str, str], float] = {}
        self.namespace_energy: dict[tuple[str, str], float] = {}
        self.unattributed: dict[tuple[str, str], float] = {}
        self.source_up: dict[str, bool] = {}
        self.source_errors: dict[tuple[str, str], int] = {}
        self._accounts: dict[Hashable, _Account] = {}
        self._duration_counts = [0] * (len(SAMPLE_DURATION_BUCKETS) + 1)
        self._duration_sum = 0.0
        self.cycles = 0
        self.last_cycle_monotonic: float | None = None

    # -- energy -------------------------------------------------------------------------

    @staticmethod
    def _add(table: dict[tuple[str, str], float], key: tuple[str, str], joules: float) -> None:
        if joules >= 0:  # counters never go backwards; a 0 creates the series early
            table[key] = table.get(key, 0.0) + joules

    def add_node(self, component: str, source: str, joules: float) -> None:
        self._add(self.node_energy, (component, source), joules)

    def add_zone(self, zone: str, index: str, joules: float) -> None:
        self._add(self.zone_energy, (zone, index), joules)

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
            account = self._accounts[key] = _Account(labels=None)
        account.energy[component] = account.energy.get(component, 0.0) + joules
        if account.labels is None:
            account.unnamed[component] = account.unnamed.get(component, 0.0) + joules
        else:
            self._add(self.namespace_energy, (account.labels.namespace, component), joules)

    # -- workload lifecycle ---------------------------------------------------------------

    def observe_workloads(self, labels: Mapping[Hashable, WorkloadLabels | None],
                          now: float) -> None:
        """Record which workloads exist now and their current names; expire finished ones."""
        for key, name in labels.items():
            account = self._accounts.get(key)
            if account is None:
                account = self._accounts[key] = _Account(labels=None)
            account.present = True
            account.last_seen = now
            if name is not None and account.labels != name:
                self._rename(account, name)
        finished = [(a.last_seen, k) for k, a in self._accounts.items() if k not in labels]
        for _, key in finished:
            self._accounts[key].present = False
        finished.sort(key=lambda item: item[0])
        overflow = len(finished) - self._max_retained
        for index, (last_seen, key) in enumerate(finished):
            if index < overflow or now - last_seen > self._retention:
                gone = self._accounts.pop(key)
                # Never named (its pod was never seen): keep the energy in the namespace
                # totals under namespace="" rather than dropping it.
                for component, joules in gone.unnamed.items():
                    self._add(self.namespace_energy, ("", component), joules)

    def unnamed_finished(self) -> list[Hashable]:
        """Keys of finished workloads still waiting for a name (their pod was not known
        while their cgroup existed); the sampler asks the namer again for these."""
        return [k for k, a in self._accounts.items() if not a.present and a.labels is None]

    def name_workload(self, key: Hashable, name: WorkloadLabels) -> None:
        """Name a workload that is gone but was known only by id until now."""
        account = self._accounts.get(key)
        if account is not None and account.labels != name:
            self._rename(account, name)

    def _rename(self, account: _Account, name: WorkloadLabels) -> None:
        for component, joules in account.unnamed.items():
            self._add(self.namespace_energy, (name.namespace, component), joules)
        account.unnamed.clear()
        account.labels = name

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
        rows = tuple(sorted(
            (ContainerRow(a.labels, tuple(sorted(a.energy.items())))
             for a in self._accounts.values() if a.labels is not None and a.energy),
            key=lambda row: row.labels))
        return LedgerSnapshot(
            node_energy=tuple((c, s, j) for (c, s), j in sorted(self.node_energy.items())),
            node_power=tuple((c, s, w) for (c, s), w in sorted(self.node_power.items())),
            zone_energy=tuple((z, i, j) for (z, i), j in sorted(self.zone_energy.items())),
            containers=rows,
            namespace_energy=tuple(
                (n, c, j) for (n, c), j in sorted(self.namespace_energy.items())),
            unattributed=tuple((c, r, j) for (c, r), j in sorted(self.unattributed.items())),
            source_up=tuple(sorted(self.source_up.items())),
            source_errors=tuple((s, r, n) for (s, r), n in sorted(self.source_errors.items())),
            sample_duration=HistogramState(tuple(cumulative), running, self._duration_sum),
            cycles=self.cycles,
            last_cycle_monotonic=self.last_cycle_monotonic,
            containers_retained=sum(1 for a in self._accounts.values() if not a.present),
        )
