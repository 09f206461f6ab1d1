"""Splitting one interval's GPU energy among the containers that hold the GPU. Pure.

Per physical GPU and interval, with ``E`` its measured energy:

* Nobody holds it: ``E`` is unattributed with reason ``unallocated``; when k DRA devices
  that no ResourceSlice names are claimed and m whole GPUs are unheld, each unheld GPU
  books ``min(k, m) / m`` of ``E`` as ``unidentified`` (some of them are held, kwatt cannot
  say which) and the rest as ``unallocated``.
* One holder (exclusive): the holder gets ``E``, idle power included: holding the GPU is
  what keeps it powered and unavailable to anyone else.
* Several holders (time-slicing, MPS): ``active = E * u`` with ``u`` the device
  utilisation (or, without it, the sum of per-process SM utilisation, capped at 1). The
  active part is split by each holder's per-process SM utilisation (PID -> cgroup ->
  container); SM time of processes that belong to no holder is ``system``. The idle part
  ``E - active`` is split evenly among holders. No per-process samples at all: ``E`` is
  split evenly.
* MIG: instance ``i`` with ``s_i`` slices and activity ``a_i`` in 0..1 gets
  ``E * s_i * a_i / S`` (active, ``S = sum(s)``) plus ``(E - active) * s_i / S`` (its share
  of the idle power by size); within an instance holders share evenly; an instance nobody
  holds is ``unallocated``.

Holders are either workload keys (ledger keys, CgroupIdentity in practice) or
``Unattributed`` buckets for holders that cannot be keyed (no cgroup, unknown pod), so that
sharing still counts them. Conservation is exact by construction: the last share of every
split is the remainder.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from kwatt.attribution import ComponentSplit

K = TypeVar("K", bound=Hashable)
T = TypeVar("T")

COMPONENT = "gpu"
SOURCE = "nvml"


@dataclass(frozen=True)
class Unattributed:
    """A holder or process energy cannot be charged to: booked under ``reason``.

    ``reason`` is ``system`` (a process outside any workload cgroup) or ``unidentified``
    (a PodResources holder whose container is not among this cycle's workloads).
    ``subject`` keeps distinct holders distinct, so each still counts as one sharer.
    """

    reason: str
    subject: str = ""


@dataclass(frozen=True)
class MigShare(Generic[K]):
    slices: int
    activity: float | None  # 0..1; None: unknown (treated as 0)
    holders: tuple[K | Unattributed, ...] = ()


@dataclass(frozen=True)
class GpuInterval(Generic[K]):
    """What the attribution needs about one physical GPU over one interval."""

    uuid: str
    joules: float
    holders: tuple[K | Unattributed, ...] = ()  # of the whole GPU (not MIG)
    utilisation: float | None = None  # device utilisation 0..1
    # Per-process SM utilisation summed per holder (or per Unattributed bucket).
    activity: Mapping[K | Unattributed, float] = field(default_factory=dict)
    instances: tuple[MigShare[K], ...] = ()  # non-empty: MIG mode (or AMD partitions)
    # Nobody holds it, but this fraction of it may be held through a DRA claim whose
    # device no ResourceSlice names: that part is ``unidentified``, not ``unallocated``.
    unidentified_share: float = 0.0
    source: str = SOURCE  # the library that measured it: nvml, amdsmi


def _split_by_weight(total: float, weights: Sequence[tuple[T, float]]) -> list[tuple[T, float]]:
    """``total`` shared by weight; the last positive share is the remainder (exact sum)."""
    positive = [(key, w) for key, w in weights if w > 0]
    weight_sum = sum(w for _, w in positive)
    if total <= 0 or weight_sum <= 0:
        return []
    out: list[tuple[T, float]] = []
    given = 0.0
    for key, weight in positive[:-1]:
        share = total * (weight / weight_sum)
        out.append((key, share))
        given += share
    out.append((positive[-1][0], max(total - given, 0.0)))
    return out


def _unique(holders: Sequence[T]) -> list[T]:
    seen: dict[T, None] = {}
    for holder in holders:
        seen.setdefault(holder, None)
    return list(seen)


def gpu_shares(interval: GpuInterval[K]) -> list[tuple[K | Unattributed, float]]:
    """(holder or Unattributed, joules) pairs summing to the interval's energy."""
    total = max(interval.joules, 0.0)
    if total == 0:
        return []
    if interval.instances:
        return _mig_shares(total, interval.instances)
    holders: list[K | Unattributed] = _unique(interval.holders)
    if not holders:
        share = min(max(interval.unidentified_share, 0.0), 1.0)
        if share <= 0:
            return [(Unattributed("unallocated"), total)]
        unidentified = total * share
        if share >= 1:
            return [(Unattributed("unidentified"), total)]
        return [(Unattributed("unidentified"), unidentified),
                (Unattributed("unallocated"), total - unidentified)]
    if len(holders) == 1:
        return [(holders[0], total)]
    activity = {k: v for k, v in interval.activity.items() if v > 0}
    sm_sum = sum(activity.values())
    if sm_sum <= 0:
        return _split_by_weight(total, [(h, 1.0) for h in holders])
    if interval.utilisation is not None:
        utilisation = min(max(interval.utilisation, 0.0), 1.0)
    else:
        utilisation = min(sm_sum / 100.0, 1.0)
    active = total * utilisation
    shares = _split_by_weight(active, list(activity.items()))
    shares += _split_by_weight(total - active, [(h, 1.0) for h in holders])
    if not shares:
        return []
    # Two remainders were taken separately: fold the float residue into the last share.
    residue = total - sum(j for _, j in shares)
    key, joules = shares[-1]
    shares[-1] = (key, max(joules + residue, 0.0))
    return shares


def _mig_shares(total: float, instances: Sequence[MigShare[K]]
                ) -> list[tuple[K | Unattributed, float]]:
    slices = [max(i.slices, 0) for i in instances]
    slice_sum = sum(slices)
    if slice_sum <= 0:
        return [(Unattributed("unallocated"), total)]
    weights: list[tuple[int, float]] = []
    active_fraction = 0.0
    for instance, size in zip(instances, slices, strict=True):
        activity = min(max(instance.activity or 0.0, 0.0), 1.0)
        active_fraction += size * activity / slice_sum
    idle = total * (1.0 - active_fraction)
    for position, (instance, size) in enumerate(zip(instances, slices, strict=True)):
        activity = min(max(instance.activity or 0.0, 0.0), 1.0)
        weights.append((position, total * size * activity / slice_sum + idle * size / slice_sum))
    out: list[tuple[K | Unattributed, float]] = []
    for position, instance_joules in _split_by_weight(total, weights):
        instance = instances[position]
        owners = _unique(instance.holders)
        if not owners:
            out.append((Unattributed("unallocated"), instance_joules))
        else:
            out.extend(_split_by_weight(instance_joules, [(h, 1.0) for h in owners]))
    return out


def attribute_gpu(interval: GpuInterval[K]) -> ComponentSplit[K]:
    """One GPU's interval as a ComponentSplit (component gpu, the interval's source)."""
    total = max(interval.joules, 0.0)
    to_workloads: dict[K, float] = {}
    system = 0.0
    other: dict[str, float] = {}
    for key, joules in gpu_shares(interval):
        if isinstance(key, Unattributed):
            if key.reason == "system":
                system += joules
            else:
                other[key.reason] = other.get(key.reason, 0.0) + joules
        else:
            to_workloads[key] = to_workloads.get(key, 0.0) + joules
    return ComponentSplit(COMPONENT, interval.source, total, to_workloads, 0.0, system,
                          other)


def merge_splits(splits: Sequence[ComponentSplit[K]]) -> ComponentSplit[K]:
    """All GPUs of one cycle and one source as one split (one ledger booking)."""
    to_workloads: dict[K, float] = {}
    other: dict[str, float] = {}
    for split in splits:
        for key, joules in split.to_workloads.items():
            to_workloads[key] = to_workloads.get(key, 0.0) + joules
        for reason, joules in split.other.items():
            other[reason] = other.get(reason, 0.0) + joules
    return ComponentSplit(COMPONENT, splits[0].source if splits else SOURCE,
                          sum(s.joules for s in splits), to_workloads,
                          sum(s.idle for s in splits), sum(s.system for s in splits), other)
