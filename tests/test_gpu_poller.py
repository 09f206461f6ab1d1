"""GPUs read on their own thread: a hung driver holds up neither the sampler nor the CPU
figures; what it held back is booked once, whole, when it answers; overruns are counted."""

from __future__ import annotations

import threading

import pytest
from conftest import FakeClock, node_config
from kwatt.gpu_poller import GpuPoller, merge_cycles
from kwatt.gpu_stage import GpuStage
from kwatt.sampler import Sampler
from kwatt.sources.nvml import GpuReader, GpuReading, NvmlCycle
from nvml_fake import FakeGpu, FakeNvml
from simnode import SimulatedNode, container_id, pod_uid
from test_gpu_stage import NamesNamer, assert_conserved, gpu_energy, run_process


class GatedNvml(FakeNvml):
    """The energy call blocks while ``gate`` is clear: a driver that hangs."""

    def __init__(self, gpus: list[FakeGpu]) -> None:
        super().__init__(gpus)
        self.gate = threading.Event()
        self.gate.set()
        self.blocked = threading.Event()

    def total_energy_mj(self, uuid: str) -> int:
        if not self.gate.is_set():
            self.blocked.set()
            self.gate.wait(30)
        return super().total_energy_mj(uuid)


def _cpu_energy(sampler: Sampler) -> float:
    return sum(j for c, _s, j in sampler.snapshot().node_energy if c == "cpu")


def test_hung_driver_never_stops_cpu_sampling_and_its_energy_is_booked_later(
        sim, clock: FakeClock) -> None:
    node: SimulatedNode = sim()
    node.add_rapl_zone("0", "package-0")
    namer = NamesNamer()
    ctr = node.add_container(node.add_pod(pod_uid("a")), container_id("a"))
    namer.add(ctr, "ml", "a", "main")
    run_process(node, 11, ctr.path)
    fake = GatedNvml([FakeGpu("GPU-0", energy_mj=1_000, compute_pids=[11])])
    reader = GpuReader(fake, clock)
    reader.start()
    poller = GpuPoller(reader, None, clock)
    # A short wait: a cycle goes on without a reading that is not there after 0.2 s.
    stage = GpuStage(reader, None, str(node.procfs), poller=poller, read_wait_seconds=0.2,
                     stall_seconds=9.0)
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])

    def step(gpu_joules: float) -> None:
        fake.gpus[0].energy_mj += int(gpu_joules * 1000)
        node.add_energy("0", 50.0)
        node.add_cpu(ctr.path, 1.0)
        node.add_node_cpu(busy_seconds=1.0, idle_seconds=4.0)
        clock.advance(5.0)
        sampler.sample()

    def settle(expected_gpu_joules: float) -> None:
        """Step (no new GPU energy) until the GPU thread's readings are all booked; a
        loaded machine may need more than one cycle's wait for a fast reading."""
        for _ in range(100):
            if gpu_energy(sampler.snapshot())[2] == pytest.approx(expected_gpu_joules):
                return
            step(0.0)
        raise AssertionError(gpu_energy(sampler.snapshot()))

    sampler.sample()  # baselines
    step(100.0)
    settle(100.0)

    fake.gate.clear()  # the driver hangs from the next energy call on
    step(200.0)
    assert fake.blocked.wait(10)
    cpu_before = _cpu_energy(sampler)
    step(300.0)
    step(400.0)  # busy for 10 s by the reader's clock, over the 9 s stall bound
    snap = sampler.snapshot()
    assert _cpu_energy(sampler) == pytest.approx(cpu_before + 100.0), "CPU kept sampling"
    assert dict(((s, r), n) for s, r, n in snap.source_errors).get(("nvml", "timeout"), 0) >= 1
    assert dict(snap.source_up)["nvml"] is False
    assert gpu_energy(snap)[2] == pytest.approx(100.0), "nothing booked while hung"
    assert poller.overruns >= 2
    gpu_rows = sampler.published().stages[0].gpus  # type: ignore[union-attr]
    assert [row.up for row in gpu_rows] == [False]

    fake.gate.set()  # it answers: the held-back energy is booked once, whole
    settle(1000.0)
    snap = sampler.snapshot()
    assert dict(snap.source_up)["nvml"] is True
    assert_conserved(snap)
    poller.stop()


def _reading(joules: float | None, dt: float | None, read_at: float | None,
             counter: int | None, up: bool = True) -> GpuReading:
    return GpuReading(0, "GPU-0", "m", False, up, joules, dt, read_at=read_at,
                      counter_mj=counter)


def test_merged_readings_add_up_and_keep_the_latest_counter() -> None:
    merged = merge_cycles([
        NvmlCycle((_reading(10.0, 1.0, 1.0, 10_000),), (), 3),
        NvmlCycle((_reading(None, None, None, None),), (), 1),  # MIG layout pending
        NvmlCycle((_reading(30.0, 2.0, 3.0, 40_000),), (), 3)])
    (gpu,) = merged.gpus
    assert (gpu.joules, gpu.dt, gpu.read_at, gpu.counter_mj) == (40.0, 3.0, 3.0, 40_000)
    assert merged.calls == 7
    down = merge_cycles([NvmlCycle((_reading(10.0, 1.0, 1.0, 10_000),), (), 3),
                         NvmlCycle((_reading(None, None, None, None, up=False),), (), 1)])
    assert not down.gpus[0].up and down.gpus[0].joules is None
