"""AMD GPUs (Instinct MI200/MI300, Radeon) through AMD SMI: ``AmdSmiBackend`` implements
``GpuBackend`` over the PyPI ``amdsmi`` package, which loads ROCm's ``libamd_smi.so`` at
run time (as nvidia-ml-py loads the NVIDIA driver's library).

What is read (amdsmi 7.0.2's Python interface, ``amdsmi_interface.py``; field units from
the ``amdsmi.h`` reference, rocm.docs.amd.com/projects/amdsmi):

- energy: ``amdsmi_get_energy_count(h)`` -> ``energy_accumulator`` (uint64 counts),
  ``counter_resolution`` (µJ per count), ``timestamp``. Joules = counts x resolution x 1e-6;
  the accumulator is a uint64, so it wraps at 2**64 and ``kwatt.counters`` handles that.
- power: ``amdsmi_get_power_info(h)`` -> ``current_socket_power`` (W, MI300+),
  ``average_socket_power`` (W, MI200 and earlier), ``socket_power``, ``power_limit`` (W);
  unsupported fields read ``"N/A"``.
- activity: ``amdsmi_get_gpu_activity(h)["gfx_activity"]`` (%).
- processes: ``amdsmi_get_gpu_process_list(h)`` -> per process ``pid`` and
  ``engine_usage["gfx"]``, the GFX engine time the process has used (ns, cumulative): its
  difference over the interval is the process's share of activity.
- partitions: on MI300 in CPX (or DPX/QPX) mode every compute partition (XCP) is its own
  processor handle; the physical GPU's energy and power are reported on partition 0
  ("primary partition", AMD SMI's partition documentation). ``amdsmi_get_gpu_compute_partition``
  gives the mode (SPX, DPX, QPX, CPX), ``amdsmi_get_gpu_kfd_info(h)["current_partition_id"]``
  the partition's number, ``amdsmi_get_gpu_enumeration_info(h)["drm_render"]`` its render
  node (how the AMD device plugin's ``amdgpu_xcp_N`` devices are matched).

A physical GPU is identified by the UUID of its primary partition. Partitions of one GPU
share its PCI domain:bus:device. Without ROCm, ``import amdsmi`` raises
``KeyError: 'libamd_smi.so'`` (it indexes its table of loaded libraries), not ImportError:
that, ImportError and OSError all mean "no AMD library".
"""

from __future__ import annotations

import contextlib
import importlib
import io
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kwatt.sources.gpu import (
    EnergyCounter,
    GpuCallError,
    GpuLibraryUnavailable,
    MigInstance,
    ProcessSample,
    normalise_bus_id,
)

SOURCE = "amdsmi"
ENERGY_WRAP = 2**64  # amdsmi_get_energy_count's accumulator is a uint64_t

# amdsmi_status_t values (amdsmi_wrapper.amdsmi_status_t__enumvalues).
_STATUS_KIND = {2: "not_supported", 3: "not_supported", 8: "timeout", 10: "permission",
                31: "not_found", 6: "lost", 12: "lost", 34: "lost"}


def import_amdsmi() -> Any:
    """The amdsmi module, or ``GpuLibraryUnavailable``. Its import prints to stdout when
    the library is missing; that line is kept out of the exporter's output."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            return importlib.import_module("amdsmi")
    except (ImportError, OSError, KeyError) as exc:
        raise GpuLibraryUnavailable(f"amdsmi: {type(exc).__name__}: {exc}") from exc


@dataclass
class _Partition:
    handle: Any
    bdf: str
    partition_id: int
    render_minor: int | None


class AmdSmiBackend:
    """``GpuBackend`` over amdsmi. ``library``: the amdsmi module (tests pass a stand-in);
    imported on first use otherwise."""

    source = SOURCE
    vendor = "amd"
    instance_activity_supported = True
    # amdsmi's Python layer keeps module-level state and AMD does not document concurrent
    # use of it: one call at a time.
    concurrent_calls = False

    def __init__(self, library: Any | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._lib = library if library is not None else import_amdsmi()
        self._clock = clock
        self._gpus: dict[str, list[_Partition]] = {}  # physical UUID -> partitions
        self._order: list[str] = []
        self._partitions: dict[str, _Partition] = {}  # instance id -> partition
        self._gfx: dict[tuple[str, int], tuple[int, float]] = {}  # (id, pid) -> ns, when

    # -- errors -------------------------------------------------------------------------

    def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        try:
            return fn(*args)
        except self._lib.AmdSmiLibraryException as exc:
            kind = _STATUS_KIND.get(int(exc.get_error_code()), "unknown")
            raise GpuCallError(kind, f"{getattr(fn, '__name__', 'amdsmi')}: {exc}") from exc
        except self._lib.AmdSmiException as exc:
            raise GpuCallError("unknown", f"{getattr(fn, '__name__', 'amdsmi')}: {exc}") \
                from exc

    @staticmethod
    def _number(value: Any, what: str) -> float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        raise GpuCallError("not_supported", f"{what} is {value!r}")

    def _primary(self, uuid: str) -> _Partition:
        parts = self._gpus.get(uuid)
        if not parts:
            raise GpuCallError("not_found", f"no AMD GPU {uuid}")
        return parts[0]

    # -- discovery ----------------------------------------------------------------------

    def init(self) -> None:
        try:
            self._lib.amdsmi_init(self._lib.AmdSmiInitFlags.INIT_AMD_GPUS)
        except self._lib.AmdSmiException as exc:
            raise GpuLibraryUnavailable(f"amdsmi_init: {exc}") from exc

    def _enumerate(self) -> None:
        lib = self._lib
        groups: dict[str, list[_Partition]] = {}
        for handle in self._call(lib.amdsmi_get_processor_handles):
            bdf = normalise_bus_id(str(self._call(lib.amdsmi_get_gpu_device_bdf, handle)))
            try:
                partition = self._call(lib.amdsmi_get_gpu_kfd_info, handle).get(
                    "current_partition_id")
            except GpuCallError:
                partition = None
            try:
                render = self._call(lib.amdsmi_get_gpu_enumeration_info, handle).get(
                    "drm_render")
            except GpuCallError:
                render = None
            groups.setdefault(bdf.rsplit(".", 1)[0], []).append(_Partition(
                handle, bdf, partition if isinstance(partition, int) else 0,
                render if isinstance(render, int) else None))
        self._gpus, self._order, self._partitions = {}, [], {}
        for key in sorted(groups):
            parts = sorted(groups[key], key=lambda p: (p.partition_id, p.bdf))
            uuid = str(self._call(lib.amdsmi_get_gpu_device_uuid, parts[0].handle))
            self._gpus[uuid] = parts
            self._order.append(uuid)
            for part in parts:
                self._partitions[_instance_id(part)] = part

    def driver_version(self) -> str:
        self._enumerate()
        if not self._order:
            return ""
        info = self._call(self._lib.amdsmi_get_gpu_driver_info,
                          self._primary(self._order[0]).handle)
        return str(info.get("driver_version", ""))

    def device_uuids(self) -> list[str]:
        self._enumerate()
        return list(self._order)

    def name(self, uuid: str) -> str:
        info = self._call(self._lib.amdsmi_get_gpu_asic_info, self._primary(uuid).handle)
        return str(info.get("market_name") or "AMD GPU")

    def index(self, uuid: str) -> int:
        self._primary(uuid)
        return self._order.index(uuid)

    def bus_id(self, uuid: str) -> str:
        return self._primary(uuid).bdf

    # -- readings -----------------------------------------------------------------------

    def energy_counter(self, uuid: str) -> EnergyCounter:
        reading = self._call(self._lib.amdsmi_get_energy_count, self._primary(uuid).handle)
        resolution = self._number(reading.get("counter_resolution"), "counter_resolution")
        if resolution <= 0:
            raise GpuCallError("not_supported", f"counter_resolution is {resolution}")
        return EnergyCounter(int(reading["energy_accumulator"]), resolution * 1e-6,
                             ENERGY_WRAP)

    def _power_info(self, uuid: str) -> dict[str, Any]:
        return dict(self._call(self._lib.amdsmi_get_power_info, self._primary(uuid).handle))

    def power_mw(self, uuid: str) -> int:
        info = self._power_info(uuid)
        for key in ("current_socket_power", "average_socket_power", "socket_power"):
            value = info.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) \
                    and 0 <= value < 0xFFFF:
                return int(value * 1000)
        raise GpuCallError("not_supported", "no socket power reading")

    def power_limit_mw(self, uuid: str) -> int:
        return int(self._number(self._power_info(uuid).get("power_limit"), "power_limit")
                   * 1000)

    def _activity(self, handle: Any) -> float:
        usage = self._call(self._lib.amdsmi_get_gpu_activity, handle)
        return self._number(usage.get("gfx_activity"), "gfx_activity")

    def utilisation_percent(self, uuid: str) -> int:
        return int(self._activity(self._primary(uuid).handle))

    def _processes(self, key: str, handle: Any) -> list[dict[str, Any]]:
        return list(self._call(self._lib.amdsmi_get_gpu_process_list, handle))

    def process_utilisation(self, uuid: str, since_us: int) -> list[ProcessSample]:
        """GFX share of each process since the last call, from its cumulative GFX time."""
        now = self._clock()
        out = []
        seen = set()
        for process in self._processes(uuid, self._primary(uuid).handle):
            pid = int(process["pid"])
            gfx = process.get("engine_usage", {}).get("gfx")
            if not isinstance(gfx, int):
                continue
            seen.add((uuid, pid))
            previous = self._gfx.get((uuid, pid))
            self._gfx[(uuid, pid)] = (gfx, now)
            if previous is None or gfx < previous[0] or now <= previous[1]:
                continue
            percent = min(100.0 * (gfx - previous[0]) / 1e9 / (now - previous[1]), 100.0)
            if percent > 0:
                out.append(ProcessSample(pid, percent, int(now * 1e6)))
        for key in [k for k in self._gfx if k[0] == uuid and k not in seen]:
            del self._gfx[key]
        if not out:
            raise GpuCallError("not_found", "no process used the GFX engine since last read")
        return out

    def compute_pids(self, uuid: str) -> list[int]:
        return [int(p["pid"]) for p in self._processes(uuid, self._primary(uuid).handle)]

    # -- compute partitions as instances -------------------------------------------------

    def _mode(self, uuid: str) -> str:
        return str(self._call(self._lib.amdsmi_get_gpu_compute_partition,
                              self._primary(uuid).handle)).strip().upper()

    def mig_enabled(self, uuid: str) -> bool:
        """A GPU split into compute partitions (DPX, QPX, CPX) is read per partition."""
        mode = self._mode(uuid)
        return mode not in ("", "SPX", "N/A")

    def mig_layout(self, uuid: str) -> list[MigInstance]:
        mode = self._mode(uuid)
        self._enumerate()
        parts = self._gpus.get(uuid)
        if not parts:
            raise GpuCallError("not_found", f"no AMD GPU {uuid}")
        # Partitions of one GPU are equal in size: one slice each.
        return [MigInstance(_instance_id(p), p.partition_id, 1, mode,
                            aliases=_aliases(p)) for p in parts]

    def _partition(self, instance_id: str) -> _Partition:
        part = self._partitions.get(instance_id)
        if part is None:
            raise GpuCallError("not_found", f"no AMD partition {instance_id}")
        return part

    def instance_pids(self, instance_uuid: str) -> list[int]:
        part = self._partition(instance_uuid)
        return [int(p["pid"]) for p in self._processes(instance_uuid, part.handle)]

    def instance_activity(self, instance_uuid: str) -> float | None:
        return min(max(self._activity(self._partition(instance_uuid).handle) / 100.0, 0.0),
                   1.0)


def _instance_id(part: _Partition) -> str:
    return f"{part.bdf}/xcp{part.partition_id}"


def _aliases(part: _Partition) -> tuple[str, ...]:
    """Device ids a device plugin may give this partition: the PCI address (primary) and
    its render node (``amdgpu_xcp_N`` devices resolve to one)."""
    out = []
    if part.partition_id == 0:
        out.append(part.bdf)
    if part.render_minor is not None:
        out.append(f"renderD{part.render_minor}")
    return tuple(out)
