"""PynvmlBackend's translation of pynvml: error codes, handle caching, MIG enumeration.

A stand-in ``pynvml`` module with the same names, return shapes and error classes as
nvidia-ml-py plays the driver; what is tested is our code's use of it. The real library is
exercised on GPU machines by scripts/gpu-check.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pynvml as real
import pytest
from kwatt.sources.gpu import EnergyCounter
from kwatt.sources.nvml import GpuReader, MigInstance, NvmlCallError, ProcessSample


@dataclass
class Driver:
    uuids: list[str] = field(default_factory=lambda: ["GPU-a", "GPU-b"])
    lost: set[str] = field(default_factory=set)
    lookups: int = 0
    energy: dict[str, int] = field(default_factory=lambda: {"GPU-a": 1000, "GPU-b": 5000})
    mig: dict[str, list[tuple[str, int, str, list[int]] | None]] = field(default_factory=dict)


def stand_in(driver: Driver) -> types.ModuleType:
    nv = types.ModuleType("pynvml")
    for name in dir(real):
        if name.startswith("NVML_") or name.startswith("NVMLError"):
            setattr(nv, name, getattr(real, name))

    def check(handle: Any) -> str:
        uuid = handle["uuid"]
        if uuid in driver.lost:
            raise real.NVMLError(real.NVML_ERROR_GPU_IS_LOST)
        return str(uuid)

    def by_uuid(uuid: str) -> dict[str, str]:
        driver.lookups += 1
        if uuid in driver.lost or uuid not in driver.uuids:
            raise real.NVMLError(real.NVML_ERROR_NOT_FOUND)
        return {"uuid": uuid}

    def process_utilisation(handle: Any, since: int) -> list[Any]:
        uuid = check(handle)
        if uuid == "GPU-b":
            raise real.NVMLError(real.NVML_SUCCESS)  # pynvml's quirk: no samples at all
        return [types.SimpleNamespace(pid=7, smUtil=42, timeStamp=since + 10)]

    def mig_handle(parent: Any, index: int) -> Any:
        entry = driver.mig[parent["uuid"]][index]
        if entry is None:
            raise real.NVMLError(real.NVML_ERROR_NOT_FOUND)
        return {"uuid": entry[0], "mig": entry}

    nv.NVMLError = real.NVMLError
    nv.nvmlInit = lambda: None
    nv.nvmlSystemGetDriverVersion = lambda: "550.54.15"
    nv.nvmlDeviceGetCount = lambda: len(driver.uuids)
    nv.nvmlDeviceGetHandleByIndex = lambda i: {"uuid": driver.uuids[i]}
    nv.nvmlDeviceGetUUID = lambda h: h["uuid"]
    nv.nvmlDeviceGetHandleByUUID = by_uuid
    nv.nvmlDeviceGetIndex = lambda h: driver.uuids.index(check(h))
    nv.nvmlDeviceGetName = lambda h: (f"NVIDIA A100-SXM4-40GB MIG {h['mig'][2]}"
                                      if "mig" in h else "NVIDIA A100-SXM4-40GB")
    nv.nvmlDeviceGetTotalEnergyConsumption = lambda h: driver.energy[check(h)]
    nv.nvmlDeviceGetPowerUsage = lambda h: 100_000
    nv.nvmlDeviceGetPciInfo = lambda h: types.SimpleNamespace(
        busId=b"00000000:3B:00.0" if check(h) == "GPU-a" else b"00000000:86:00.0")
    nv.nvmlDeviceGetEnforcedPowerLimit = lambda h: check(h) and 400_000
    nv.nvmlDeviceGetUtilizationRates = lambda h: types.SimpleNamespace(gpu=check(h) and 55)
    nv.nvmlDeviceGetProcessUtilization = process_utilisation
    nv.nvmlDeviceGetComputeRunningProcesses = lambda h: (
        [types.SimpleNamespace(pid=p) for p in h["mig"][3]] if "mig" in h
        else [types.SimpleNamespace(pid=7)])
    nv.nvmlDeviceGetMigMode = lambda h: [1 if check(h) in driver.mig else 0, 0]
    nv.nvmlDeviceGetMaxMigDeviceCount = lambda h: len(driver.mig[h["uuid"]])
    nv.nvmlDeviceGetMigDeviceHandleByIndex = mig_handle
    nv.nvmlDeviceGetAttributes = lambda h: types.SimpleNamespace(
        gpuInstanceSliceCount=h["mig"][1])
    nv.nvmlDeviceGetGpuInstanceId = lambda h: 1
    return nv


@pytest.fixture
def driver(monkeypatch: pytest.MonkeyPatch) -> Iterator[Driver]:
    state = Driver()
    monkeypatch.setitem(sys.modules, "pynvml", stand_in(state))
    yield state


def test_reads_and_caches_handles(driver: Driver) -> None:
    from kwatt.sources.nvml import PynvmlBackend

    backend = PynvmlBackend()
    backend.init()
    assert backend.device_uuids() == ["GPU-a", "GPU-b"]
    assert backend.energy_counter("GPU-a") == EnergyCounter(1000, 1e-3)
    assert backend.utilisation_percent("GPU-a") == 55
    assert backend.process_utilisation("GPU-a", 100) == [ProcessSample(7, 42.0, 110)]
    assert backend.compute_pids("GPU-a") == [7]
    assert backend.bus_id("GPU-a") == "0000:3b:00.0"  # NVML's 8-digit domain, normalised
    assert driver.lookups == 0, "handles from enumeration are reused"
    with pytest.raises(NvmlCallError) as info:
        backend.process_utilisation("GPU-b", 0)
    assert info.value.kind == "not_found"


def test_lost_gpu_drops_handle_and_is_found_again(driver: Driver) -> None:
    from kwatt.sources.nvml import PynvmlBackend

    clock = iter(float(t) for t in range(1000)).__next__
    reader = GpuReader(PynvmlBackend(), clock)
    reader.start()
    reader.read(want_pids=False)
    driver.lost.add("GPU-b")
    cycle = reader.read(want_pids=False)
    assert [g.up for g in cycle.gpus] == [True, False]
    assert {(f.reason, f.subject) for f in cycle.faults} == {("absent", "GPU-b")}
    driver.lost.clear()
    driver.energy["GPU-b"] += 2000
    reader.read(want_pids=False)  # back, re-baselined
    driver.energy["GPU-b"] += 3000
    cycle = reader.read(want_pids=False)
    assert cycle.faults == ()
    assert [g.joules for g in cycle.gpus] == [0.0, 3.0]
    assert driver.lookups >= 1, "the handle was looked up again by UUID"


def test_mig_layout_skips_empty_slots_and_instance_pids_reuse_its_handles(
        driver: Driver) -> None:
    from kwatt.sources.nvml import PynvmlBackend

    driver.mig["GPU-a"] = [("MIG-1", 3, "3g.20gb", [11]), None, ("MIG-2", 4, "4g.20gb", [])]
    backend = PynvmlBackend()
    assert backend.mig_enabled("GPU-a") and not backend.mig_enabled("GPU-b")
    assert backend.mig_layout("GPU-a") == [
        MigInstance("MIG-1", 1, 3, "3g.20gb"), MigInstance("MIG-2", 1, 4, "4g.20gb")]
    lookups = driver.lookups
    assert backend.instance_pids("MIG-1") == [11]
    assert backend.instance_pids("MIG-2") == []
    assert driver.lookups == lookups, "the instance handles from the layout are reused"
