"""MIG instance activity from the node-local NVIDIA dcgm-exporter, where the operator runs it.

NVML has no utilisation per MIG instance, so kwatt weighs instances by whether they run a
process (on/off). DCGM's profiling field ``DCGM_FI_PROF_GR_ENGINE_ACTIVE`` is the ratio
(0..1) of time the graphics engine of an instance was active; dcgm-exporter publishes it
per MIG instance with the labels ``UUID`` (the physical GPU's UUID), ``GPU_I_ID`` (the
GPU-instance id) and ``GPU_I_PROFILE`` (dcgm-exporter's documentation and its default
``dcp-metrics-included.csv``). This source reads that endpoint on its own thread and
period, with a bounded timeout, so a slow or absent dcgm-exporter never delays anything;
each failed fetch is a counted fault of source ``dcgm`` (``timeout``, ``api``, ``parse``)
and the instances fall back to on/off until a fetch succeeds again.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from kwatt.faults import Fault
from kwatt.text import decode_bytes

SOURCE = "dcgm"
METRIC = "DCGM_FI_PROF_GR_ENGINE_ACTIVE"
MAX_BYTES = 8 * 1024 * 1024  # a full dcgm-exporter page on 8 GPUs x 7 instances is ~1 MB
log = logging.getLogger("kwatt.dcgm")

Fetch = Callable[[str, float], bytes]


def http_fetch(url: str, timeout: float) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return bytes(response.read(MAX_BYTES + 1))


@dataclass(frozen=True)
class Activity:
    """Engine activity per (physical GPU UUID, GPU-instance id), and when it was fetched."""

    by_instance: Mapping[tuple[str, int], float]
    fetched_at: float | None


def parse_activity(text: str) -> dict[tuple[str, int], float]:
    """(UUID, GPU_I_ID) -> DCGM_FI_PROF_GR_ENGINE_ACTIVE (0..1) from an exposition page;
    series without a GPU-instance id (whole GPUs) are not instances and are skipped.
    Raises ValueError on text that is not the Prometheus format."""
    out: dict[tuple[str, int], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name != METRIC:
                continue
            uuid = sample.labels.get("UUID", "")
            gi = sample.labels.get("GPU_I_ID", "")
            if not uuid or not gi.isdigit():
                continue
            value = float(sample.value)
            if value == value:  # not NaN
                out[(uuid, int(gi))] = min(max(value, 0.0), 1.0)
    return out


class DcgmActivitySource:
    """Fetches ``url`` every ``period`` seconds on its own thread (``start``), or once per
    ``refresh`` call. ``latest`` is what the GPU stage weighs MIG instances by."""

    def __init__(self, url: str, period: float, timeout: float,
                 fetch: Fetch = http_fetch,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.url = url
        self._period = period
        self._timeout = timeout
        self._fetch = fetch
        self._clock = clock
        self._lock = threading.Lock()
        self._activity = Activity({}, None)
        self._faults: list[Fault] = []
        self._up = True
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="kwatt-dcgm", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.refresh()
            self._stop.wait(self._period)

    def refresh(self) -> None:
        """One fetch; on failure the last activity is dropped (on/off from now on) and a
        fault is queued for the next cycle."""
        try:
            body = self._fetch(self.url, self._timeout)
            if len(body) > MAX_BYTES:
                raise ValueError(f"reply larger than {MAX_BYTES} bytes")
            activity = parse_activity(decode_bytes(body))
        except TimeoutError as exc:
            self._fail("timeout", f"no reply within {self._timeout:g}s: {exc}")
        except urllib.error.URLError as exc:
            reason = "timeout" if isinstance(exc.reason, TimeoutError) else "api"
            self._fail(reason, str(exc))
        except OSError as exc:
            self._fail("api", str(exc))
        except ValueError as exc:
            self._fail("parse", str(exc))
        else:
            with self._lock:
                self._activity = Activity(activity, self._clock())
                if not self._up:
                    log.info("dcgm-exporter answers again", extra={"url": self.url})
                self._up = True

    def _fail(self, reason: str, detail: str) -> None:
        with self._lock:
            self._activity = Activity({}, None)
            self._faults.append(Fault(SOURCE, reason, self.url, detail))
            self._up = False

    def latest(self) -> Activity:
        """The last successful fetch, unless it is older than three periods."""
        with self._lock:
            activity = self._activity
        if activity.fetched_at is None or \
                self._clock() - activity.fetched_at > 3 * self._period:
            return Activity({}, None)
        return activity

    def take_faults(self) -> tuple[list[Fault], bool]:
        """Faults since the last call, and whether the last fetch succeeded."""
        with self._lock:
            faults, self._faults = self._faults, []
            return faults, self._up
