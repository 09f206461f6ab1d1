"""Restarts that lose nothing: which counters go into the state file, when, and restoring.

The file holds the counters of the last cycle whose snapshot a scrape was served, not
simply the last cycle's: energy booked after the last scrape was never seen by Prometheus,
so the next process must book it again from there. It is rewritten after a cycle when a
newer snapshot has been served since the last write, and at shutdown. Until this process
has served a scrape, the file of the process before it stays as it is, so a crash loop
before the first scrape still loses nothing (within the age bound).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from kwatt.faults import reason_for_oserror
from kwatt.gpu_stage import GpuStage
from kwatt.ledger import LedgerSnapshot
from kwatt.logs import RateLimitedLog
from kwatt.sampler import Sampler
from kwatt.state import (
    MAX_AGE_SECONDS,
    Counters,
    StateFile,
    StateRejected,
    check_age,
    decode,
    encode,
    read_boot_id,
)

log = logging.getLogger("kwatt.state")

SOURCE = "state"
_KEEP_CYCLES = 4  # recorded cycles a scrape may still be serving


class StateKeeper:
    def __init__(self, file: StateFile, boot_id_path: str, sampler: Sampler,
                 gpu: GpuStage | None = None, clock: Callable[[], float] = time.monotonic,
                 max_age: float = MAX_AGE_SECONDS) -> None:
        self._file = file
        self._boot_id_path = boot_id_path
        self._sampler = sampler
        self._gpu = gpu
        self._clock = clock
        self._max_age = max_age
        self._boot_id: str | None = None
        self._recorded: dict[int, Counters] = {}
        self._lock = threading.Lock()
        self._served = 0
        self._written = 0
        self._faultlog = RateLimitedLog(log)
        self._failing: set[str] = set()
        self.last_write_bytes = 0
        self.last_write_seconds = 0.0

    # -- start ----------------------------------------------------------------------------

    def restore(self) -> bool:
        """Seed the sampler (and GPU stage) from the file; one log line either way."""
        try:
            self._boot_id = read_boot_id(self._boot_id_path)
        except (OSError, StateRejected) as exc:
            log.warning("restart state off: cannot read the boot id", extra={
                "path": self._boot_id_path, "detail": _detail(exc)})
            return False
        path = self._file.path
        try:
            data = self._file.read()
            if data is None:
                log.info("no restart state yet; the first interval only sets the baseline",
                         extra={"state_file": path})
                return False
            boot_id, counters = decode(data)
            now = self._clock()
            check_age(boot_id, counters, self._boot_id, now, self._max_age)
            self._sampler.restore_counters(counters)
        except (OSError, StateRejected) as exc:
            log.warning("restart state ignored; the gap's energy is not booked", extra={
                "state_file": path, "reason": _detail(exc)})
            return False
        gpus = self._gpu.restore_counters(counters.gpu) if self._gpu is not None else 0
        log.info("restart state restored; the first sample books the gap", extra={
            "state_file": path, "gap_seconds": round(now - counters.monotonic, 3),
            "rapl_zones": len(counters.rapl_uj), "gpus": gpus,
            "cgroups": len(counters.cgroup_usage)})
        return True

    # -- while running --------------------------------------------------------------------

    def served(self, snapshot: LedgerSnapshot) -> None:
        """A scrape is rendering this snapshot (scrape thread; no I/O)."""
        with self._lock:
            self._served = max(self._served, snapshot.cycles)

    def cycle_done(self, snapshot: LedgerSnapshot) -> None:
        """After each cycle, in the sampler's thread: remember its counters, write the
        counters of the newest served cycle if it is newer than the file."""
        if self._boot_id is None:
            return
        counters = self._sampler.export_counters()
        if counters is None:
            return
        if self._gpu is not None:
            counters = Counters(counters.monotonic, counters.cgroup_version,
                                counters.host_units, counters.node_busy_ticks,
                                counters.node_idle_ticks, counters.rapl_uj,
                                self._gpu.export_counters(), counters.cgroup_usage)
        self._recorded[snapshot.cycles] = counters
        for old in sorted(self._recorded)[:-_KEEP_CYCLES]:
            del self._recorded[old]
        self.flush()

    def flush(self) -> None:
        """Write the newest served cycle's counters if the file is older; also at exit."""
        with self._lock:
            served = self._served
        if served <= self._written or served not in self._recorded or self._boot_id is None:
            return
        started = time.perf_counter()
        data = encode(self._boot_id, self._recorded[served])
        try:
            self._file.write(data)
        except OSError as exc:
            reason = reason_for_oserror(exc)
            self._sampler.ledger.count_error(SOURCE, reason)
            self._failing.add(reason)
            self._faultlog.log(logging.WARNING, reason,
                               "cannot write the restart state file; a restart now would "
                               "lose the gap's energy", state_file=self._file.path,
                               reason=reason, detail=_detail(exc))
            return
        if self._failing:
            for reason in self._failing:
                self._faultlog.forget(reason)
            self._failing.clear()
            log.info("restart state file written again", extra={"state_file": self._file.path})
        self._written = served
        self.last_write_bytes = len(data)
        self.last_write_seconds = time.perf_counter() - started
        for old in [c for c in self._recorded if c < served]:
            del self._recorded[old]


def _detail(exc: BaseException) -> str:
    if isinstance(exc, OSError):
        return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "")
    return str(exc)
