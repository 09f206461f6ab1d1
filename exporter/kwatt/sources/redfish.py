"""Whole-chassis power and energy from a Redfish BMC, polled on its own thread.

A BMC answers in hundreds of milliseconds to seconds, sometimes not at all, so the meter
polls on its own thread and cadence (default 30 s) and ``latest`` only copies what the last
poll left under a lock that is never held across I/O.

What is read (property shapes from DMTF's schemas and public mockups, see docs/redfish.md):

- ``/redfish/v1/Chassis``: the chassis collection; a chassis whose ``Links.ContainedBy``
  is absent is a top-level (whole-server) chassis, the rest are parts of one and would
  count their power twice.
- ``Chassis/<id>/EnvironmentMetrics`` (EnvironmentMetrics 1.x): ``PowerWatts.Reading``
  (a SensorPowerExcerpt) and ``EnergykWh.Reading`` (a SensorEnergykWhExcerpt), or where
  only that is reported ``EnergyJoules.Reading`` (a SensorExcerpt, the device-level one).
- where that resource is missing, the older ``Chassis/<id>/Power`` (Power 1.x):
  ``PowerControl[0].PowerConsumedWatts``.

``EnergykWh`` is a counter; its differences pass ``kwatt.counters.checked_step`` before they
count, and the sample's ``energy_joules`` is a counter that only ever advances by accepted
steps. Every failure is a ``Fault`` (source ``redfish``) and the next poll is delayed by an
exponential backoff with jitter, so a struggling BMC is not hammered.
"""

from __future__ import annotations

import base64
import http.client
import json
import logging
import random
import ssl
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from kwatt.config import Config
from kwatt.counters import CounterLimits, ceiling_from_limits, checked_step
from kwatt.faults import Fault, reason_for_oserror
from kwatt.logs import RateLimitedLog
from kwatt.sources.meter import MeterSample
from kwatt.sources.polling import PollingLoop

SOURCE = "redfish"
log = logging.getLogger("kwatt.redfish")

# A whole server chassis: an 8-GPU HGX/DGX box is specified at 10-15 kW; 30 kW leaves a
# wide margin and still stops a misparsed or reset EnergykWh register (a step of thousands
# of kWh) from being booked. A chassis that states its capacity (PowerControl's
# PowerCapacityWatts, EnvironmentMetrics' PowerLimitWatts.AllowableMax) gets twice that,
# never more than this bound (kwatt.counters.ceiling_from_limits).
CHASSIS_CEILING_WATTS = 30_000.0
# EnergykWh is a decimal kWh reading; it is kept as an integer count of milliwatt-hours
# (3.6 J each) so the counter rule works on exact integers. No BMC reports finer.
_MWH_JOULES = 3.6
_KWH_TO_MWH = 1_000_000
# A Redfish resource of a real BMC is a few KiB; anything past this is not one.
MAX_REPLY_BYTES = 1024 * 1024
# Faults kept for the next latest(); a consumer that stopped asking must not grow memory.
MAX_PENDING_FAULTS = 256


class RedfishError(Exception):
    """One failed request, with the fault reason it maps to."""

    def __init__(self, reason: str, detail: str, not_found: bool = False) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.not_found = not_found  # HTTP 404: the BMC answered, the resource is gone


@dataclass(frozen=True)
class RedfishSettings:
    """Where and how to reach one BMC.

    ``base_url``: https://host[:port] of the BMC (a path prefix before /redfish is kept).
    ``username_file`` / ``password_file``: files holding the credentials (a mounted
    Secret); re-read on every poll so a rotated Secret takes effect without a restart.
    ``ca_file``: the CA bundle that signs the BMC's certificate; empty: the system store.
    ``insecure_skip_verify``: no certificate or host name check at all (logged loudly).
    ``chassis``: chassis ids to read; empty: every top-level chassis.
    """

    base_url: str
    username_file: str
    password_file: str
    ca_file: str = ""
    insecure_skip_verify: bool = False
    interval_seconds: float = 30.0
    timeout_seconds: float = 10.0
    backoff_max_seconds: float = 300.0
    chassis: tuple[str, ...] = ()


@dataclass
class _Chassis:
    """What the meter knows of one chassis between polls."""

    chassis_id: str
    path: str
    use_environment_metrics: bool = True
    ceiling_watts: float = CHASSIS_CEILING_WATTS
    energy_mwh: int | None = None  # the baseline reading of the EnergykWh counter
    energy_read_at: float | None = None
    energy_total_joules: float | None = None
    generation: int = 0


def ssl_context_for(settings: RedfishSettings) -> ssl.SSLContext:
    """Verification on, against ``ca_file`` if given; off only when explicitly asked."""
    if settings.insecure_skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    return ssl.create_default_context(cafile=settings.ca_file or None)


def _read_secret(path: str, what: str) -> str:
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(4096).strip()
    except OSError as exc:
        raise RedfishError(reason_for_oserror(exc),
                           f"cannot read the {what} file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise RedfishError("parse", f"the {what} file {path} is not UTF-8") from None
    if not text:
        raise RedfishError("parse", f"the {what} file {path} is empty")
    return text


class RedfishClient:
    """GET one Redfish resource as JSON over HTTPS with basic auth.

    Basic auth on every request, no Redfish session: a session is state on the BMC (which
    allows only a few), and one left behind by a restarted exporter would linger until the
    BMC times it out. One connection per request: BMCs close idle connections early and
    unpredictably, and one poll makes only one or two requests.
    """

    def __init__(self, settings: RedfishSettings,
                 context: ssl.SSLContext | None = None) -> None:
        parts = urlsplit(settings.base_url)
        if parts.scheme != "https" or not parts.hostname:
            raise ValueError(f"expected an https:// URL, got {settings.base_url!r}")
        self._host = parts.hostname
        self._port = parts.port or 443
        self._prefix = parts.path.rstrip("/")
        self._settings = settings
        self._context = context or ssl_context_for(settings)

    @property
    def where(self) -> str:
        return f"{self._host}:{self._port}"

    def get(self, path: str) -> dict[str, Any]:
        username = _read_secret(self._settings.username_file, "username")
        password = _read_secret(self._settings.password_file, "password")
        token = base64.b64encode(f"{username}:{password}".encode()).decode("ascii")
        connection = http.client.HTTPSConnection(
            self._host, self._port, timeout=self._settings.timeout_seconds,
            context=self._context)
        try:
            connection.request("GET", self._prefix + path, headers={
                "Authorization": f"Basic {token}", "Accept": "application/json",
                "OData-Version": "4.0"})
            response = connection.getresponse()
            body = response.read(MAX_REPLY_BYTES + 1)
            status = response.status
        except ssl.SSLError as exc:
            raise RedfishError("api", f"TLS: {exc.reason or exc}") from None
        except TimeoutError:
            raise RedfishError("timeout", f"no reply within "
                                          f"{self._settings.timeout_seconds:g} s") from None
        except ConnectionRefusedError:
            raise RedfishError("absent", "connection refused") from None
        except OSError as exc:
            reason = reason_for_oserror(exc)
            raise RedfishError(reason, f"{type(exc).__name__}: {exc}") from None
        except http.client.HTTPException as exc:
            raise RedfishError("api", f"bad HTTP reply: {type(exc).__name__}") from None
        finally:
            connection.close()
        if status in (401, 403):
            raise RedfishError("permission", f"HTTP {status} for {path}")
        if status == 404:
            raise RedfishError("absent", f"HTTP 404 for {path}", not_found=True)
        if status != 200:
            raise RedfishError("api", f"HTTP {status} for {path}")
        if len(body) > MAX_REPLY_BYTES:
            raise RedfishError("parse", f"{path}: reply larger than {MAX_REPLY_BYTES} bytes")
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, ValueError) as exc:
            raise RedfishError("parse", f"{path}: malformed JSON ({exc})") from None
        if not isinstance(data, dict):
            raise RedfishError("parse", f"{path}: expected a JSON object")
        return data


def _number(value: object) -> float | None:
    """A JSON reading as float; null, missing, booleans and non-finite values are None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    number = float(value)
    if number != number or number in (float("inf"), float("-inf")):
        return None
    return number


def _excerpt_reading(resource: dict[str, Any], name: str) -> float | None:
    excerpt = resource.get(name)
    if not isinstance(excerpt, dict):
        return None
    return _number(excerpt.get("Reading"))


def _member_paths(collection: dict[str, Any]) -> list[str]:
    members = collection.get("Members")
    if not isinstance(members, list):
        raise RedfishError("parse", "Chassis collection without a Members list")
    paths = []
    for member in members:
        if isinstance(member, dict) and isinstance(member.get("@odata.id"), str):
            paths.append(member["@odata.id"])
    return paths


class RedfishMeter(PollingLoop):
    """A PlatformMeter (source ``redfish``) reading one BMC.

    ``poll_once`` does one poll on the calling thread; ``start`` runs it on a daemon
    thread every ``interval_seconds`` (longer after failures). ``clock`` is monotonic
    seconds; ``rng`` draws the backoff jitter.
    """

    source = SOURCE

    def __init__(self, settings: RedfishSettings, client: RedfishClient | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 ratelimited: RateLimitedLog | None = None) -> None:
        super().__init__("redfish", settings.interval_seconds,
                         settings.backoff_max_seconds, rng or random.Random(), log)
        self._settings = settings
        self._client = client or RedfishClient(settings)
        self._clock = clock
        self._ratelimited = ratelimited or RateLimitedLog(log)
        self._chassis: dict[str, _Chassis] | None = None  # None: discover at next poll
        self._known_chassis: dict[str, _Chassis] = {}
        self._lock = threading.Lock()
        self._samples: dict[str, MeterSample] = {}
        self._faults: list[Fault] = []
        self._ratelimited_keys: set[str] = set()  # conditions logged since the last success
        if settings.insecure_skip_verify:
            log.warning("Redfish TLS verification is OFF: the BMC's identity is not checked "
                        "and its credentials can be taken by anyone on the path",
                        extra={"bmc": self._client.where})

    # --------------------------------------------------------------- the PlatformMeter face

    def latest(self) -> tuple[Sequence[MeterSample], Sequence[Fault]]:
        with self._lock:
            faults, self._faults = self._faults, []
            return list(self._samples.values()), faults

    def poll_once(self) -> bool:
        """One poll of every chassis; True when every chassis was read."""
        faults: list[Fault] = []
        fresh: list[MeterSample] = []
        try:
            chassis = self._discover()
        except RedfishError as exc:
            faults.append(self._fault(exc, "Chassis"))
            chassis = {}
        for entry in chassis.values():
            try:
                sample, step_fault = self._read(entry)
            except RedfishError as exc:
                faults.append(self._fault(exc, entry.chassis_id))
                if exc.not_found:
                    self._chassis = None  # the chassis may have been renamed: rediscover
                continue
            fresh.append(sample)
            if step_fault is not None:
                faults.append(step_fault)
        ok = not faults or all(f.reason == "implausible" for f in faults)
        ok = ok and bool(chassis)
        if ok:
            if self._failures:
                log.info("Redfish BMC answers again", extra={"bmc": self._client.where,
                                                             "failed_polls": self._failures})
            self._failures = 0
            for key in self._ratelimited_keys:
                self._ratelimited.forget(key)
            self._ratelimited_keys.clear()
        else:
            self._failures += 1
        with self._lock:
            for sample in fresh:
                self._samples[sample.sensor] = sample
            self._faults.extend(faults)
            del self._faults[:-MAX_PENDING_FAULTS]
        return ok

    def _fault(self, exc: RedfishError, subject: str) -> Fault:
        key = f"{exc.reason}:{subject}"
        self._ratelimited_keys.add(key)
        self._ratelimited.log(logging.WARNING, key, "Redfish read failed",
                              bmc=self._client.where, subject=subject, reason=exc.reason,
                              detail=exc.detail)
        return Fault(SOURCE, exc.reason, subject, exc.detail)

    def _discover(self) -> dict[str, _Chassis]:
        if self._chassis is not None:
            return self._chassis
        # Known chassis keep their counter baseline and generation across rediscovery.
        known = self._known_chassis
        found: dict[str, _Chassis] = {}
        for path in _member_paths(self._client.get("/redfish/v1/Chassis")):
            chassis_id = path.rstrip("/").rsplit("/", 1)[-1]
            if self._settings.chassis:
                if chassis_id in self._settings.chassis:
                    found[chassis_id] = known.get(chassis_id) or _Chassis(
                        chassis_id, path.rstrip("/"))
                continue
            resource = self._client.get(path)
            links = resource.get("Links")
            contained = isinstance(links, dict) and bool(links.get("ContainedBy"))
            if not contained:
                found[chassis_id] = known.get(chassis_id) or _Chassis(
                    chassis_id, path.rstrip("/"))
        if self._settings.chassis:
            missing = sorted(set(self._settings.chassis) - set(found))
            if missing:
                raise RedfishError("absent", f"configured chassis {', '.join(missing)} not "
                                             "in the BMC's Chassis collection")
        if not found:
            raise RedfishError("absent", "no top-level chassis in the Chassis collection")
        self._chassis = found
        known.update(found)
        return found

    def _read(self, entry: _Chassis) -> tuple[MeterSample, Fault | None]:
        watts: float | None
        energy_kwh: float | None = None
        if entry.use_environment_metrics:
            try:
                metrics = self._client.get(entry.path + "/EnvironmentMetrics")
            except RedfishError as exc:
                if not exc.not_found:
                    raise
                entry.use_environment_metrics = False
            else:
                watts = _excerpt_reading(metrics, "PowerWatts")
                energy_kwh = _excerpt_reading(metrics, "EnergykWh")
                if energy_kwh is None:
                    # The schema's device-level counter, for BMCs that report only it.
                    joules = _excerpt_reading(metrics, "EnergyJoules")
                    energy_kwh = None if joules is None else joules / 3.6e6
                limit = metrics.get("PowerLimitWatts")
                if isinstance(limit, dict):
                    capacity = _number(limit.get("AllowableMax"))
                    if capacity is not None:
                        entry.ceiling_watts = ceiling_from_limits([capacity],
                                                                  CHASSIS_CEILING_WATTS)
                if watts is None and energy_kwh is None:
                    entry.use_environment_metrics = False
        if not entry.use_environment_metrics:
            watts = self._legacy_power(entry)
        read_at = self._clock()
        step_fault = None
        if energy_kwh is not None:
            step_fault = self._book_energy(entry, energy_kwh, read_at)
        if watts is None and entry.energy_total_joules is None:
            raise RedfishError("parse", f"{entry.path}: neither PowerWatts nor EnergykWh "
                                        "nor PowerControl PowerConsumedWatts has a reading")
        if watts is not None and not 0 <= watts <= entry.ceiling_watts:
            step_fault = Fault(SOURCE, "implausible", entry.chassis_id,
                               f"power reading {watts:g} W outside 0..{entry.ceiling_watts:g}")
            watts = None
        entry.generation += 1
        return MeterSample(SOURCE, entry.chassis_id, read_at, watts,
                           entry.energy_total_joules, entry.generation), step_fault

    def _legacy_power(self, entry: _Chassis) -> float | None:
        power = self._client.get(entry.path + "/Power")
        controls = power.get("PowerControl")
        if not isinstance(controls, list) or not controls:
            raise RedfishError("parse", f"{entry.path}/Power: no PowerControl")
        # The first PowerControl is the chassis input ("System Input Power" in DMTF's
        # mockups and on the BMCs documented there); later ones may be subsets of it.
        first = controls[0]
        if not isinstance(first, dict):
            raise RedfishError("parse", f"{entry.path}/Power: PowerControl[0] is not an "
                                        "object")
        capacity = _number(first.get("PowerCapacityWatts"))
        if capacity is not None:
            entry.ceiling_watts = ceiling_from_limits([capacity], CHASSIS_CEILING_WATTS)
        return _number(first.get("PowerConsumedWatts"))

    def _book_energy(self, entry: _Chassis, energy_kwh: float,
                     read_at: float) -> Fault | None:
        if energy_kwh < 0:
            return Fault(SOURCE, "implausible", entry.chassis_id,
                         f"EnergykWh reading {energy_kwh:g} is negative")
        current = round(energy_kwh * _KWH_TO_MWH)
        previous = entry.energy_mwh
        if previous is None or entry.energy_read_at is None:
            entry.energy_mwh, entry.energy_read_at = current, read_at
            entry.energy_total_joules = current * _MWH_JOULES
            return None
        if current == previous:
            # The register moves in coarse steps (0.01 kWh or 1 kWh on some BMCs): keep the
            # baseline and its time, so the step is judged over the time it took.
            return None
        limits = CounterLimits(unit_joules=_MWH_JOULES, ceiling_watts=entry.ceiling_watts)
        step, ceiling = checked_step(previous, current, read_at - entry.energy_read_at,
                                     limits, lambda: entry.ceiling_watts)
        entry.ceiling_watts = ceiling
        entry.energy_mwh, entry.energy_read_at = current, read_at
        if step.joules is None:
            return Fault(SOURCE, "implausible", entry.chassis_id,
                         f"EnergykWh: {step.problem or 'step not booked'}")
        assert entry.energy_total_joules is not None
        entry.energy_total_joules += step.joules
        return None


def redfish_settings(config: Config) -> RedfishSettings | None:
    """The BMC of this node from config, or None when Redfish is not configured for it."""
    url = dict(config.redfish_urls).get(config.node_name, "")
    if not url and config.redfish_url:
        url = config.redfish_url.replace("{node}", config.node_name)
    if not url:
        return None
    return RedfishSettings(
        base_url=url, username_file=config.redfish_username_file,
        password_file=config.redfish_password_file, ca_file=config.redfish_ca_file,
        insecure_skip_verify=config.redfish_insecure_skip_verify,
        interval_seconds=config.redfish_interval_seconds,
        timeout_seconds=config.redfish_timeout_seconds,
        backoff_max_seconds=config.redfish_backoff_max_seconds,
        chassis=config.redfish_chassis)


def build_redfish_meter(config: Config, start: bool = True) -> RedfishMeter | None:
    """A started meter for this node's BMC, or None when none is configured for it."""
    settings = redfish_settings(config)
    if settings is None:
        return None
    meter = RedfishMeter(settings)
    if start:
        meter.start()
    return meter
