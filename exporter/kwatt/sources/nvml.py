"""NVIDIA GPUs through NVML (nvidia-ml-py): ``PynvmlBackend`` implements ``GpuBackend``.

The reader, the interface and the reading types are vendor-neutral and live in
``kwatt.sources.gpu``; the old NVML names stay importable from here.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from kwatt.sources.gpu import (
    GPU_BOUND_WATTS,
    EnergyCounter,
    GpuBackend,
    GpuCallError,
    GpuCycle,
    GpuLibraryUnavailable,
    GpuReader,
    GpuReading,
    MigInstance,
    ProcessSample,
    load_reader,
    normalise_bus_id,
)

SOURCE = "nvml"
log = logging.getLogger("kwatt.nvml")
# The names this module had before AMD GPUs came in.
NvmlBackend = GpuBackend
NvmlCallError = GpuCallError
NvmlUnavailable = GpuLibraryUnavailable
NvmlCycle = GpuCycle

__all__ = ["GPU_BOUND_WATTS", "SOURCE", "GpuReader", "GpuReading", "MigInstance",
           "NvmlBackend", "NvmlCallError", "NvmlCycle", "NvmlUnavailable", "ProcessSample",
           "PynvmlBackend", "load_backend"]


# --------------------------------------------------------------------------- pynvml


class PynvmlBackend:
    """``GpuBackend`` over nvidia-ml-py. Handles are looked up by UUID and cached; a handle
    is dropped when its GPU is lost so that it is looked up afresh when the GPU returns."""

    source = SOURCE
    vendor = "nvidia"
    instance_activity_supported = False  # MIG instances have no utilisation in NVML
    # "NVML is thread-safe so it is safe to make simultaneous NVML calls from multiple
    # threads" (NVML API Reference, docs.nvidia.com/deploy/nvml-api); ctypes releases the
    # GIL during each call, so layouts of different GPUs are enumerated side by side.
    concurrent_calls = True

    def __init__(self) -> None:
        import pynvml

        self._nv: Any = pynvml
        self._handles: dict[str, Any] = {}

    def _error(self, exc: Exception) -> GpuCallError:
        nv = self._nv
        code = getattr(exc, "value", None)
        # NVML_SUCCESS as an error: pynvml's nvmlDeviceGetProcessUtilization raises it when
        # the size query finds no sample at all; it means "nothing since the timestamp".
        kind = {nv.NVML_SUCCESS: "not_found", nv.NVML_ERROR_GPU_IS_LOST: "lost",
                nv.NVML_ERROR_NOT_SUPPORTED: "not_supported",
                nv.NVML_ERROR_NOT_FOUND: "not_found", nv.NVML_ERROR_NO_PERMISSION: "permission",
                nv.NVML_ERROR_TIMEOUT: "timeout", nv.NVML_ERROR_INVALID_ARGUMENT: "not_found",
                }.get(code, "unknown")
        return GpuCallError(kind, str(exc))

    def _run(self, fn: Callable[..., Any], uuid: str | None, *args: Any) -> Any:
        try:
            if uuid is None:
                return fn(*args)
            handle = self._handles.get(uuid)
            if handle is None:
                handle = self._handles[uuid] = self._nv.nvmlDeviceGetHandleByUUID(uuid)
            return fn(handle, *args)
        except self._nv.NVMLError as exc:
            error = self._error(exc)
            if error.kind in ("lost", "not_found", "unknown") and uuid is not None:
                self._handles.pop(uuid, None)
            raise error from exc

    def init(self) -> None:
        try:
            self._nv.nvmlInit()
        except self._nv.NVMLError as exc:
            raise GpuLibraryUnavailable(str(exc)) from exc
        except OSError as exc:
            raise GpuLibraryUnavailable(str(exc)) from exc

    def driver_version(self) -> str:
        return str(self._run(self._nv.nvmlSystemGetDriverVersion, None))

    def device_uuids(self) -> list[str]:
        nv = self._nv

        def each() -> list[str]:
            out = []
            for i in range(nv.nvmlDeviceGetCount()):
                handle = nv.nvmlDeviceGetHandleByIndex(i)
                uuid = str(nv.nvmlDeviceGetUUID(handle))
                self._handles[uuid] = handle
                out.append(uuid)
            return out
        return list(self._run(each, None))

    def name(self, uuid: str) -> str:
        return str(self._run(self._nv.nvmlDeviceGetName, uuid))

    def index(self, uuid: str) -> int:
        return int(self._run(self._nv.nvmlDeviceGetIndex, uuid))

    def energy_counter(self, uuid: str) -> EnergyCounter:
        # mJ since the driver loaded, 64 bits: never wraps in practice.
        return EnergyCounter(
            int(self._run(self._nv.nvmlDeviceGetTotalEnergyConsumption, uuid)), 1e-3)

    def bus_id(self, uuid: str) -> str:
        info = self._run(self._nv.nvmlDeviceGetPciInfo, uuid)
        bus = info.busId
        return normalise_bus_id(bus.decode() if isinstance(bus, bytes) else str(bus))

    def instance_activity(self, instance_uuid: str) -> float | None:
        raise GpuCallError("not_supported", "NVML has no MIG instance utilisation")

    def power_mw(self, uuid: str) -> int:
        return int(self._run(self._nv.nvmlDeviceGetPowerUsage, uuid))

    def power_limit_mw(self, uuid: str) -> int:
        return int(self._run(self._nv.nvmlDeviceGetEnforcedPowerLimit, uuid))

    def utilisation_percent(self, uuid: str) -> int:
        return int(self._run(self._nv.nvmlDeviceGetUtilizationRates, uuid).gpu)

    def process_utilisation(self, uuid: str, since_us: int) -> list[ProcessSample]:
        samples = self._run(self._nv.nvmlDeviceGetProcessUtilization, uuid, since_us)
        return [ProcessSample(int(s.pid), float(s.smUtil), int(s.timeStamp)) for s in samples]

    def compute_pids(self, uuid: str) -> list[int]:
        return [int(p.pid) for p in
                self._run(self._nv.nvmlDeviceGetComputeRunningProcesses, uuid)]

    def mig_enabled(self, uuid: str) -> bool:
        current, _pending = self._run(self._nv.nvmlDeviceGetMigMode, uuid)
        return bool(current == self._nv.NVML_DEVICE_MIG_ENABLE)

    def mig_layout(self, uuid: str) -> list[MigInstance]:
        nv = self._nv

        def each(parent: Any) -> list[MigInstance]:
            out = []
            for i in range(nv.nvmlDeviceGetMaxMigDeviceCount(parent)):
                try:
                    mig = nv.nvmlDeviceGetMigDeviceHandleByIndex(parent, i)
                except nv.NVMLError as exc:
                    if getattr(exc, "value", None) == nv.NVML_ERROR_NOT_FOUND:
                        continue  # an empty slot
                    raise
                attributes = nv.nvmlDeviceGetAttributes(mig)
                name = str(nv.nvmlDeviceGetName(mig))
                instance_uuid = str(nv.nvmlDeviceGetUUID(mig))
                # Kept for instance_pids: the steady state makes one call per instance.
                self._handles[instance_uuid] = mig
                out.append(MigInstance(
                    uuid=instance_uuid,
                    gpu_instance_id=int(nv.nvmlDeviceGetGpuInstanceId(mig)),
                    slices=int(attributes.gpuInstanceSliceCount),
                    profile=_mig_profile(name)))
            return out
        return list(self._run(each, uuid))

    def instance_pids(self, instance_uuid: str) -> list[int]:
        # nvmlDeviceGetHandleByUUID accepts MIG UUIDs too, should the handle be dropped.
        return [int(p.pid) for p in self._run(
            self._nv.nvmlDeviceGetComputeRunningProcesses, instance_uuid)]


def _mig_profile(device_name: str) -> str:
    """'NVIDIA A100-SXM4-40GB MIG 3g.20gb' -> '3g.20gb'."""
    _head, sep, tail = device_name.rpartition(" MIG ")
    return tail.strip() if sep else device_name


def load_backend(factory: Callable[[], GpuBackend] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 mig_refresh_seconds: float = 60.0
                 ) -> tuple[GpuReader | None, str]:
    """A started reader, or None and a one-line reason why NVML cannot be used."""
    return load_reader(factory if factory is not None else PynvmlBackend, clock,
                       mig_refresh_seconds)
