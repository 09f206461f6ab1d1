"""Splitting one interval's node energy among workloads. Pure functions, no I/O.

Per component (cpu, dram) and interval:

1. The static part ``idle`` is known (model, configured or learned baseline power times the
   interval) or, until a baseline is known, ``E * (1 - utilisation)``. ``active = E - idle``.
2. ``active`` is split by CPU time: a workload gets ``active * its_cpu / node_busy``. What
   node busy time is left (processes outside any workload cgroup) is ``system``. When the
   workloads' CPU time exceeds the node's (the two clocks are read a few ms apart), shares
   are normalised to the workloads' sum so nothing exceeds ``active``.
3. ``idle`` stays unattributed, or is charged evenly or by CPU request (idle policy).

Conservation holds by construction: ``sum(workloads) + idle_unattributed + system == E``,
with ``system`` computed as the remainder.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass(frozen=True)
class ComponentEnergy:
    """Energy of one node component over one interval."""

    component: str  # cpu, dram, gpu, other
    source: str  # rapl, estimated, nvml, hwmon
    joules: float
    idle_joules: float | None = None  # static part when known; None: use utilisation


@dataclass(frozen=True)
class WorkloadActivity(Generic[K]):
    """CPU seconds one workload used in the interval, exclusive of nested workloads."""

    key: K
    cpu_seconds: float
    cpu_request: float = 0.0  # cores requested; weight for the cpu-request idle policy


@dataclass(frozen=True)
class ComponentSplit(Generic[K]):
    component: str
    source: str
    joules: float
    to_workloads: Mapping[K, float] = field(default_factory=dict)
    idle: float = 0.0  # static energy left unattributed
    system: float = 0.0  # active energy of processes outside workload cgroups
    # Other unattributed buckets by reason, e.g. {"unallocated": J} for GPUs nobody holds.
    other: Mapping[str, float] = field(default_factory=dict)


def split_idle(energy: ComponentEnergy, utilisation: float) -> tuple[float, float]:
    """(active, idle) for one component; both >= 0 and summing to ``energy.joules``."""
    total = max(energy.joules, 0.0)
    if energy.idle_joules is not None:
        idle = min(max(energy.idle_joules, 0.0), total)
    else:
        idle = total * (1.0 - min(max(utilisation, 0.0), 1.0))
    return total - idle, idle


def attribute_component(energy: ComponentEnergy, utilisation: float, node_busy_seconds: float,
                        activities: list[WorkloadActivity[K]],
                        idle_policy: str = "unattributed") -> ComponentSplit[K]:
    """Split one component's interval energy among workloads, idle and system."""
    total = max(energy.joules, 0.0)
    active, idle = split_idle(energy, utilisation)
    shares: dict[K, float] = {}
    busy = sum(max(a.cpu_seconds, 0.0) for a in activities)
    denominator = max(node_busy_seconds, busy)
    if denominator > 0 and active > 0:
        for activity in activities:
            if activity.cpu_seconds > 0:
                shares[activity.key] = active * (activity.cpu_seconds / denominator)

    return _finish(energy.component, energy.source, total, idle, shares, activities,
                   idle_policy)


def _finish(component: str, source: str, total: float, idle: float, shares: dict[K, float],
            activities: list[WorkloadActivity[K]], idle_policy: str) -> ComponentSplit[K]:
    """Charge ``idle`` by the idle policy on top of the active ``shares``; what is left of
    ``total`` is ``system``."""
    idle_left = idle
    if idle > 0 and activities and idle_policy != "unattributed":
        if idle_policy == "cpu-request":
            weights = {a.key: max(a.cpu_request, 0.0) for a in activities}
        else:  # even
            weights = {a.key: 1.0 for a in activities}
        weight_sum = sum(weights.values())
        if weight_sum > 0:
            for key, weight in weights.items():
                if weight > 0:
                    shares[key] = shares.get(key, 0.0) + idle * (weight / weight_sum)
            idle_left = 0.0

    attributed = sum(shares.values())
    if attributed > total - idle_left:  # float rounding only: keep every bucket >= 0
        scale = (total - idle_left) / attributed if attributed > 0 else 0.0
        shares = {k: v * scale for k, v in shares.items()}
        attributed = sum(shares.values())
    system = max(total - idle_left - attributed, 0.0)
    return ComponentSplit(component, source, total, shares, idle_left, system)


def platform_remainder(platform_joules: float, inside_joules: float) -> tuple[float, float]:
    """(other, shortfall): what a whole-node meter read beyond the components measured
    inside it, and by how much it read less than them (meter lag, averaging windows).
    ``other`` is never negative: a shortfall books 0 and is reported, never subtracted."""
    remainder = platform_joules - inside_joules
    return (remainder, 0.0) if remainder >= 0 else (0.0, -remainder)


def active_weights(splits: Sequence[ComponentSplit[K]]) -> tuple[dict[K, float], float]:
    """Per workload, the energy it was charged in ``splits``, and the splits' energy that
    was not left idle (workloads + system + other buckets such as unallocated GPUs): the
    weights and denominator by which ``other``'s active part is split."""
    weights: dict[K, float] = {}
    total = 0.0
    for split in splits:
        total += max(split.joules - split.idle, 0.0)
        for key, joules in split.to_workloads.items():
            if joules > 0:
                weights[key] = weights.get(key, 0.0) + joules
    return weights, total


def attribute_other(energy: ComponentEnergy, utilisation: float, weights: Mapping[K, float],
                    weights_total: float, activities: list[WorkloadActivity[K]],
                    idle_policy: str = "unattributed") -> ComponentSplit[K]:
    """Split the `other` component (a platform meter minus cpu, dram and gpu).

    Its idle part is the learned or configured baseline (else ``E * (1 - utilisation)``,
    as for the CPU). Its active part follows the energy the same interval's cpu, dram and
    gpu splits charged: a workload gets ``active * weight / weights_total``; what the
    workloads' weights leave of ``weights_total`` (system, unallocated GPUs) is ``system``.
    The idle part is handled by the idle policy, as for the CPU.
    """
    total = max(energy.joules, 0.0)
    active, idle = split_idle(energy, utilisation)
    shares: dict[K, float] = {}
    denominator = max(weights_total, sum(max(w, 0.0) for w in weights.values()))
    if denominator > 0 and active > 0:
        for key, weight in weights.items():
            if weight > 0:
                shares[key] = active * (weight / denominator)
    return _finish(energy.component, energy.source, total, idle, shares, activities,
                   idle_policy)


def exclusive_cpu_seconds(deltas: Mapping[str, float],
                          parents: Mapping[str, str | None]) -> dict[str, float]:
    """Per cgroup path: its CPU-time delta minus that of its nearest nested workloads.

    Counters are hierarchical (a pod's includes its containers'), so without this a pod's
    containers would be charged twice. A negative remainder (counters read a few µs apart)
    is clamped to 0.
    """
    nested: dict[str, float] = {}
    for path, parent in parents.items():
        if parent is not None and path in deltas:
            nested[parent] = nested.get(parent, 0.0) + deltas[path]
    return {path: max(delta - nested.get(path, 0.0), 0.0) for path, delta in deltas.items()}
