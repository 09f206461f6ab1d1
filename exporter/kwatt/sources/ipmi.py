"""System power from the BMC in band: IPMI DCMI Get Power Reading over /dev/ipmi0.

For nodes whose BMC has no usable Redfish. DCMI's Get Power Reading (NetFn 0x2C, command
0x02, group extension 0xDC) returns the current, minimum, maximum and average system power
in watts, a timestamp, the statistics period and a "measurement active" flag; there is no
energy counter, so the platform stage integrates the power. The request goes through
python-ipmi (``pyipmi``, an optional dependency: ``pip install kwatt[ipmi]``) and its
``ipmidev`` interface, the Linux ``ipmi_devintf`` character device. A KCS BMC answers in
tens to hundreds of milliseconds, so the meter polls on its own thread like Redfish, and
``latest`` never waits for it.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from kwatt.config import Config, ConfigError
from kwatt.faults import Fault, reason_for_oserror
from kwatt.logs import RateLimitedLog
from kwatt.sources.meter import MeterSample
from kwatt.sources.polling import PollingLoop

SOURCE = "ipmi"
SENSOR = "dcmi"
log = logging.getLogger("kwatt.ipmi")

# The same bound as a Redfish chassis (kwatt.sources.redfish.CHASSIS_CEILING_WATTS).
SYSTEM_CEILING_WATTS = 30_000.0
DCMI_MODE_SYSTEM_POWER = 1  # "system power statistics" (mode 2 is the enhanced one)
MEASUREMENT_ACTIVE = 0x40  # reading_state bit 6
BMC_IPMB_ADDRESS = 0x20
MAX_PENDING_FAULTS = 256  # kept for the next latest(); bounded if nobody asks


class DcmiConnection(Protocol):
    """What the meter needs of a python-ipmi connection (``pyipmi.Ipmi``)."""

    def get_power_reading(self, mode: int, attributes: int = 0) -> Any: ...


@dataclass(frozen=True)
class IpmiSettings:
    device: str = "/dev/ipmi0"
    interval_seconds: float = 10.0
    timeout_seconds: float = 5.0
    backoff_max_seconds: float = 300.0


def open_ipmidev(settings: IpmiSettings) -> DcmiConnection:
    """A python-ipmi connection to the local BMC through ``settings.device``."""
    import pyipmi
    import pyipmi.interfaces

    interface = pyipmi.interfaces.create_interface(
        "ipmidev", port=settings.device, timeout=settings.timeout_seconds)
    connection: DcmiConnection = pyipmi.create_connection(interface)
    connection.target = pyipmi.Target(  # type: ignore[attr-defined]
        ipmb_address=BMC_IPMB_ADDRESS)
    interface.open()
    return connection


def _fault_for(exc: BaseException) -> tuple[str, str]:
    """(reason, detail) of an exception from the device or python-ipmi."""
    name = type(exc).__name__
    if isinstance(exc, OSError):
        return reason_for_oserror(exc), f"{name}: {exc.strerror or exc}"
    if name == "IpmiTimeoutError":
        return "timeout", "no reply from the BMC"
    if name == "CompletionCodeError":
        # 0xC1 "invalid command": the BMC does not implement DCMI power readings.
        return "api", f"completion code {getattr(exc, 'cc', '?')}"
    if name in ("DecodingError", "EncodingError"):
        return "parse", f"{name}: {exc}"
    return "api", f"{name}: {exc}"


class IpmiDcmiMeter(PollingLoop):
    """A PlatformMeter (source ``ipmi``, sensor ``dcmi``): power only, no energy counter.

    ``connect`` opens the connection (python-ipmi's by default); it is reopened after a
    failure, so a BMC reset or a reloaded driver is recovered from.
    """

    source = SOURCE

    def __init__(self, settings: IpmiSettings,
                 connect: Callable[[], DcmiConnection] | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 ratelimited: RateLimitedLog | None = None) -> None:
        super().__init__("ipmi", settings.interval_seconds,
                         settings.backoff_max_seconds, rng or random.Random(), log)
        self._settings = settings
        self._connect = connect or (lambda: open_ipmidev(settings))
        self._connection: DcmiConnection | None = None
        self._clock = clock
        self._ratelimited = ratelimited or RateLimitedLog(log)
        self._lock = threading.Lock()
        self._sample: MeterSample | None = None
        self._faults: list[Fault] = []
        self._generation = 0
        self._logged: set[str] = set()

    def latest(self) -> tuple[Sequence[MeterSample], Sequence[Fault]]:
        with self._lock:
            faults, self._faults = self._faults, []
            return ([self._sample] if self._sample is not None else []), faults

    def poll_once(self) -> bool:
        fault = self._read()
        with self._lock:
            if fault is not None:
                self._faults.append(fault)
                del self._faults[:-MAX_PENDING_FAULTS]
        if fault is None or fault.reason == "implausible":
            if self._failures:
                log.info("IPMI power readings are back", extra={"failed_polls": self._failures})
            self._failures = 0
            for key in self._logged:
                self._ratelimited.forget(key)
            self._logged.clear()
            return fault is None
        self._failures += 1
        key = f"{fault.reason}"
        self._logged.add(key)
        self._ratelimited.log(logging.WARNING, key, "IPMI DCMI power reading failed",
                              device=self._settings.device, reason=fault.reason,
                              detail=fault.detail)
        return False

    def _read(self) -> Fault | None:
        try:
            if self._connection is None:
                self._connection = self._connect()
            reply = self._connection.get_power_reading(DCMI_MODE_SYSTEM_POWER)
        except Exception as exc:  # every failure of the device or library is a fault
            self._connection = None
            reason, detail = _fault_for(exc)
            return Fault(SOURCE, reason, SENSOR, detail)
        read_at = self._clock()
        state = getattr(reply, "reading_state", None)
        watts = getattr(reply, "current_power", None)
        if not isinstance(state, int) or not isinstance(watts, int):
            return Fault(SOURCE, "parse", SENSOR, "reply without current_power/reading_state")
        if not state & MEASUREMENT_ACTIVE:
            return Fault(SOURCE, "absent", SENSOR, "the BMC says power measurement is not "
                                                   "active")
        if not 0 <= watts <= SYSTEM_CEILING_WATTS:
            return Fault(SOURCE, "implausible", SENSOR,
                         f"power reading {watts} W outside 0..{SYSTEM_CEILING_WATTS:g}")
        self._generation += 1
        sample = MeterSample(SOURCE, SENSOR, read_at, float(watts), None, self._generation)
        with self._lock:
            self._sample = sample
        return None


def build_ipmi_meter(config: Config, start: bool = True,
                     exists: Callable[[str], bool] = os.path.exists) -> IpmiDcmiMeter | None:
    """A started meter when ``--ipmi.device`` is set, else None. A configured device that
    is missing, or python-ipmi not installed, is a startup error naming the flag."""
    if not config.ipmi_device:
        return None
    if not exists(config.ipmi_device):
        raise ConfigError(f"--ipmi.device: {config.ipmi_device} does not exist (load the "
                          "ipmi_devintf kernel module and pass the device to the container)")
    try:
        import pyipmi  # noqa: F401
    except ImportError:
        raise ConfigError("--ipmi.device: python-ipmi is not installed (pip install "
                          "'kwatt[ipmi]')") from None
    meter = IpmiDcmiMeter(IpmiSettings(device=config.ipmi_device,
                                       interval_seconds=config.ipmi_interval_seconds))
    if start:
        meter.start()
    return meter
