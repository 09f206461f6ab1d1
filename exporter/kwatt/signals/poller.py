"""One signal source on its own thread: fetch every period, back off on failure, and keep
the last good value until it is ``grace`` old.

The sampler thread asks ``current()`` and ``drain()`` once per cycle; both only take a lock
that a fetch never holds, so a slow or hung API cannot delay a cycle or a scrape.

Timing: after a success the next fetch is one period later. After a failure it is a backoff
that starts at ``min(10 s, period)``, doubles up to the period, and is drawn with jitter
between half and all of it (a fleet of nodes does not retry in step); a ``Retry-After``
(429, 503) is honoured up to an hour. The value is shown while it is at most ``grace``
seconds old (config makes grace at least period + timeout, so a source that keeps
answering is never withdrawn), then withdrawn and the source reported down.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kwatt.faults import Fault
from kwatt.logs import RateLimitedLog
from kwatt.signals.documents import DocumentError, SignalDocument
from kwatt.signals.fetch import FetchError

log = logging.getLogger("kwatt.signals")

BACKOFF_INITIAL_SECONDS = 10.0
MAX_PENDING_FAULTS = 1000


@dataclass(frozen=True)
class Held:
    """The last good document, when it was fetched (monotonic) and for which zone."""

    document: SignalDocument
    fetched_at: float
    zone: str


# A fetch returns the document and the zone it was fetched for (the zone may be resolved
# on the poller thread, from the node's labels).
Fetch = Callable[[], tuple[SignalDocument, str]]


class SignalPoller:
    def __init__(self, name: str, kind: str, fetch: Fetch, period_seconds: float,
                 grace_seconds: float, clock: Callable[[], float] = time.monotonic,
                 uniform: Callable[[float, float], float] = random.uniform,
                 backoff_initial_seconds: float = BACKOFF_INITIAL_SECONDS) -> None:
        self.name = name  # the `source` of kwatt_source_up: "carbon" or "price"
        self.kind = kind  # the `source` label of the signal's gauge
        self._fetch = fetch
        self._period = period_seconds
        self._grace = grace_seconds
        self._clock = clock
        self._uniform = uniform
        self._backoff_initial = min(backoff_initial_seconds, period_seconds)
        self._lock = threading.Lock()
        self._held: Held | None = None
        self._attempted = False
        self._faults: list[Fault] = []
        self._failures = 0
        self._shown = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._log = RateLimitedLog(log)
        self.fetches = 0  # attempts, for tests and benchmarks

    # -- the poller thread ------------------------------------------------------------------

    def poll_once(self) -> float:
        """One fetch; returns the seconds to wait before the next."""
        retry_after: float | None = None
        self.fetches += 1
        try:
            document, zone = self._fetch()
        except (FetchError, DocumentError) as exc:
            retry_after = exc.retry_after if isinstance(exc, FetchError) else None
            self._failed(Fault(self.name, exc.reason, self.kind, exc.detail))
        except Exception as exc:  # a bug in a parser must not end the thread
            self._failed(Fault(self.name, "api", self.kind,
                               f"{type(exc).__name__}: {str(exc)[:200]}"))
        else:
            with self._lock:
                self._held = Held(document, self._clock(), zone)
                self._attempted = True
                recovered = self._failures > 0
                self._failures = 0
            if recovered:
                self._log.forget(self.name)
                log.info("signal source answers again", extra={"source": self.name,
                                                               "kind": self.kind})
            return self._period
        wait = min(self._period, self._backoff_initial * 2 ** (self._failures - 1))
        wait = self._uniform(wait / 2, wait)
        return max(wait, retry_after or 0.0)

    def _failed(self, fault: Fault) -> None:
        with self._lock:
            self._attempted = True
            self._failures += 1
            if len(self._faults) < MAX_PENDING_FAULTS:  # bounded if nobody drains
                self._faults.append(fault)
        self._log.log(logging.WARNING, self.name, "signal fetch failed; keeping the last "
                      "value until it is older than the grace period", source=self.name,
                      kind=self.kind, reason=fault.reason, detail=fault.detail)

    def run(self) -> None:
        while not self._stop.is_set():
            wait = self.poll_once()
            self._stop.wait(wait)

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name=f"kwatt-{self.name}",
                                        daemon=True)
        self._thread.start()

    def stop(self, join_seconds: float = 0.5) -> None:
        self._stop.set()
        if self._thread is not None:  # a fetch stuck past its timeout is left behind
            self._thread.join(join_seconds)

    # -- the sampler thread -----------------------------------------------------------------

    def current(self) -> Held | None:
        """The held value while it is within the grace period, else None."""
        with self._lock:
            held = self._held
        fresh = held is not None and self._clock() - held.fetched_at <= self._grace
        if fresh != self._shown:
            self._shown = fresh
            if not fresh:
                log.warning("signal value older than the grace period: withdrawn, source "
                            "down", extra={"source": self.name, "kind": self.kind,
                                           "grace_seconds": self._grace})
        return held if fresh else None

    def drain(self) -> tuple[bool | None, list[Fault]]:
        """(up: a current value is held; None before the first fetch ended, faults)."""
        held = self.current()
        with self._lock:
            faults, self._faults = self._faults, []
            attempted = self._attempted
        return (held is not None) if attempted else None, faults
