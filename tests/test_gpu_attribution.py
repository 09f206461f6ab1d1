"""GPU attribution (pure): hand-computed splits and conservation."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kwatt.gpu_attribution import (
    GpuInterval,
    MigShare,
    Unattributed,
    attribute_gpu,
    merge_splits,
)


def test_exclusive_holder_gets_everything_idle_included() -> None:
    split = attribute_gpu(GpuInterval("GPU-0", 1000.0, ("trainer",), utilisation=0.1))
    assert (split.component, split.source) == ("gpu", "nvml")
    assert split.to_workloads == {"trainer": 1000.0}
    assert (split.idle, split.system, dict(split.other)) == (0.0, 0.0, {})


def test_unheld_gpu_is_unallocated() -> None:
    split = attribute_gpu(GpuInterval("GPU-0", 250.0))
    assert split.to_workloads == {} and split.other == {"unallocated": 250.0}


def test_time_sliced_75_25() -> None:
    # 1000 J at 50 % utilisation: active 500 split 75/25 by SM, idle 500 evenly.
    split = attribute_gpu(GpuInterval("GPU-0", 1000.0, ("a", "b"), utilisation=0.5,
                                      activity={"a": 75.0, "b": 25.0}))
    assert split.to_workloads == pytest.approx({"a": 625.0, "b": 375.0})
    assert split.system == 0.0


def test_shared_without_samples_is_even() -> None:
    split = attribute_gpu(GpuInterval("GPU-0", 900.0, ("a", "b", "c"), utilisation=0.9))
    assert split.to_workloads == pytest.approx({"a": 300.0, "b": 300.0, "c": 300.0})


def test_shared_foreign_process_activity_is_system() -> None:
    split = attribute_gpu(GpuInterval(
        "GPU-0", 1000.0, ("a", "b"), utilisation=1.0,
        activity={"a": 60.0, Unattributed("system"): 20.0, "b": 20.0}))
    assert split.to_workloads == pytest.approx({"a": 600.0, "b": 200.0})
    assert split.system == pytest.approx(200.0)


def test_unidentified_holder_still_counts_as_sharer() -> None:
    who = Unattributed("unidentified", "ml/p/c")
    split = attribute_gpu(GpuInterval("GPU-0", 100.0, ("a", who)))
    assert split.to_workloads == pytest.approx({"a": 50.0})
    assert split.other == pytest.approx({"unidentified": 50.0})


def test_mig_two_instances_by_activity_and_slices() -> None:
    # 700 J; 3g (active) and 4g (half active) of 7 slices: active fraction 5/7 = 500 J,
    # 3g: 300 + 200*3/7, 4g: 200 + 200*4/7.
    split = attribute_gpu(GpuInterval("GPU-0", 700.0, instances=(
        MigShare(3, 1.0, ("nb",)), MigShare(4, 0.5, ("job",)))))
    assert split.to_workloads == pytest.approx({"nb": 300 + 600 / 7, "job": 200 + 800 / 7})


def test_mig_unheld_instance_is_unallocated() -> None:
    split = attribute_gpu(GpuInterval("GPU-0", 700.0, instances=(
        MigShare(3, 1.0, ("nb",)), MigShare(4, 0.0, ()))))
    assert split.to_workloads == pytest.approx({"nb": 300 + 400 * 3 / 7})
    assert split.other == pytest.approx({"unallocated": 400 * 4 / 7})


_keys = st.sampled_from(["a", "b", "c", "d", Unattributed("system"),
                         Unattributed("unidentified", "x")])
_joules = st.floats(min_value=0, max_value=1e7, allow_nan=False)
_intervals = st.one_of(
    st.builds(GpuInterval, uuid=st.just("G"), joules=_joules,
              holders=st.lists(_keys, max_size=5).map(tuple),
              utilisation=st.one_of(st.none(), st.floats(-0.5, 1.5)),
              activity=st.dictionaries(_keys, st.floats(0, 100), max_size=5)),
    st.builds(GpuInterval, uuid=st.just("G"), joules=_joules, instances=st.lists(
        st.builds(MigShare, slices=st.integers(0, 7),
                  activity=st.one_of(st.none(), st.floats(-1, 2)),
                  holders=st.lists(_keys, max_size=3).map(tuple)),
        min_size=1, max_size=7).map(tuple)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(_intervals, min_size=1, max_size=8))
def test_conservation_every_joule_booked_once(intervals: list[GpuInterval[str]]) -> None:
    splits = [attribute_gpu(i) for i in intervals]
    for interval, split in zip(intervals, splits, strict=True):
        parts = [*split.to_workloads.values(), split.idle, split.system, *split.other.values()]
        assert all(p >= 0 for p in parts)
        assert math.fsum(parts) == pytest.approx(interval.joules, rel=1e-9, abs=1e-6)
    merged = merge_splits(splits)
    total = math.fsum(i.joules for i in intervals)
    parts = [*merged.to_workloads.values(), merged.system, *merged.other.values()]
    assert math.fsum(parts) == pytest.approx(total, rel=1e-9, abs=1e-6)
