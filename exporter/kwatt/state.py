"""The restart state file: the raw counters of one sample, so a restart loses no energy.

A new process seeds its "previous" readings from the file, and its first sample books the
energy of the whole gap from the counter deltas. This module only encodes, decodes,
checks and writes the file; what goes into it and when is ``kwatt.statekeeper``'s job.

The file is JSON (``{"kwatt_state": 1, ...}``), written to a temporary file, fsynced and
renamed over the old one, so a reader sees the old file or the new, never a torn one.
Everything read back is checked: size, version, every type; a file that fails is ignored
with its reason, never trusted in part.
"""

from __future__ import annotations

import errno
import json
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

VERSION = 1
# 1,000 cgroups take about 200 KB; ten times the chart's container limit still fits.
MAX_BYTES = 32 * 1024 * 1024
# Older samples are not used: a RAPL package counter wraps every few minutes at full power
# (262 kJ at 400 W: 11 min), and two wraps in one gap cannot be told from one.
MAX_AGE_SECONDS = 300.0
# CLOCK_MONOTONIC readings of two processes: the new one may not be earlier.
_CLOCK_SLACK_SECONDS = 1.0


class StateRejected(Exception):
    """The file cannot be used; the message is the reason, for one log line."""


@dataclass(frozen=True)
class GpuCounter:
    energy_mj: int  # NVML total energy since driver load
    monotonic: float  # when it was read


@dataclass(frozen=True)
class Counters:
    """The raw counters behind one sample, as the sampler and GPU stage keep them."""

    monotonic: float  # the sample's time on CLOCK_MONOTONIC (comparable within one boot)
    cgroup_version: int  # 0: no cgroup hierarchy
    host_units: bool  # systemd units and Docker containers were workloads
    node_busy_ticks: int | None = None
    node_idle_ticks: int | None = None
    rapl_uj: Mapping[str, int] = field(default_factory=dict)  # zone sysfs index -> energy_uj
    gpu: Mapping[str, GpuCounter] = field(default_factory=dict)  # GPU UUID -> counter
    cgroup_usage: Mapping[str, float] = field(default_factory=dict)  # cgroup path -> CPU s


def encode(boot_id: str, counters: Counters) -> bytes:
    document = {
        "kwatt_state": VERSION,
        "boot_id": boot_id,
        "monotonic": counters.monotonic,
        "cgroup_version": counters.cgroup_version,
        "host_units": counters.host_units,
        "node_cpu": None if counters.node_busy_ticks is None
        or counters.node_idle_ticks is None
        else {"busy_ticks": counters.node_busy_ticks, "idle_ticks": counters.node_idle_ticks},
        "rapl_uj": dict(counters.rapl_uj),
        "gpu": {uuid: {"energy_mj": c.energy_mj, "monotonic": c.monotonic}
                for uuid, c in counters.gpu.items()},
        "cgroup_usage_seconds": dict(counters.cgroup_usage),
    }
    # ensure_ascii: a cgroup name that is not valid UTF-8 (a lone surrogate here) survives
    # as a \udcXX escape instead of failing the write.
    return json.dumps(document, ensure_ascii=True, separators=(",", ":"),
                      allow_nan=False).encode("ascii")


def _field(document: Mapping[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    value = document.get(key)
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise StateRejected(f"corrupt: {key} has type bool")
    if not isinstance(value, kind):
        raise StateRejected(f"corrupt: {key} has type {type(value).__name__}")
    return value


def _count(key: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise StateRejected(f"corrupt: {key} is not a non-negative integer")
    return value


def _seconds(key: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) \
            or not math.isfinite(value) or value < 0:
        raise StateRejected(f"corrupt: {key} is not a non-negative number")
    return float(value)


def decode(data: bytes) -> tuple[str, Counters]:
    """(boot id, counters) from the file's bytes; raises ``StateRejected`` with the reason."""
    if len(data) > MAX_BYTES:
        raise StateRejected(f"too large: {len(data)} bytes (limit {MAX_BYTES})")
    try:
        document = json.loads(data.decode("ascii"),
                              parse_constant=lambda name: _reject_constant(name))
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise StateRejected(f"corrupt: {str(exc).splitlines()[0][:120]}") from None
    if not isinstance(document, dict):
        raise StateRejected("corrupt: not a JSON object")
    version = document.get("kwatt_state")
    if version != VERSION or isinstance(version, bool):
        raise StateRejected(f"unsupported version {version!r} (this kwatt reads {VERSION})")
    boot_id = _field(document, "boot_id", str)
    if not boot_id or len(boot_id) > 64:
        raise StateRejected("corrupt: boot_id")
    monotonic = _seconds("monotonic", document.get("monotonic"))
    cgroup_version = _count("cgroup_version", document.get("cgroup_version"))
    host_units = _field(document, "host_units", bool)
    node_cpu = document.get("node_cpu")
    busy = idle = None
    if node_cpu is not None:
        if not isinstance(node_cpu, dict):
            raise StateRejected("corrupt: node_cpu")
        busy = _count("node_cpu.busy_ticks", node_cpu.get("busy_ticks"))
        idle = _count("node_cpu.idle_ticks", node_cpu.get("idle_ticks"))
    rapl = {str(k): _count(f"rapl_uj.{k}", v)
            for k, v in _field(document, "rapl_uj", dict).items()}
    gpus: dict[str, GpuCounter] = {}
    for uuid, entry in _field(document, "gpu", dict).items():
        if not isinstance(entry, dict):
            raise StateRejected(f"corrupt: gpu.{uuid}")
        gpus[uuid] = GpuCounter(_count(f"gpu.{uuid}.energy_mj", entry.get("energy_mj")),
                                _seconds(f"gpu.{uuid}.monotonic", entry.get("monotonic")))
    usage = {path: _seconds("cgroup_usage_seconds", v)
             for path, v in _field(document, "cgroup_usage_seconds", dict).items()}
    return boot_id, Counters(monotonic, cgroup_version, host_units, busy, idle, rapl, gpus,
                             usage)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a number")


def check_age(boot_id: str, counters: Counters, current_boot_id: str, now: float,
              max_age: float = MAX_AGE_SECONDS) -> None:
    """Raise ``StateRejected`` unless the counters are from this boot and recent."""
    if boot_id != current_boot_id:
        raise StateRejected(f"from another boot ({boot_id}; now {current_boot_id})")
    age = now - counters.monotonic
    if age < -_CLOCK_SLACK_SECONDS:
        raise StateRejected(f"from the future ({-age:.1f}s ahead of CLOCK_MONOTONIC)")
    if age > max_age:
        raise StateRejected(f"stale: sampled {age:.0f}s ago (limit {max_age:.0f}s)")
    for uuid, gpu in counters.gpu.items():
        if not -_CLOCK_SLACK_SECONDS <= now - gpu.monotonic <= max_age:
            raise StateRejected(f"inconsistent: {uuid} read at another time than the sample")


def read_boot_id(path: str) -> str:
    """``<procfs>/sys/kernel/random/boot_id``; raises OSError or StateRejected."""
    with open(path, "rb") as handle:
        text = handle.read(128).decode("ascii", "replace").strip()
    if not text or len(text) > 64:
        raise StateRejected(f"unusable boot id in {path}")
    return text


class StateFile:
    """The file at an injected path: bounded reads, atomic writes."""

    def __init__(self, path: str) -> None:
        self.path = path

    def read(self) -> bytes | None:
        """The file's bytes, None when it does not exist; raises OSError, StateRejected.

        Only a regular file, not through a symlink, and without blocking: a FIFO or a
        device planted at the path must not hang the start or be read forever.
        """
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise StateRejected("not a regular file (a symlink)") from None
            raise
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StateRejected("not a regular file")
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_BYTES:
                chunk = os.read(fd, min(1 << 20, MAX_BYTES + 1 - size))
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
        finally:
            os.close(fd)
        if size > MAX_BYTES:
            raise StateRejected(f"too large: over {MAX_BYTES} bytes")
        return b"".join(chunks)

    def write(self, data: bytes) -> None:
        """Temporary file, fsync, rename: the old file or the new, never half of one."""
        temporary = f"{self.path}.tmp"
        # O_NOFOLLOW: a symlink planted at the temporary name must not redirect a root
        # process's write (e.g. a state file put in a world-writable directory).
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(temporary, self.path)
