"""The restart state file: its format, what makes it unusable, and a sampler across a
restart on a simulated node (the gap's energy booked in the first cycle, conserved)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
from conftest import FakeClock, node_config
from kwatt.config import ConfigError, load_config
from kwatt.gpu_stage import GpuStage
from kwatt.ledger import LedgerSnapshot
from kwatt.sampler import Sampler
from kwatt.sources.nvml import GpuReader
from kwatt.state import (
    MAX_AGE_SECONDS,
    MAX_BYTES,
    Counters,
    GpuCounter,
    StateFile,
    StateRejected,
    check_age,
    decode,
    encode,
)
from kwatt.statekeeper import StateKeeper
from kwatt.workloads.naming import HostNamer
from nvml_fake import FakeGpu, FakeNvml
from simnode import SimulatedNode, container_id, pod_uid

BOOT = "7f0c2d1e-0000-4000-8000-000000000001"
COUNTERS = Counters(1234.5, 2, True, 1000, 5000, {"0": 12_345_678, "0:2": 99},
                    {"GPU-1": GpuCounter(777, 1234.25)},
                    {"/system.slice/a.service": 1.5, "/bad-\udcff.scope": 0.25})


def test_round_trip_keeps_every_counter_and_undecodable_paths() -> None:
    boot_id, counters = decode(encode(BOOT, COUNTERS))
    assert boot_id == BOOT
    assert counters == COUNTERS


def _doc() -> dict[str, object]:
    return dict(json.loads(encode(BOOT, COUNTERS)))


@pytest.mark.parametrize(("mutate", "reason"), [
    (lambda d: d.update(kwatt_state=2), "unsupported version"),
    (lambda d: d.update(kwatt_state=True), "unsupported version"),
    (lambda d: d.pop("boot_id"), "corrupt: boot_id"),
    (lambda d: d.update(monotonic="soon"), "corrupt: monotonic"),
    (lambda d: d.update(monotonic=-1), "corrupt: monotonic"),
    (lambda d: d.update(host_units=1), "corrupt: host_units"),
    (lambda d: d.update(rapl_uj={"0": -5}), "corrupt: rapl_uj.0"),
    (lambda d: d.update(rapl_uj={"0": 1.5}), "corrupt: rapl_uj.0"),
    (lambda d: d.update(rapl_uj={"0": True}), "corrupt: rapl_uj.0"),
    (lambda d: d.update(rapl_uj=[1, 2]), "corrupt: rapl_uj"),
    (lambda d: d.update(node_cpu={"busy_ticks": "x", "idle_ticks": 1}),
     "corrupt: node_cpu.busy_ticks"),
    (lambda d: d.update(gpu={"GPU-1": 5}), "corrupt: gpu.GPU-1"),
    (lambda d: d.update(cgroup_usage_seconds={"/a": None}), "corrupt: cgroup_usage_seconds"),
])
def test_wrong_types_are_rejected_with_the_field(mutate, reason: str) -> None:
    document = _doc()
    mutate(document)
    with pytest.raises(StateRejected, match=reason):
        decode(json.dumps(document).encode())


@pytest.mark.parametrize("data", [
    b"", b"\xff\xfe garbage", b"[1, 2]", b"{\"kwatt_state\": 1", b"null",
    b"[" * 100_000 + b"]" * 100_000,  # nesting: no RecursionError escapes
    json.dumps({**json.loads(encode(BOOT, COUNTERS)), "monotonic": "NaN"}).encode(),
    encode(BOOT, COUNTERS).replace(b'"monotonic":1234.5', b'"monotonic":NaN'),
])
def test_garbage_is_rejected_never_raised(data: bytes) -> None:
    with pytest.raises(StateRejected):
        decode(data)


def test_a_file_over_the_size_bound_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "state"
    path.write_bytes(b" " * (MAX_BYTES + 10))
    with pytest.raises(StateRejected, match="too large"):
        StateFile(str(path)).read()


def test_fifo_symlink_and_directory_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(StateRejected, match="not a regular file"):
        StateFile(str(fifo)).read()  # a blocking open or read would hang here
    target = tmp_path / "target"
    target.write_bytes(encode(BOOT, COUNTERS))
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(StateRejected, match="symlink"):
        StateFile(str(link)).read()
    with pytest.raises(StateRejected, match="not a regular file"):
        StateFile(str(tmp_path)).read()


def test_write_does_not_follow_a_planted_symlink(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious")
    (tmp_path / "state.tmp").symlink_to(victim)
    with pytest.raises(OSError):
        StateFile(str(tmp_path / "state")).write(b"{}")
    assert victim.read_text() == "precious"


def test_other_boot_stale_and_future_are_rejected() -> None:
    check_age(BOOT, COUNTERS, BOOT, COUNTERS.monotonic + 5)  # fine
    with pytest.raises(StateRejected, match="another boot"):
        check_age(BOOT, COUNTERS, "other", COUNTERS.monotonic + 5)
    with pytest.raises(StateRejected, match="stale"):
        check_age(BOOT, COUNTERS, BOOT, COUNTERS.monotonic + MAX_AGE_SECONDS + 1)
    with pytest.raises(StateRejected, match="future"):
        check_age(BOOT, COUNTERS, BOOT, COUNTERS.monotonic - 60)
    odd_gpu = Counters(COUNTERS.monotonic, 2, True, gpu={"GPU-1": GpuCounter(1, 10.0)})
    with pytest.raises(StateRejected, match="GPU-1 read at another time"):
        check_age(BOOT, odd_gpu, BOOT, COUNTERS.monotonic + 5)


def test_write_replaces_atomically_and_leaves_no_temporary(tmp_path: Path) -> None:
    state = StateFile(str(tmp_path / "state"))
    assert state.read() is None
    state.write(b"one")
    state.write(b"two")
    assert state.read() == b"two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state"]


# -- a sampler across a restart --------------------------------------------------------------

PACKAGE_W, DRAM_W = 100.0, 20.0


def _node(root: Path) -> tuple[SimulatedNode, dict[str, str]]:
    node = SimulatedNode(root, cgroup_version=2, vcpus=4)
    node.add_rapl_zone("0", "package-0")
    node.add_rapl_zone("0:2", "dram")
    boot = node.procfs / "sys" / "kernel" / "random"
    boot.mkdir(parents=True)
    (boot / "boot_id").write_text(BOOT + "\n")
    pod = node.add_pod(pod_uid("p"), "burstable", "containerd")
    paths = {"web": node.add_container(pod, container_id("web")).path,
             "db": node.add_container(pod, container_id("db")).path,
             "gone": node.add_container(pod, container_id("gone")).path}
    return node, paths


def _run(node: SimulatedNode, paths: dict[str, str], seconds: float,
         cpu: dict[str, float]) -> None:
    node.add_energy("0", PACKAGE_W * seconds)
    node.add_energy("0:2", DRAM_W * seconds)
    for key, share in cpu.items():
        node.add_cpu(paths[key], share * seconds)
    node.add_node_cpu(busy_seconds=0.2 * seconds, idle_seconds=2.0 * seconds)


def _keeper(node: SimulatedNode, state: Path, clock: FakeClock
            ) -> tuple[Sampler, StateKeeper]:
    sampler = Sampler(node_config(node), HostNamer(), clock=clock)
    keeper = StateKeeper(StateFile(str(state)),
                         str(node.procfs / "sys" / "kernel" / "random" / "boot_id"),
                         sampler, clock=clock)
    sampler.on_cycle = keeper.cycle_done
    return sampler, keeper


def _totals(snap: LedgerSnapshot) -> tuple[dict[str, float], dict[str, float],
                                           dict[str, float]]:
    node: dict[str, float] = {}
    workloads: dict[str, float] = {}
    unattributed: dict[str, float] = {}
    for component, _source, joules in snap.node_energy:
        node[component] = node.get(component, 0.0) + joules
    for row in snap.containers:
        for component, joules in row.energy:
            workloads[component] = workloads.get(component, 0.0) + joules
    for component, _reason, joules in snap.unattributed:
        unattributed[component] = unattributed.get(component, 0.0) + joules
    return node, workloads, unattributed


def _restart(tmp_path: Path, with_state: bool) -> tuple[Sampler, dict[str, float]]:
    """Run 3 cycles, stop, 7 s gap in which 'gone' ends, start again, one cycle."""
    clock = FakeClock(5000.0)
    node, paths = _node(tmp_path / "node")
    state = tmp_path / "state.json"
    first, keeper = _keeper(node, state, clock)
    assert keeper.restore() is False  # no file yet
    first.sample()
    for _ in range(2):
        _run(node, paths, 2.0, {"web": 1.0, "db": 0.5, "gone": 0.25})
        clock.advance(2.0)
        first.sample()
        keeper.served(first.snapshot())  # a scrape saw it
    keeper.flush()  # at shutdown
    # The gap: 7 s at constant power; "gone" runs 1 s more, then its cgroup is removed.
    _run(node, paths, 1.0, {"web": 1.0, "db": 0.5, "gone": 0.25})
    node.remove_cgroup(paths.pop("gone"))
    _run(node, paths, 6.0, {"web": 1.0, "db": 0.5})
    clock.advance(7.0)
    if not with_state:
        state.unlink()
    second, keeper2 = _keeper(node, state, clock)
    assert keeper2.restore() is with_state
    report = second.sample()
    assert report.dt == (7.0 if with_state else None)
    node_j, workload_j, unattributed_j = _totals(second.snapshot())
    return second, {"node_cpu": node_j.get("cpu", 0.0), "node_dram": node_j.get("dram", 0.0),
                    "work_cpu": workload_j.get("cpu", 0.0),
                    "unatt_cpu": unattributed_j.get("cpu", 0.0)}


def test_first_cycle_after_restart_books_the_whole_gap(tmp_path: Path) -> None:
    second, got = _restart(tmp_path, with_state=True)
    assert got["node_cpu"] == pytest.approx(PACKAGE_W * 7.0, abs=1e-6)
    assert got["node_dram"] == pytest.approx(DRAM_W * 7.0, abs=1e-6)
    # Conservation: workloads + unattributed = node.
    assert got["work_cpu"] + got["unatt_cpu"] == pytest.approx(got["node_cpu"], abs=1e-6)
    # Split by each cgroup's CPU across the gap: web 7 s, db 3.5 s of 7*0.2+... busy.
    rows = {r.labels.container: dict(r.energy) for r in second.snapshot().containers}
    web, db = rows[container_id("web")[:12]], rows[container_id("db")[:12]]
    assert web["cpu"] == pytest.approx(2 * db["cpu"], rel=1e-6)
    # "gone" ran 0.25 s in the gap and vanished: its share is not lost, it lands in the
    # node's system share (as any CPU time of a cgroup that ended between two samples).
    busy = 7.0 * 1.0 + 7.0 * 0.5 + 0.25 + 7.0 * 0.2
    active = PACKAGE_W * 7.0 * busy / (busy + 14.0)
    assert web["cpu"] == pytest.approx(active * 7.0 / busy, rel=1e-3)


def test_without_state_the_gap_is_lost(tmp_path: Path) -> None:
    _, got = _restart(tmp_path, with_state=False)
    assert got["node_cpu"] == 0.0  # the first cycle only sets the baseline


def test_only_served_cycles_are_written(tmp_path: Path) -> None:
    """Energy booked after the last scrape was never seen: the file keeps the counters of
    the last served cycle, so the next process books that tail again."""
    clock = FakeClock(100.0)
    node, paths = _node(tmp_path / "node")
    state = tmp_path / "state.json"
    sampler, keeper = _keeper(node, state, clock)
    assert keeper.restore() is False  # no file yet
    sampler.sample()
    assert not state.exists()  # nothing served yet: nothing to keep
    keeper.served(sampler.snapshot())
    _run(node, paths, 1.0, {"web": 1.0})
    clock.advance(1.0)
    sampler.sample()  # writes cycle 1's counters (served)
    _, saved = decode(state.read_bytes())
    assert saved.monotonic == 100.0
    _run(node, paths, 1.0, {"web": 1.0})
    clock.advance(1.0)
    sampler.sample()  # cycle 3 unserved: file unchanged
    keeper.flush()
    assert decode(state.read_bytes())[1].monotonic == 100.0
    keeper.served(sampler.snapshot())
    keeper.flush()
    assert decode(state.read_bytes())[1].monotonic == 102.0
    assert keeper.last_write_bytes == state.stat().st_size


@pytest.mark.parametrize(("tamper", "reason"), [
    ("boot", "another boot"),
    ("stale", "stale"),
    ("corrupt", "corrupt"),
    ("node_cpu", "node CPU time is lower"),
    ("rapl", "RAPL counter lower"),
    ("layout", "another cgroup layout"),
])
def test_unusable_state_is_ignored_in_one_line(tmp_path: Path, caplog, tamper: str,
                                               reason: str) -> None:
    clock = FakeClock(100.0)
    node, paths = _node(tmp_path / "node")
    state = tmp_path / "state.json"
    sampler, keeper = _keeper(node, state, clock)
    assert keeper.restore() is False  # no file yet
    sampler.sample()
    keeper.served(sampler.snapshot())
    keeper.flush()
    document = json.loads(state.read_bytes())
    if tamper == "boot":
        document["boot_id"] = "another"
    elif tamper == "stale":
        clock.advance(MAX_AGE_SECONDS + 1)
    elif tamper == "node_cpu":
        document["node_cpu"]["busy_ticks"] += 10_000
    elif tamper == "rapl":
        document["rapl_uj"]["0"] += 10**12
    elif tamper == "layout":
        document["cgroup_version"] = 1
    state.write_text("{not json" if tamper == "corrupt" else json.dumps(document))
    _run(node, paths, 5.0, {"web": 1.0})
    clock.advance(5.0)
    second, keeper2 = _keeper(node, state, clock)
    with caplog.at_level(logging.INFO, logger="kwatt.state"):
        assert keeper2.restore() is False
    lines = [r for r in caplog.records if r.name == "kwatt.state"]
    assert len(lines) == 1
    assert reason in lines[0].__dict__["reason"]
    assert second.sample().dt is None  # nothing seeded: a first cycle, nothing booked
    assert _totals(second.snapshot())[0] == {}


def test_gpu_energy_of_the_gap_is_booked_from_the_saved_nvml_counter(tmp_path: Path) -> None:
    clock = FakeClock(200.0)
    node, paths = _node(tmp_path / "node")
    (node.procfs / "11").mkdir()
    (node.procfs / "11" / "cgroup").write_text(f"0::{paths['web']}\n")
    gpus = [FakeGpu("GPU-0", energy_mj=5_000_000, compute_pids=[11],
                    utilisation_percent=100)]  # the hardware: outlives the processes
    state = tmp_path / "state.json"

    def start() -> tuple[Sampler, StateKeeper]:
        reader = GpuReader(FakeNvml(gpus), clock)
        reader.start()
        stage = GpuStage(reader, None, str(node.procfs))
        sampler = Sampler(node_config(node), HostNamer(), clock=clock, stages=[stage])
        keeper = StateKeeper(StateFile(str(state)),
                             str(node.procfs / "sys" / "kernel" / "random" / "boot_id"),
                             sampler, stage, clock=clock)
        sampler.on_cycle = keeper.cycle_done
        return sampler, keeper

    first, keeper = start()
    keeper.restore()
    first.sample()
    gpus[0].energy_mj += 300_000
    _run(node, paths, 1.0, {"web": 1.0})
    clock.advance(1.0)
    first.sample()
    keeper.served(first.snapshot())
    keeper.flush()
    gpus[0].energy_mj += 2_100_000  # 7 s at 300 W while no exporter ran
    _run(node, paths, 7.0, {"web": 1.0})
    clock.advance(7.0)
    second, keeper2 = start()
    assert keeper2.restore() is True
    second.sample()
    snap = second.snapshot()
    gpu_node = sum(j for c, _s, j in snap.node_energy if c == "gpu")
    assert gpu_node == pytest.approx(2100.0)
    gpu_workloads = sum(j for r in snap.containers for c, j in r.energy if c == "gpu")
    gpu_unattributed = sum(j for c, _r, j in snap.unattributed if c == "gpu")
    assert gpu_workloads + gpu_unattributed == pytest.approx(gpu_node)
    assert gpu_workloads > 0


def test_state_file_setting_from_flag_yaml_and_env(tmp_path: Path) -> None:
    base = ["--kubernetes", "off", "--node-name", "n"]
    assert load_config(base, env={}).state_file == ""  # off by default
    assert load_config([*base, "--state.file", "/s/f"], env={}).state_file == "/s/f"
    assert load_config(base, env={"KWATT_STATE_FILE": "/e/f"}).state_file == "/e/f"
    config = tmp_path / "kwatt.yaml"
    config.write_text("state:\n  file: /y/f\n")
    assert load_config([*base, "--config", str(config)], env={}).state_file == "/y/f"
    assert load_config([*base, "--config", str(config), "--state.file", ""],
                       env={}).state_file == ""  # a flag turns it off again
    config.write_text("state:\n  file: [1]\n")
    with pytest.raises(ConfigError, match=r"state\.file"):
        load_config([*base, "--config", str(config)], env={})
