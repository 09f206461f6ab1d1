"""A stand-in for the ``amdsmi`` module: the functions, return shapes and exception classes
of amdsmi 7.0.2's Python interface that ``kwatt.sources.amdsmi.AmdSmiBackend`` calls,
over scripted GPUs. What is tested is our code's use of the library; the real library is
exercised on AMD machines by scripts/gpu-check.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any

STATUS_NOT_SUPPORTED = 2
STATUS_IO = 12  # what a GPU that fell off the bus answers


class AmdSmiException(Exception):
    pass


class AmdSmiLibraryException(AmdSmiException):
    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code

    def get_error_code(self) -> int:
        return self.code


@dataclass
class FakePartition:
    bdf: str
    partition_id: int = 0
    render: int = 128
    gfx_activity: int = 0  # percent
    processes: dict[int, int] = field(default_factory=dict)  # pid -> cumulative GFX ns


@dataclass
class FakeAmdGpu:
    uuid: str
    partitions: list[FakePartition]
    energy: int = 0  # accumulator counts
    resolution: float = 0.5  # µJ per count
    power_w: float = 300.0
    power_limit_w: float = 750.0
    mode: str = "SPX"
    market_name: str = "AMD Instinct MI300X"
    lost: bool = False


@dataclass(frozen=True)
class Handle:
    gpu: FakeAmdGpu
    partition: FakePartition


class FakeAmdSmi(types.SimpleNamespace):
    """``AmdSmiBackend(library=FakeAmdSmi([...]))``; ``calls`` counts every call."""

    AmdSmiException = AmdSmiException
    AmdSmiLibraryException = AmdSmiLibraryException
    AmdSmiInitFlags = types.SimpleNamespace(INIT_AMD_GPUS=2)

    def __init__(self, gpus: list[FakeAmdGpu], available: bool = True) -> None:
        super().__init__()
        self.gpus = gpus
        self.available = available
        self.calls = 0

    def _check(self, handle: Handle) -> Handle:
        self.calls += 1
        if handle.gpu.lost:
            raise AmdSmiLibraryException(STATUS_IO)
        return handle

    def amdsmi_init(self, flags: int) -> None:
        if not self.available:
            raise AmdSmiLibraryException(18)  # AMDSMI_STATUS_INIT_ERROR

    def amdsmi_get_processor_handles(self) -> list[Handle]:
        self.calls += 1
        return [Handle(g, p) for g in self.gpus if not g.lost for p in g.partitions]

    def amdsmi_get_gpu_device_bdf(self, h: Handle) -> str:
        return self._check(h).partition.bdf

    def amdsmi_get_gpu_kfd_info(self, h: Handle) -> dict[str, Any]:
        part = self._check(h).partition
        return {"kfd_id": 1, "node_id": 2, "current_partition_id": part.partition_id}

    def amdsmi_get_gpu_enumeration_info(self, h: Handle) -> dict[str, Any]:
        part = self._check(h).partition
        return {"drm_render": part.render, "drm_card": part.render - 128}

    def amdsmi_get_gpu_device_uuid(self, h: Handle) -> str:
        handle = self._check(h)
        return handle.gpu.uuid if handle.partition.partition_id == 0 \
            else f"{handle.gpu.uuid}-p{handle.partition.partition_id}"

    def amdsmi_get_gpu_driver_info(self, h: Handle) -> dict[str, str]:
        self._check(h)
        return {"driver_name": "amdgpu", "driver_version": "6.10.5", "driver_date": "N/A"}

    def amdsmi_get_gpu_asic_info(self, h: Handle) -> dict[str, Any]:
        return {"market_name": self._check(h).gpu.market_name}

    def amdsmi_get_energy_count(self, h: Handle) -> dict[str, Any]:
        gpu = self._check(h).gpu
        return {"energy_accumulator": gpu.energy, "counter_resolution": gpu.resolution,
                "timestamp": 0}

    def amdsmi_get_power_info(self, h: Handle) -> dict[str, Any]:
        gpu = self._check(h).gpu
        return {"socket_power": gpu.power_w, "current_socket_power": gpu.power_w,
                "average_socket_power": "N/A", "gfx_voltage": "N/A", "soc_voltage": "N/A",
                "mem_voltage": "N/A", "power_limit": gpu.power_limit_w}

    def amdsmi_get_gpu_activity(self, h: Handle) -> dict[str, Any]:
        return {"gfx_activity": self._check(h).partition.gfx_activity, "umc_activity": 0,
                "mm_activity": "N/A"}

    def amdsmi_get_gpu_process_list(self, h: Handle) -> list[dict[str, Any]]:
        part = self._check(h).partition
        return [{"name": "python", "pid": pid, "mem": 0,
                 "engine_usage": {"gfx": ns, "enc": 0},
                 "memory_usage": {"gtt_mem": 0, "cpu_mem": 0, "vram_mem": 0},
                 "cu_occupancy": "N/A"} for pid, ns in part.processes.items()]

    def amdsmi_get_gpu_compute_partition(self, h: Handle) -> str:
        return self._check(h).gpu.mode
