"""GpuReader over the fake NVML backend: counters, power integration, lost GPUs, MIG."""

from __future__ import annotations

import pytest
from kwatt.sources.nvml import GpuReader, MigInstance, NvmlUnavailable, ProcessSample, load_backend
from kwatt.sources.nvml_fake import FakeGpu, FakeNvml


def _gpus() -> list[FakeGpu]:
    return [
        FakeGpu("GPU-0", energy_mj=5_000_000, utilisation_percent=40),
        FakeGpu("GPU-1", model="Tesla T4", has_energy_counter=False, power_mw=70_000),
        FakeGpu("GPU-2", model="NVIDIA A100-SXM4-40GB", mig_enabled=True, energy_mj=1_000,
                instances=[MigInstance("MIG-a", 1, 3, "3g.20gb", (10,)),
                           MigInstance("MIG-b", 2, 4, "4g.20gb")]),
    ]


def test_counter_delta_power_integration_and_mig() -> None:
    fake = FakeNvml(_gpus())
    reader = GpuReader(fake)
    assert reader.start() == []
    assert reader.driver_version == "550.54.15"
    first = reader.read(100.0, want_pids=False)
    assert [g.joules for g in first.gpus] == [None, None, None]  # baselines only

    fake.gpus[0].energy_mj += 1_500_000  # 1500 J
    fake.gpus[1].power_mw = 90_000  # 70 W -> 90 W: trapezoid 80 W
    fake.gpus[2].energy_mj += 700_000
    cycle = reader.read(110.0, want_pids=False)
    g0, g1, g2 = cycle.gpus
    assert cycle.faults == ()
    assert (g0.joules, g0.dt, g0.utilisation, g0.energy_source) == (1500.0, 10.0, 0.4, "counter")
    assert (g1.joules, g1.energy_source, g1.model) == (pytest.approx(800.0), "power", "Tesla T4")
    assert g2.mig_enabled and g2.utilisation is None and g2.joules == 700.0
    assert [(i.uuid, i.slices, i.pids) for i in g2.instances] == [
        ("MIG-a", 3, (10,)), ("MIG-b", 4, ())]


def test_counter_reset_rebaselines_never_backwards() -> None:
    fake = FakeNvml([FakeGpu("GPU-0", energy_mj=9_000_000)])
    reader = GpuReader(fake)
    reader.start()
    reader.read(0.0, want_pids=False)
    fake.gpus[0].energy_mj = 200  # driver reload: counts from 0 again
    reset = reader.read(5.0, want_pids=False)
    assert reset.gpus[0].joules == 0.0
    fake.gpus[0].energy_mj = 100_200
    assert reader.read(10.0, want_pids=False).gpus[0].joules == 100.0


def test_lost_gpu_is_marked_down_others_continue_and_it_comes_back() -> None:
    fake = FakeNvml([FakeGpu("GPU-0"), FakeGpu("GPU-1")])
    reader = GpuReader(fake)
    reader.start()
    reader.read(0.0, want_pids=False)
    fake.gpus[1].lost = True
    for gpu in fake.gpus:
        gpu.energy_mj += 10_000
    lost = reader.read(1.0, want_pids=False)
    assert [(g.uuid, g.up, g.joules) for g in lost.gpus] == [
        ("GPU-0", True, 10.0), ("GPU-1", False, None)]
    assert {(f.source, f.reason, f.subject) for f in lost.faults} == {
        ("nvml", "absent", "GPU-1")}

    fake.gpus[1].energy_mj += 99_000  # spent while unreadable: never booked
    fake.gpus[1].lost = False
    back = reader.read(2.0, want_pids=False)
    assert [(g.up, g.joules) for g in back.gpus] == [(True, 0.0), (True, None)]
    fake.gpus[1].energy_mj += 3_000
    again = reader.read(3.0, want_pids=False)
    assert again.gpus[1].joules == 3.0 and again.faults == ()


def test_unknown_error_on_energy_marks_down_for_that_cycle() -> None:
    fake = FakeNvml([FakeGpu("GPU-0")])
    reader = GpuReader(fake)
    reader.start()
    reader.read(0.0, want_pids=False)
    fake.gpus[0].failing["total_energy_mj"] = "unknown"
    cycle = reader.read(1.0, want_pids=False)
    assert not cycle.gpus[0].up
    assert [(f.reason, f.subject) for f in cycle.faults] == [("api", "GPU-0")]
    del fake.gpus[0].failing["total_energy_mj"]
    assert reader.read(2.0, want_pids=False).gpus[0].up


def test_process_samples_only_new_since_last_seen() -> None:
    gpu = FakeGpu("GPU-0", samples=[ProcessSample(1, 30, 1_000), ProcessSample(2, 50, 2_000)])
    fake = FakeNvml([gpu])
    reader = GpuReader(fake)
    reader.start()
    assert [s.pid for s in reader.read(0.0, want_pids=False).gpus[0].process_samples] == [1, 2]
    assert reader.read(1.0, want_pids=False).gpus[0].process_samples == ()
    gpu.samples.append(ProcessSample(3, 20, 3_000))
    assert [s.pid for s in reader.read(2.0, want_pids=False).gpus[0].process_samples] == [3]


def test_compute_pids_only_when_asked() -> None:
    fake = FakeNvml([FakeGpu("GPU-0", compute_pids=[7, 8])])
    reader = GpuReader(fake)
    reader.start()
    assert reader.read(0.0, want_pids=False).gpus[0].compute_pids == ()
    assert reader.read(1.0, want_pids=True).gpus[0].compute_pids == (7, 8)


def test_unsupported_process_utilisation_is_not_a_fault() -> None:
    fake = FakeNvml([FakeGpu("GPU-0", has_process_utilisation=False)])
    reader = GpuReader(fake)
    reader.start()
    cycle = reader.read(0.0, want_pids=False)
    assert cycle.faults == () and cycle.gpus[0].up
    calls = reader.read(1.0, want_pids=False).calls
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
