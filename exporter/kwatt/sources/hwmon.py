"""hwmon power and energy channels under ``<sysfs>/class/hwmon``, read as platform meters.

What is found without configuration (``platform.hwmon.auto_detect``):

- the ACPI 4.0 ``power_meter`` driver (kernel Documentation/hwmon/acpi_power_meter.rst):
  ``power1_average`` is the meter's average power in microwatts over
  ``power1_average_interval`` (milliseconds). Depending on the kernel the attributes sit in
  the hwmon directory or in its ``device/`` directory; both are looked at. A meter whose
  ``power1_oem_info`` names nothing kwatt knows is a whole-node (platform) meter.
- NVIDIA Grace: the same ``power_meter`` driver, one hwmon device per sensor, with
  ``power1_oem_info`` naming it: ``Module Power Socket N`` (a Grace Hopper module: CPU,
  GPU, memory and regulator losses), ``Grace Power Socket N`` (the Grace CPU socket: CPU
  rail plus SysIO), ``CPU Power Socket N`` (CPU rail) and ``SysIO Power Socket N`` (SoC
  rail). Labels as read by NVIDIA DCGM's system monitor (DcgmSystemMonitor) and listed in
  the Grace Performance Tuning Guide, "Power and Thermals". Module sensors are platform
  meters; the Grace (else CPU) sensors are the component ``cpu`` on nodes without RAPL.
- AMD ``amd_energy`` (kernel Documentation/hwmon/amd_energy.rst): ``energyN_input`` in
  microjoules with ``energyN_label`` ``EcoreNNN`` per core and ``EsocketN`` per socket.
  The socket counters (which include the cores) are the component ``cpu`` on nodes
  without powercap.

Configured channels (``platform.hwmon.sensors``: ``<chip name>/<channel>``, e.g.
``ipmi_si/power1``, ``my_psu/energy1``) are platform meters; one that is not there is a
configuration error at start. Units follow Documentation/hwmon/sysfs-interface.rst: power
in microwatts, energy in microjoules.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kwatt.config import Config, ConfigError
from kwatt.faults import Fault, reason_for_oserror
from kwatt.sources.meter import MeterSample
from kwatt.text import clean_text, decode_bytes

SOURCE = "hwmon"
# Any "<part> Power Socket N" is a Grace-family sensor; parts kwatt does not know (e.g. a
# "GPU Power Socket N") are inside the module and never read as a whole-node meter.
_GRACE_LABEL = re.compile(r"^(\w+) Power Socket (\d+)$")
_CHANNEL = re.compile(r"^(power|energy)(\d+)$")
_AMD_SOCKET_LABEL = re.compile(r"^Esocket(\d+)$")


@dataclass(frozen=True)
class HwmonChannel:
    """One readable value: ``kind`` "power" (file in µW) or "energy" (file in µJ)."""

    sensor: str  # the label value: stable across restarts, short
    path: str
    kind: str


@dataclass(frozen=True)
class HwmonInventory:
    platform: tuple[HwmonChannel, ...] = ()  # whole-node (or module) meters
    cpu: tuple[HwmonChannel, ...] = ()  # CPU sockets, for nodes without RAPL
    cpu_driver: str = ""  # "grace" or "amd_energy" when ``cpu`` is not empty


def _read_text(path: str) -> str | None:
    try:
        with open(path, "rb") as handle:
            return decode_bytes(handle.read(4096)).strip()
    except OSError:
        return None


def _attribute_dir(hwmon_dir: str, attribute: str) -> str | None:
    for where in (hwmon_dir, os.path.join(hwmon_dir, "device")):
        if os.path.exists(os.path.join(where, attribute)):
            return where
    return None


def _chips(sysfs: str) -> list[tuple[str, str]]:
    """(hwmon directory, chip name) for every hwmon device, in a stable order."""
    root = os.path.join(sysfs, "class", "hwmon")
    try:
        entries = sorted(os.listdir(root), key=lambda n: (len(n), n))
    except OSError:
        return []
    out = []
    for entry in entries:
        directory = os.path.join(root, entry)
        name = _read_text(os.path.join(directory, "name"))
        if name is not None:
            out.append((directory, clean_text(name)))
    return out


def _device_id(hwmon_dir: str) -> str:
    """What the meter is attached to (an ACPI id like ACPI000D:00), stable across boots,
    unlike the hwmonN number."""
    device = os.path.join(hwmon_dir, "device")
    if os.path.islink(device):
        return clean_text(os.path.basename(os.path.realpath(device)))
    return os.path.basename(hwmon_dir)


def discover_hwmon(sysfs: str, auto_detect: bool = True,
                   configured: Sequence[str] = ()) -> HwmonInventory:
    """Find the meters; raises ``ConfigError`` naming the first configured sensor that is
    not there."""
    chips = _chips(sysfs)
    platform: list[HwmonChannel] = []
    grace_socket: dict[str, HwmonChannel] = {}
    grace_cpu_rail: dict[str, HwmonChannel] = {}
    amd: list[HwmonChannel] = []
    for directory, name in chips if auto_detect else ():
        if name == "power_meter":
            where = _attribute_dir(directory, "power1_average")
            if where is None:
                continue
            path = os.path.join(where, "power1_average")
            oem = _read_text(os.path.join(where, "power1_oem_info")) or ""
            grace = _GRACE_LABEL.match(oem)
            if grace is None:
                platform.append(HwmonChannel(f"power_meter/{_device_id(directory)}", path,
                                             "power"))
                continue
            part, socket = grace.groups()
            sensor = f"{part.lower()}_power_socket_{socket}"
            if part == "Module":
                platform.append(HwmonChannel(sensor, path, "power"))
            elif part == "Grace":
                grace_socket[socket] = HwmonChannel(sensor, path, "power")
            elif part == "CPU":
                grace_cpu_rail[socket] = HwmonChannel(sensor, path, "power")
            # SysIO is inside "Grace Power Socket", other parts inside the module: never
            # added twice.
        elif name == "amd_energy":
            for channel in _numbered(directory, "energy"):
                label = _read_text(os.path.join(directory, f"{channel}_label")) or ""
                match = _AMD_SOCKET_LABEL.match(label)
                if match is not None:
                    amd.append(HwmonChannel(f"amd_energy/socket{match.group(1)}",
                                            os.path.join(directory, f"{channel}_input"),
                                            "energy"))
    for wanted in configured:
        platform.extend(_configured(chips, wanted))
    cpu: list[HwmonChannel] = []
    driver = ""
    sockets = sorted(set(grace_socket) | set(grace_cpu_rail), key=int)
    if sockets:
        cpu = [grace_socket.get(s) or grace_cpu_rail[s] for s in sockets]
        driver = "grace"
    elif amd:
        cpu, driver = amd, "amd_energy"
    return HwmonInventory(tuple(platform), tuple(cpu), driver)


def _numbered(directory: str, kind: str) -> list[str]:
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    channels = {n.split("_", 1)[0] for n in names if n.startswith(kind) and n.endswith("_input")}
    return sorted((c for c in channels if _CHANNEL.match(c)), key=lambda c: int(c[len(kind):]))


def _configured(chips: list[tuple[str, str]], wanted: str) -> list[HwmonChannel]:
    key = "platform.hwmon.sensors"
    chip, _, channel = wanted.rpartition("/")
    match = _CHANNEL.match(channel)
    if not chip or match is None:
        raise ConfigError(f"{key}: {wanted!r} is not <chip name>/powerN or /energyN")
    kind = match.group(1)
    attributes = (f"{channel}_input",) if kind == "energy" else (
        f"{channel}_average", f"{channel}_input")
    found = []
    for directory, name in chips:
        if name != chip:
            continue
        for attribute in attributes:
            where = _attribute_dir(directory, attribute)
            if where is not None:
                found.append(HwmonChannel(f"{chip}/{channel}/{_device_id(directory)}",
                                          os.path.join(where, attribute), kind))
                break
    if not found:
        raise ConfigError(f"{key}: {wanted!r} not found: no hwmon chip named {chip!r} with "
                          f"{' or '.join(attributes)}")
    return found


class HwmonMeter:
    """A ``PlatformMeter`` over hwmon files: each ``latest()`` reads them (microseconds, so
    on the caller's thread) and stamps each value with the time it was read."""

    source = SOURCE

    def __init__(self, channels: Sequence[HwmonChannel],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.channels = tuple(channels)
        self._clock = clock
        self._generation = 0

    def latest(self) -> tuple[list[MeterSample], list[Fault]]:
        samples: list[MeterSample] = []
        faults: list[Fault] = []
        for channel in self.channels:
            try:
                with open(channel.path, "rb") as handle:
                    raw = handle.read(64)
                read_at = self._clock()
                value = int(raw.strip())
            except OSError as exc:
                faults.append(Fault(SOURCE, reason_for_oserror(exc), channel.sensor, str(exc)))
                continue
            except ValueError:
                faults.append(Fault(SOURCE, "parse", channel.sensor, f"{channel.path}: not "
                                    f"an integer: {decode_bytes(raw[:32])!r}"))
                continue
            if value < 0:
                faults.append(Fault(SOURCE, "parse", channel.sensor,
                                    f"{channel.path}: negative value {value}"))
                continue
            self._generation += 1
            if channel.kind == "power":
                samples.append(MeterSample(SOURCE, channel.sensor, read_at, value * 1e-6,
                                           None, self._generation))
            else:
                samples.append(MeterSample(SOURCE, channel.sensor, read_at, None,
                                           value * 1e-6, self._generation))
        return samples, faults

    def close(self) -> None:
        return None


def build_hwmon_meters(config: Config, clock: Callable[[], float] = time.monotonic
                       ) -> list[HwmonMeter]:
    """The platform meters found under ``config.sysfs`` (none: an empty list). Raises
    ``ConfigError`` when a configured sensor is missing."""
    inventory = discover_hwmon(config.sysfs, config.platform.hwmon_auto_detect,
                               config.platform.hwmon_sensors)
    return [HwmonMeter(inventory.platform, clock)] if inventory.platform else []


def build_hwmon_cpu_meter(config: Config, clock: Callable[[], float] = time.monotonic
                          ) -> tuple[HwmonMeter | None, str]:
    """The CPU-socket meter (Grace or amd_energy) and its driver name, or (None, "")."""
    inventory = discover_hwmon(config.sysfs, config.platform.hwmon_auto_detect)
    if not inventory.cpu:
        return None, ""
    return HwmonMeter(inventory.cpu, clock), inventory.cpu_driver
