"""The polling thread every slow meter runs: poll, back off on failure, stop on request.

A meter subclasses ``PollingLoop`` and implements ``poll_once`` (True when the poll read
everything). The loop sleeps the interval, or backs off with jitter after failures
(kwatt.backoff), and a bug in one poll is logged and counted as a failure instead of
ending the thread for the life of the process.
"""

from __future__ import annotations

import logging
import random
import threading

from kwatt.backoff import next_delay

# A request in flight ends within its own timeout; shutdown does not wait for it.
CLOSE_JOIN_SECONDS = 0.5


class PollingLoop:
    def __init__(self, name: str, interval_seconds: float, backoff_max_seconds: float,
                 rng: random.Random, logger: logging.Logger) -> None:
        self._poll_name = name
        self._poll_interval = interval_seconds
        self._poll_backoff_max = backoff_max_seconds
        self._rng = rng
        self._poll_log = logger
        self._failures = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def poll_once(self) -> bool:
        raise NotImplementedError

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=f"kwatt-{self._poll_name}",
                                            daemon=True)
            self._thread.start()

    def close(self) -> None:
        self._stop.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=CLOSE_JOIN_SECONDS)

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def next_delay(self) -> float:
        """Seconds until the next poll: the interval, or backoff with jitter."""
        return next_delay(self._poll_interval, self._failures, self._poll_backoff_max,
                          self._rng)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll_once()
            except Exception:  # a bug must not end the polling for the process' life
                self._poll_log.exception("%s poll failed unexpectedly", self._poll_name)
                self._failures += 1
            if self._stop.wait(self.next_delay()):
                return
