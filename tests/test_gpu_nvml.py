"""GpuReader over the fake NVML backend: counters, power integration, lost GPUs, MIG."""

from __future__ import annotations

import threading

import pytest
from conftest import FakeClock
from kwatt.sources.gpu import LAYOUT_THREADS
from kwatt.sources.nvml import (
    GpuReader,
    MigInstance,
    NvmlCycle,
    NvmlUnavailable,
    ProcessSample,
    load_backend,
)
from nvml_fake import FakeGpu, FakeNvml


def read_at(reader: GpuReader, clock: FakeClock, now: float, want_pids: bool) -> NvmlCycle:
    """Read with the reader's clock at ``now``: each reading is stamped when it is taken."""
    clock.now = now
    return reader.read(want_pids)


def _gpus() -> list[FakeGpu]:
    return [
        FakeGpu("GPU-0", energy_mj=5_000_000, utilisation_percent=40),
        FakeGpu("GPU-1", model="Tesla T4", has_energy_counter=False, power_mw=70_000),
        FakeGpu("GPU-2", model="NVIDIA A100-SXM4-40GB", mig_enabled=True, energy_mj=1_000,
                instances=[MigInstance("MIG-a", 1, 3, "3g.20gb", (10,)),
                           MigInstance("MIG-b", 2, 4, "4g.20gb")]),
    ]


def test_counter_delta_power_integration_and_mig(clock: FakeClock) -> None:
    fake = FakeNvml(_gpus())
    reader = GpuReader(fake, clock)
    assert reader.start() == []
    assert reader.driver_version == "550.54.15"
    first = read_at(reader, clock, 100.0, want_pids=False)
    assert [g.joules for g in first.gpus] == [None, None, None]  # baselines only

    fake.gpus[0].energy_mj += 1_500_000  # 1500 J
    fake.gpus[1].power_mw = 90_000  # 70 W -> 90 W: trapezoid 80 W
    fake.gpus[2].energy_mj += 700_000
    cycle = read_at(reader, clock, 110.0, want_pids=False)
    g0, g1, g2 = cycle.gpus
    assert cycle.faults == ()
    assert (g0.joules, g0.dt, g0.utilisation, g0.energy_source) == (1500.0, 10.0, 0.4, "counter")
    assert (g1.joules, g1.energy_source, g1.model) == (pytest.approx(800.0), "power", "Tesla T4")
    assert g2.mig_enabled and g2.utilisation is None and g2.joules == 700.0
    assert [(i.uuid, i.slices, i.pids) for i in g2.instances] == [
        ("MIG-a", 3, (10,)), ("MIG-b", 4, ())]


def test_counter_reset_rebaselines_never_backwards(clock: FakeClock) -> None:
    fake = FakeNvml([FakeGpu("GPU-0", energy_mj=9_000_000)])
    reader = GpuReader(fake, clock)
    reader.start()
    read_at(reader, clock, 0.0, want_pids=False)
    fake.gpus[0].energy_mj = 200  # driver reload: counts from 0 again
    reset = read_at(reader, clock, 5.0, want_pids=False)
    assert reset.gpus[0].joules is None and reset.gpus[0].up
    assert [(f.reason, f.subject) for f in reset.faults] == [("implausible", "GPU-0")]
    fake.gpus[0].energy_mj = 100_200
    assert read_at(reader, clock, 10.0, want_pids=False).gpus[0].joules == 100.0


@pytest.mark.parametrize(("limit_mw", "ceiling_w"), [(700_000, 1400.0), (None, 3000.0)])
def test_energy_jump_above_the_ceiling_books_nothing(clock: FakeClock, limit_mw: int | None,
                                                     ceiling_w: float) -> None:
    """The ceiling is twice the enforced power limit, else the documented bound."""
    fake = FakeNvml([FakeGpu("GPU-0", power_limit_mw=limit_mw)])
    reader = GpuReader(fake, clock)
    reader.start()
    read_at(reader, clock, 0.0, want_pids=False)
    fake.gpus[0].energy_mj += round(ceiling_w * 2 * 1000)  # 2x the ceiling for 2 s: fine
    assert read_at(reader, clock, 2.0, want_pids=False).gpus[0].joules == 2 * ceiling_w
    fake.gpus[0].energy_mj += round(ceiling_w * 1.1 * 1000)  # 1.1x the ceiling for 1 s
    jump = read_at(reader, clock, 3.0, want_pids=False)
    assert jump.gpus[0].joules is None and jump.gpus[0].up
    assert [f.reason for f in jump.faults] == ["implausible"]
    fake.gpus[0].energy_mj += 100_000
    assert read_at(reader, clock, 4.0, want_pids=False).gpus[0].joules == 100.0


def test_power_limit_raised_at_runtime_is_honoured(clock: FakeClock) -> None:
    fake = FakeNvml([FakeGpu("GPU-0", power_limit_mw=300_000)])  # ceiling 600 W
    reader = GpuReader(fake, clock)
    reader.start()
    read_at(reader, clock, 0.0, want_pids=False)
    fake.gpus[0].power_limit_mw = 700_000  # nvidia-smi -pl 700: ceiling 1400 W
    fake.gpus[0].energy_mj += 1_000_000
    cycle = read_at(reader, clock, 1.0, want_pids=False)
    assert cycle.gpus[0].joules == 1000.0 and cycle.faults == ()


def test_integrated_power_above_the_ceiling_books_nothing(clock: FakeClock) -> None:
    fake = FakeNvml([FakeGpu("GPU-0", has_energy_counter=False, power_mw=300_000,
                             power_limit_mw=400_000)])
    reader = GpuReader(fake, clock)
    reader.start()
    read_at(reader, clock, 0.0, want_pids=False)
    fake.gpus[0].power_mw = 2_000_000_000  # 2 MW: a garbled reading
    cycle = read_at(reader, clock, 1.0, want_pids=False)
    assert cycle.gpus[0].joules is None
    assert [f.reason for f in cycle.faults] == ["implausible"]
    fake.gpus[0].power_mw = 300_000
    read_at(reader, clock, 2.0, want_pids=False)
    assert read_at(reader, clock, 3.0, want_pids=False).gpus[0].joules == pytest.approx(300.0)


def test_lost_gpu_is_marked_down_others_continue_and_it_comes_back(clock: FakeClock) -> None:
    fake = FakeNvml([FakeGpu("GPU-0"), FakeGpu("GPU-1")])
    reader = GpuReader(fake, clock)
    reader.start()
    read_at(reader, clock, 0.0, want_pids=False)
    fake.gpus[1].lost = True
    for gpu in fake.gpus:
        gpu.energy_mj += 10_000
    lost = read_at(reader, clock, 1.0, want_pids=False)
    assert [(g.uuid, g.up, g.joules) for g in lost.gpus] == [
        ("GPU-0", True, 10.0), ("GPU-1", False, None)]
    assert {(f.source, f.reason, f.subject) for f in lost.faults} == {
        ("nvml", "absent", "GPU-1")}

    fake.gpus[1].energy_mj += 99_000  # spent while unreadable: never booked
    fake.gpus[1].lost = False
    back = read_at(reader, clock, 2.0, want_pids=False)
    assert [(g.up, g.joules) for g in back.gpus] == [(True, 0.0), (True, None)]
    fake.gpus[1].energy_mj += 3_000
    again = read_at(reader, clock, 3.0, want_pids=False)
    assert again.gpus[1].joules == 3.0 and again.faults == ()


def test_unknown_error_on_energy_marks_down_for_that_cycle(clock: FakeClock) -> None:
    fake = FakeNvml([FakeGpu("GPU-0")])
    reader = GpuReader(fake, clock)
    reader.start()
    read_at(reader, clock, 0.0, want_pids=False)
    fake.gpus[0].failing["total_energy_mj"] = "unknown"
    cycle = read_at(reader, clock, 1.0, want_pids=False)
    assert not cycle.gpus[0].up
    assert [(f.reason, f.subject) for f in cycle.faults] == [("api", "GPU-0")]
    del fake.gpus[0].failing["total_energy_mj"]
    assert read_at(reader, clock, 2.0, want_pids=False).gpus[0].up


def test_process_samples_only_new_since_last_seen(clock: FakeClock) -> None:
    gpu = FakeGpu("GPU-0", samples=[ProcessSample(1, 30, 1_000), ProcessSample(2, 50, 2_000)])
    fake = FakeNvml([gpu])
    reader = GpuReader(fake, clock)
    reader.start()
    first = read_at(reader, clock, 0.0, want_pids=False).gpus[0]
    assert [s.pid for s in first.process_samples] == [1, 2]
    assert read_at(reader, clock, 1.0, want_pids=False).gpus[0].process_samples == ()
    gpu.samples.append(ProcessSample(3, 20, 3_000))
    later = read_at(reader, clock, 2.0, want_pids=False).gpus[0]
    assert [s.pid for s in later.process_samples] == [3]


def test_compute_pids_only_when_asked(clock: FakeClock) -> None:
    fake = FakeNvml([FakeGpu("GPU-0", compute_pids=[7, 8])])
    reader = GpuReader(fake, clock)
    reader.start()
    assert read_at(reader, clock, 0.0, want_pids=False).gpus[0].compute_pids == ()
    assert read_at(reader, clock, 1.0, want_pids=True).gpus[0].compute_pids == (7, 8)


def test_unsupported_process_utilisation_is_not_a_fault(clock: FakeClock) -> None:
    fake = FakeNvml([FakeGpu("GPU-0", has_process_utilisation=False)])
    reader = GpuReader(fake, clock)
    reader.start()
    cycle = read_at(reader, clock, 0.0, want_pids=False)
    assert cycle.faults == () and cycle.gpus[0].up
    calls = read_at(reader, clock, 1.0, want_pids=False).calls
    assert calls == 2  # energy + utilisation; the unsupported call is not retried


def test_unavailable_library() -> None:
    reader, why = load_backend(lambda: FakeNvml([], available=False))
    assert reader is None and "Not Found" in why
    with pytest.raises(NvmlUnavailable):
        GpuReader(FakeNvml([], available=False)).start()


def test_real_pynvml_backend_without_driver_says_why() -> None:
    # On machines without the NVIDIA driver (CI), pynvml must fail to load, cleanly.
    reader, why = load_backend()
    if reader is None:
        assert why
    else:  # a real GPU machine
        assert reader.gpu_count >= 0


# ------------------------------------------------------------------ MIG at the real cost


class SlowMigNvml(FakeNvml):
    """Every call on a MIG device, and each call of a layout enumeration, moves the clock
    by ``cost`` seconds, as a slow driver would."""

    def __init__(self, gpus: list[FakeGpu], clock: FakeClock, cost: float) -> None:
        super().__init__(gpus)
        self.clock = clock
        self.cost = cost

    def mig_layout(self, uuid: str) -> list[MigInstance]:
        out = super().mig_layout(uuid)
        # Its own calls (the slot count, five per instance): layouts may run side by side.
        self.clock.advance(self.cost * (1 + 5 * len(out)))
        return out

    def instance_pids(self, instance_uuid: str) -> list[int]:
        self.clock.advance(self.cost)
        return super().instance_pids(instance_uuid)


def _mig_gpu(uuid: str, count: int, energy_mj: int = 1_000) -> FakeGpu:
    return FakeGpu(uuid, model="NVIDIA A100-SXM4-40GB", mig_enabled=True, energy_mj=energy_mj,
                   instances=[MigInstance(f"MIG-{uuid}-{i}", i + 1, 1, "1g.5gb", (100 + i,))
                              for i in range(count)])


def test_mig_layout_is_cached_steady_state_is_one_call_per_instance(clock: FakeClock) -> None:
    fake = FakeNvml([_mig_gpu("GPU-0", 7)])
    reader = GpuReader(fake, clock)
    reader.start()
    read_at(reader, clock, 0.0, want_pids=False)  # discovery: statics, layout, processes
    for second in range(1, 6):
        fake.gpus[0].energy_mj += 100_000
        cycle = read_at(reader, clock, float(second), want_pids=False)
        # MIG mode on the parent (the reconfiguration check) + energy + 7 instance reads;
        # enumerating the layout again would cost 1 + 5 per instance.
        assert cycle.calls == 2 + 7
        (gpu,) = cycle.gpus
        assert gpu.joules == 100.0
        assert [i.pids for i in gpu.instances] == [(100 + i,) for i in range(7)]


def test_vanished_instance_rereads_layout_and_books_the_energy_once(clock: FakeClock) -> None:
    fake = FakeNvml([_mig_gpu("GPU-0", 2)])
    reader = GpuReader(fake, clock)
    reader.start()
    read_at(reader, clock, 0.0, want_pids=False)
    # Reconfigured: both instances destroyed, one 7g instance created.
    fake.gpus[0].instances = [MigInstance("MIG-new", 9, 7, "7g.40gb", (55,))]
    fake.gpus[0].energy_mj += 100_000
    first = read_at(reader, clock, 1.0, want_pids=False)
    assert first.faults == ()  # a reconfiguration is not a fault
    assert first.gpus[0].joules == 100.0  # read before the change was seen: old layout
    fake.gpus[0].energy_mj += 200_000
    relearned = read_at(reader, clock, 2.0, want_pids=False)
    # The layout is read again in this cycle; the energy waited in the counter meanwhile
    # and is read once the layout is known: booked once, with the new layout.
    (gpu,) = relearned.gpus
    assert (gpu.joules, gpu.dt) == (200.0, 1.0)
    assert [(i.uuid, i.slices, i.pids) for i in gpu.instances] == [("MIG-new", 7, (55,))]
    fake.gpus[0].energy_mj += 300_000
    (gpu,) = read_at(reader, clock, 3.0, want_pids=False).gpus
    assert (gpu.joules, gpu.dt) == (300.0, 1.0)  # nothing booked twice


def test_mig_mode_turned_off_is_seen_by_the_cheap_check(clock: FakeClock) -> None:
    fake = FakeNvml([_mig_gpu("GPU-0", 2)])
    reader = GpuReader(fake, clock)
    reader.start()
    read_at(reader, clock, 0.0, want_pids=False)
    fake.gpus[0].mig_enabled = False
    fake.gpus[0].instances = []
    fake.gpus[0].utilisation_percent = 30
    fake.gpus[0].energy_mj += 100_000
    (gpu,) = read_at(reader, clock, 1.0, want_pids=False).gpus
    assert not gpu.mig_enabled and gpu.instances == () and gpu.utilisation == 0.3
    assert gpu.joules == 100.0


def test_instance_created_in_free_slices_is_found_by_the_periodic_refresh(
        clock: FakeClock) -> None:
    fake = FakeNvml([_mig_gpu("GPU-0", 1)])
    reader = GpuReader(fake, clock, mig_refresh_seconds=60.0)
    reader.start()
    read_at(reader, clock, 0.0, want_pids=False)
    fake.gpus[0].instances.append(MigInstance("MIG-late", 7, 3, "3g.20gb", (77,)))
    assert len(read_at(reader, clock, 30.0, want_pids=False).gpus[0].instances) == 1
    fake.gpus[0].energy_mj += 100_000
    (gpu,) = read_at(reader, clock, 61.0, want_pids=False).gpus
    assert [i.uuid for i in gpu.instances] == ["MIG-GPU-0-0", "MIG-late"]
    assert gpu.joules == 100.0  # a due refresh of a known layout does not hold energy back


def test_budget_bounds_slow_mig_calls_and_round_robin_reaches_every_instance(
        clock: FakeClock) -> None:
    gpus = [_mig_gpu(f"GPU-{g}", 7) for g in range(2)]
    fake = SlowMigNvml(gpus, clock, cost=0.05)
    reader = GpuReader(fake, clock)
    reader.start()
    # Start-up: each layout costs 36 x 50 ms = 1.8 s; both are started at once (the fake
    # clock adds their calls up: 3.6 s), so the instance processes wait for the next cycle.
    first = reader.read(want_pids=False, budget_seconds=1.0)
    assert first.deferred == 14 and first.seconds == pytest.approx(3.6)
    assert all(g.up and len(g.instances) == 7 for g in first.gpus)
    second = reader.read(want_pids=False, budget_seconds=1.0)
    assert all(len(g.instances) == 7 for g in second.gpus)
    for gpu in gpus:
        for instance in gpu.instances:
            gpu.instances[gpu.instances.index(instance)] = MigInstance(
                instance.uuid, instance.gpu_instance_id, 1, "1g.5gb", (999,))
    seen: set[str] = set()
    for _ in range(6):
        for gpu in gpus:
            gpu.energy_mj += 100_000
        cycle = reader.read(want_pids=False, budget_seconds=0.3)
        # At most the budget plus one call is spent on the slow MIG calls.
        assert cycle.seconds <= 0.3 + 0.05 + 1e-9 and cycle.deferred > 0
        assert [g.joules for g in cycle.gpus] == [100.0, 100.0]
        seen |= {i.uuid for g in cycle.gpus for i in g.instances if i.pids == (999,)}
    assert len(seen) == 14, "every instance's processes were read within a few cycles"


def test_every_mig_gpu_books_energy_from_the_first_reading_after_the_baseline(
        clock: FakeClock) -> None:
    # Issue 10: 8 GPUs x 7 instances, 50 ms a MIG call (a layout costs 1.8 s), read with
    # the 0.8 s budget of a 1 s interval. A GPU whose layout is unknown books no energy, so
    # when the layouts are enumerated one GPU after another GPU k first books energy in
    # reading k + 2 (16 s at 1 s). Enumerated side by side, and the energy read again once
    # a layout is learned, every GPU books its energy from the first reading on.
    gpus = [_mig_gpu(f"GPU-{g}", 7) for g in range(8)]
    fake = SlowMigNvml(gpus, clock, cost=0.05)
    reader = GpuReader(fake, clock)
    reader.start()
    first_energy: dict[str, int] = {}
    for reading in range(1, 11):
        for gpu in gpus:
            gpu.energy_mj += 100_000
        for g in reader.read(want_pids=False, budget_seconds=0.8).gpus:
            if g.joules is not None:
                first_energy.setdefault(g.uuid, reading)
    assert [first_energy.get(g.uuid) for g in gpus] == [1] * 8


class BarrierMigNvml(FakeNvml):
    """Layout enumerations meet at a barrier of ``parties``: they pass only when that many
    run at the same time (a reader that enumerates one GPU after another breaks it)."""

    def __init__(self, gpus: list[FakeGpu], parties: int) -> None:
        super().__init__(gpus)
        self.barrier = threading.Barrier(parties, timeout=30)
        self.lock = threading.Lock()
        self.in_flight = 0
        self.peak = 0
        self.threads: list[threading.Thread] = []  # where each enumeration ran

    def mig_layout(self, uuid: str) -> list[MigInstance]:
        with self.lock:
            self.threads.append(threading.current_thread())
            self.in_flight += 1
            self.peak = max(self.peak, self.in_flight)
        try:
            self.barrier.wait()
            return super().mig_layout(uuid)
        finally:
            with self.lock:
                self.in_flight -= 1


def test_layouts_of_different_gpus_are_enumerated_concurrently_in_a_bounded_pool(
        clock: FakeClock) -> None:
    count = 2 * LAYOUT_THREADS
    gpus = [_mig_gpu(f"GPU-{g}", 2) for g in range(count)]
    fake = BarrierMigNvml(gpus, LAYOUT_THREADS)
    reader = GpuReader(fake, clock)
    reader.start()
    cycle = reader.read(want_pids=False)
    assert cycle.faults == ()
    assert all(len(g.instances) == 2 for g in cycle.gpus)
    assert fake.peak == LAYOUT_THREADS  # concurrent, and never more than the pool


def test_a_library_not_known_to_be_thread_safe_enumerates_one_gpu_at_a_time(
        clock: FakeClock) -> None:
    gpus = [_mig_gpu(f"GPU-{g}", 2) for g in range(3)]
    fake = BarrierMigNvml(gpus, 1)
    fake.concurrent_calls = False  # as AmdSmiBackend
    reader = GpuReader(fake, clock)
    reader.start()
    cycle = reader.read(want_pids=False)
    assert all(len(g.instances) == 2 for g in cycle.gpus)
    assert fake.peak == 1


def test_a_due_refresh_of_known_layouts_goes_one_gpu_at_a_time(clock: FakeClock) -> None:
    # Known layouts hold no energy back: their periodic refresh is not worth the risk of a
    # driver that serialises concurrent calls into one long reading every refresh.
    gpus = [_mig_gpu(f"GPU-{g}", 2) for g in range(3)]
    fake = BarrierMigNvml(gpus, 3)
    reader = GpuReader(fake, clock, mig_refresh_seconds=60.0)
    reader.start()
    read_at(reader, clock, 0.0, want_pids=False)
    assert fake.peak == 3
    fake.barrier, fake.threads = threading.Barrier(1), []
    (*_, last) = read_at(reader, clock, 61.0, want_pids=False).gpus
    # All three enumerated again, each on the reading's own thread: one after another.
    assert fake.threads == [threading.current_thread()] * 3
    assert len(last.instances) == 2
