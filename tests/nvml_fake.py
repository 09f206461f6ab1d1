"""A scripted ``NvmlBackend`` for tests and benchmarks: GPUs are plain objects whose
counters the caller advances; faults are injected per GPU and per call.

benchmarks/bench_gpu.py imports it from here (tests/ on its path), so there is one fake.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kwatt.sources.gpu import EnergyCounter, normalise_bus_id
from kwatt.sources.nvml import MigInstance, NvmlCallError, NvmlUnavailable, ProcessSample


@dataclass
class FakeGpu:
    uuid: str
    model: str = "NVIDIA H100 80GB HBM3"
    energy_mj: int = 0
    power_mw: int = 0
    power_limit_mw: int | None = 700_000  # None: not supported
    utilisation_percent: int = 0
    has_energy_counter: bool = True
    has_process_utilisation: bool = True
    mig_enabled: bool = False
    instances: list[MigInstance] = field(default_factory=list)
    compute_pids: list[int] = field(default_factory=list)
    samples: list[ProcessSample] = field(default_factory=list)
    lost: bool = False  # every call raises GPU_IS_LOST while set
    failing: dict[str, str] = field(default_factory=dict)  # call name -> error kind


class FakeNvml:
    """Implements ``GpuBackend`` as NVML does; ``calls`` counts every call for the
    benchmark."""

    source = "nvml"
    vendor = "nvidia"
    instance_activity_supported = False
    concurrent_calls = True  # as NVML

    def __init__(self, gpus: list[FakeGpu], driver: str = "550.54.15",
                 available: bool = True) -> None:
        self.gpus = gpus
        self.driver = driver
        self.available = available
        self.calls = 0

    def _gpu(self, uuid: str, call: str) -> FakeGpu:
        self.calls += 1
        for gpu in self.gpus:
            if gpu.uuid == uuid:
                if gpu.lost:
                    raise NvmlCallError("lost", "GPU is lost")
                if call in gpu.failing:
                    raise NvmlCallError(gpu.failing[call], f"injected {call} failure")
                return gpu
        raise NvmlCallError("not_found", f"no GPU {uuid}")

    def init(self) -> None:
        if not self.available:
            raise NvmlUnavailable("NVML Shared Library Not Found")

    def driver_version(self) -> str:
        self.calls += 1
        return self.driver

    def device_uuids(self) -> list[str]:
        self.calls += 1
        return [g.uuid for g in self.gpus if not g.lost]

    def name(self, uuid: str) -> str:
        return self._gpu(uuid, "name").model

    def index(self, uuid: str) -> int:
        gpu = self._gpu(uuid, "index")
        return self.gpus.index(gpu)

    def total_energy_mj(self, uuid: str) -> int:
        gpu = self._gpu(uuid, "total_energy_mj")
        if not gpu.has_energy_counter:
            raise NvmlCallError("not_supported", "nvmlDeviceGetTotalEnergyConsumption")
        return gpu.energy_mj

    def energy_counter(self, uuid: str) -> EnergyCounter:
        return EnergyCounter(self.total_energy_mj(uuid), 1e-3)

    def bus_id(self, uuid: str) -> str:
        gpu = self._gpu(uuid, "bus_id")
        return normalise_bus_id(f"00000000:{0x10 + self.gpus.index(gpu):02X}:00.0")

    def instance_activity(self, instance_uuid: str) -> float | None:
        raise NvmlCallError("not_supported", "NVML has no MIG instance utilisation")

    def power_mw(self, uuid: str) -> int:
        return self._gpu(uuid, "power_mw").power_mw

    def power_limit_mw(self, uuid: str) -> int:
        gpu = self._gpu(uuid, "power_limit_mw")
        if gpu.power_limit_mw is None:
            raise NvmlCallError("not_supported", "nvmlDeviceGetEnforcedPowerLimit")
        return gpu.power_limit_mw

    def utilisation_percent(self, uuid: str) -> int:
        gpu = self._gpu(uuid, "utilisation_percent")
        if gpu.mig_enabled:
            raise NvmlCallError("not_supported", "utilisation in MIG mode")
        return gpu.utilisation_percent

    def process_utilisation(self, uuid: str, since_us: int) -> list[ProcessSample]:
        gpu = self._gpu(uuid, "process_utilisation")
        if not gpu.has_process_utilisation:
            raise NvmlCallError("not_supported", "nvmlDeviceGetProcessUtilization")
        fresh = [s for s in gpu.samples if s.timestamp_us > since_us]
        if not fresh:
            raise NvmlCallError("not_found", "no samples since the timestamp")
        return fresh

    def compute_pids(self, uuid: str) -> list[int]:
        return list(self._gpu(uuid, "compute_pids").compute_pids)

    def mig_enabled(self, uuid: str) -> bool:
        return self._gpu(uuid, "mig_enabled").mig_enabled

    def mig_layout(self, uuid: str) -> list[MigInstance]:
        gpu = self._gpu(uuid, "mig_layout")
        # As PynvmlBackend enumerates: the slot count, then five calls per instance.
        self.calls += len(gpu.instances) * 5
        return list(gpu.instances)

    def instance_pids(self, instance_uuid: str) -> list[int]:
        self.calls += 1
        for gpu in self.gpus:
            for instance in gpu.instances:
                if instance.uuid == instance_uuid:
                    if gpu.lost:
                        raise NvmlCallError("lost", "GPU is lost")
                    if "instance_pids" in gpu.failing:
                        raise NvmlCallError(gpu.failing["instance_pids"],
                                            "injected instance_pids failure")
                    return list(instance.pids)
        raise NvmlCallError("not_found", f"no MIG device {instance_uuid}")
