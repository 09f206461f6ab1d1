"""Node-wide CPU time and memory size from procfs."""

from __future__ import annotations

import os
from dataclasses import dataclass

from kwatt.faults import Fault, reason_for_oserror

SOURCE = "procfs"


@dataclass(frozen=True)
class NodeCpuTimes:
    """Cumulative node CPU time in clock ticks, from the aggregate ``cpu`` line."""

    busy_ticks: int  # user + nice + system + irq + softirq (guest is inside user)
    idle_ticks: int  # idle + iowait
    vcpus: int


def parse_proc_stat(text: str) -> NodeCpuTimes:
    """Parse /proc/stat. Steal time is neither busy nor idle for this guest, so it is left out."""
    busy = idle = None
    vcpus = 0
    for line in text.splitlines():
        if line.startswith("cpu "):
            fields = line.split()[1:]
            if len(fields) < 4:
                raise ValueError(f"cpu line has {len(fields)} fields, expected at least 4")
            values = [int(v) for v in fields[:8]] + [0] * (8 - min(len(fields), 8))
            user, nice, system, idle_t, iowait, irq, softirq, _steal = values
            if min(values) < 0:
                raise ValueError("negative tick count")
            busy = user + nice + system + irq + softirq
            idle = idle_t + iowait
        elif line.startswith("cpu") and line[3:4].isdigit():
            vcpus += 1
    if busy is None or idle is None:
        raise ValueError("no aggregate 'cpu' line")
    return NodeCpuTimes(busy, idle, max(vcpus, 1))


def read_node_cpu(procfs: str) -> tuple[NodeCpuTimes | None, Fault | None]:
    path = os.path.join(procfs, "stat")
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            return parse_proc_stat(handle.read()), None
    except OSError as exc:
        return None, Fault(SOURCE, reason_for_oserror(exc), "stat", exc.strerror or str(exc))
    except ValueError as exc:
        return None, Fault(SOURCE, "parse", "stat", str(exc))


def read_memory_bytes(procfs: str) -> tuple[int | None, Fault | None]:
    path = os.path.join(procfs, "meminfo")
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                if line.startswith("MemTotal:"):
                    parts = line.split()
                    return int(parts[1]) * 1024, None
        return None, Fault(SOURCE, "parse", "meminfo", "no MemTotal line")
    except OSError as exc:
        return None, Fault(SOURCE, reason_for_oserror(exc), "meminfo", exc.strerror or str(exc))
    except (ValueError, IndexError) as exc:
        return None, Fault(SOURCE, "parse", "meminfo", str(exc))
