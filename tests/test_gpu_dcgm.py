"""MIG instances weighted by dcgm-exporter's DCGM_FI_PROF_GR_ENGINE_ACTIVE, read from a fake
dcgm-exporter over HTTP; its faults are counted and fall back to on/off activity."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from conftest import FakeClock, node_config
from fake_dcgm_exporter import FakeDcgmExporter, mig_page
from kwatt.gpu_stage import GpuStage
from kwatt.ledger import LedgerSnapshot
from kwatt.sampler import Sampler
from kwatt.sources.dcgm import DcgmActivitySource, parse_activity
from kwatt.sources.nvml import GpuReader, MigInstance
from nvml_fake import FakeGpu, FakeNvml
from simnode import SimulatedNode, container_id, pod_uid
from test_gpu_stage import NamesNamer, assert_conserved, gpu_energy, run_process

GPU = "GPU-mig"


@pytest.fixture
def dcgm_exporter() -> Iterator[FakeDcgmExporter]:
    server = FakeDcgmExporter().start()
    yield server
    server.stop()


def _node(sim) -> tuple[SimulatedNode, NamesNamer, FakeNvml]:  # type: ignore[no-untyped-def]
    node: SimulatedNode = sim()
    namer = NamesNamer()
    for key, pid in (("a", 31), ("b", 32)):
        ctr = node.add_container(node.add_pod(pod_uid(key)), container_id(key))
        namer.add(ctr, "ml", key, "main")
        run_process(node, pid, ctr.path)
    fake = FakeNvml([FakeGpu(GPU, model="NVIDIA A100-SXM4-40GB", mig_enabled=True, instances=[
        MigInstance("MIG-3g", 1, 3, "3g.20gb", (31,)),
        MigInstance("MIG-4g", 2, 4, "4g.20gb", (32,))])])
    return node, namer, fake


def _run(node: SimulatedNode, namer: NamesNamer, fake: FakeNvml, clock: FakeClock,
         activity: DcgmActivitySource | None) -> LedgerSnapshot:
    reader = GpuReader(fake, clock)
    reader.start()
    stage = GpuStage(reader, None, str(node.procfs), dcgm=activity)
    sampler = Sampler(node_config(node), namer, clock=clock, stages=[stage])
    sampler.sample()
    fake.gpus[0].energy_mj += 700_000
    node.add_node_cpu(idle_seconds=10)
    clock.advance(10)
    sampler.sample()
    return sampler.snapshot()


def test_instances_weighted_by_engine_activity(sim, clock: FakeClock,
                                               dcgm_exporter: FakeDcgmExporter) -> None:
    """700 J on 7 slices; the 3g instance 75 % active, the 4g 25 %: active parts
    700 x 3 x 0.75 / 7 = 225 J and 700 x 4 x 0.25 / 7 = 100 J; idle 375 J split 3:4
    (160.71 / 214.29): 3g 385.71 J, 4g 314.29 J. On/off would give 300 / 400."""
    node, namer, fake = _node(sim)
    dcgm_exporter.body = mig_page({(GPU, 1): 0.75, (GPU, 2): 0.25})
    activity = DcgmActivitySource(dcgm_exporter.url, 30.0, 2.0, clock=clock)
    activity.refresh()
    snap = _run(node, namer, fake, clock, activity)
    containers, _, total = gpu_energy(snap)
    assert containers == {("ml", "a", "main"): pytest.approx(225 + 375 * 3 / 7),
                          ("ml", "b", "main"): pytest.approx(100 + 375 * 4 / 7)}
    assert total == pytest.approx(700.0)
    assert dict(snap.source_up)["dcgm"] is True
    assert_conserved(snap)


def test_without_dcgm_exporter_instances_are_on_or_off(sim, clock: FakeClock) -> None:
    node, namer, fake = _node(sim)
    containers, _, _ = gpu_energy(_run(node, namer, fake, clock, None))
    assert containers == {("ml", "a", "main"): pytest.approx(300.0),
                          ("ml", "b", "main"): pytest.approx(400.0)}


@pytest.mark.parametrize(("problem", "reason"), [
    ("status", "api"), ("slow", "timeout"), ("garbage", "parse"), ("gone", "api")])
def test_faults_are_counted_and_fall_back_to_on_off(sim, clock: FakeClock,
                                                    dcgm_exporter: FakeDcgmExporter,
                                                    problem: str, reason: str) -> None:
    node, namer, fake = _node(sim)
    dcgm_exporter.body = mig_page({(GPU, 1): 0.75, (GPU, 2): 0.25})
    activity = DcgmActivitySource(dcgm_exporter.url, 30.0, 0.3, clock=clock)
    activity.refresh()  # a good reading first: a fault must not leave it in use
    if problem == "status":
        dcgm_exporter.status = 500
    elif problem == "slow":
        dcgm_exporter.delay = 2.0
    elif problem == "garbage":
        dcgm_exporter.body = 'DCGM_FI_PROF_GR_ENGINE_ACTIVE{UUID="x" 0.5\n{{{\n'
    else:
        dcgm_exporter.stop()
    activity.refresh()
    snap = _run(node, namer, fake, clock, activity)
    containers, _, _ = gpu_energy(snap)
    assert containers == {("ml", "a", "main"): pytest.approx(300.0),
                          ("ml", "b", "main"): pytest.approx(400.0)}
    errors = {(s, r): n for s, r, n in snap.source_errors}
    assert errors.get(("dcgm", reason)) == 1
    assert dict(snap.source_up)["dcgm"] is False


def test_parse_skips_whole_gpu_series_and_clamps() -> None:
    page = mig_page({("GPU-a", 1): 1.5, ("GPU-a", 2): 0.5})
    page += 'DCGM_FI_PROF_GR_ENGINE_ACTIVE{gpu="1",UUID="GPU-b"} 0.9\n'
    assert parse_activity(page) == {("GPU-a", 1): 1.0, ("GPU-a", 2): 0.5}


def test_own_thread_reads_on_its_period(dcgm_exporter: FakeDcgmExporter) -> None:
    activity = DcgmActivitySource(dcgm_exporter.url, 0.05, 2.0)
    activity.start()
    try:
        deadline = time.monotonic() + 20
        while dcgm_exporter.requests < 3 and time.monotonic() < deadline:
            time.sleep(0.02)
    finally:
        activity.stop()
    assert dcgm_exporter.requests >= 3
