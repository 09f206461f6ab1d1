"""GPU readings on their own thread, so a slow or hung driver never holds up the sampler.

On real MIG GPUs one NVML call can take tens of milliseconds and a wedged driver can block a
call for good. The sampler asks for a reading at the start of the GPU stage and waits a
short, bounded time for it (``wait_seconds``); a reading that takes longer is picked up by
a later cycle, whole, so no energy is lost and CPU sampling keeps its cadence. A request
that arrives while the previous reading still runs is an overrun: counted, and coalesced
with the next one, so the GPU thread runs back to back at its own pace.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace

from kwatt.sources.gpu import CombinedReader, GpuReader, GpuReading
from kwatt.sources.gpu import GpuCycle as NvmlCycle

log = logging.getLogger("kwatt.gpu")


class GpuPoller:
    """One reader, one thread (started on the first request), readings handed over once."""

    def __init__(self, reader: GpuReader | CombinedReader, budget_seconds: float | None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._reader = reader
        self._budget = budget_seconds
        self._clock = clock
        self._cond = threading.Condition()
        self._pending: bool | None = None  # want_pids of the request not yet started
        self._busy_since: float | None = None
        self._results: list[NvmlCycle] = []
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.overruns = 0
        self.completed = 0  # readings finished
        self.last_seconds: float | None = None

    def request(self, want_pids: bool) -> bool:
        """Ask for a reading; False (an overrun) when the previous one has not finished."""
        with self._cond:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="kwatt-gpu",
                                                daemon=True)
                self._thread.start()
            overrun = self._busy_since is not None or self._pending is not None
            if overrun:
                self.overruns += 1
            self._pending = want_pids or bool(self._pending)
            self._cond.notify_all()
            return not overrun

    def take(self, wait_seconds: float) -> list[NvmlCycle]:
        """Readings finished since the last take, oldest first; when there is none yet,
        wait up to ``wait_seconds`` for one."""
        with self._cond:
            if not self._results and wait_seconds > 0:
                self._cond.wait_for(lambda: bool(self._results), timeout=wait_seconds)
            out, self._results = self._results, []
            return out

    def busy_seconds(self) -> float:
        """How long the reading in progress has run (0 when idle)."""
        with self._cond:
            since = self._busy_since
        return 0.0 if since is None else max(self._clock() - since, 0.0)

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._pending is not None or self._stopping)
                if self._stopping:
                    return
                want_pids = bool(self._pending)
                self._pending = None
                self._busy_since = self._clock()
            cycle: NvmlCycle | None = None
            try:
                cycle = self._reader.read(want_pids, self._budget)
            except Exception:  # a bug must not end GPU reading for the process's life
                log.exception("GPU reading failed")
            with self._cond:
                if self._busy_since is not None:
                    self.last_seconds = self._clock() - self._busy_since
                self._busy_since = None
                if cycle is not None:
                    self._results.append(cycle)
                    self.completed += 1
                self._cond.notify_all()


def merge_cycles(cycles: Sequence[NvmlCycle]) -> NvmlCycle:
    """Several readings taken since the last cycle as one: each GPU's joules and interval
    add up (nothing booked twice or lost); everything else is the latest reading's."""
    if len(cycles) == 1:
        return cycles[0]
    merged: dict[str, GpuReading] = {}
    for cycle in cycles:
        for gpu in cycle.gpus:
            previous = merged.get(gpu.uuid)
            if previous is None or previous.joules is None or not gpu.up:
                merged[gpu.uuid] = gpu
                continue
            joules, dt = previous.joules, previous.dt
            if gpu.joules is not None and gpu.dt is not None and dt is not None:
                joules, dt = joules + gpu.joules, dt + gpu.dt
            merged[gpu.uuid] = replace(
                gpu, joules=joules, dt=dt,
                read_at=gpu.read_at if gpu.read_at is not None else previous.read_at,
                counter_mj=gpu.counter_mj if gpu.counter_mj is not None
                else previous.counter_mj,
                process_samples=previous.process_samples + gpu.process_samples)
    last = cycles[-1]
    return NvmlCycle(tuple(sorted(merged.values(), key=lambda g: g.index)),
                     tuple(f for c in cycles for f in c.faults),
                     sum(c.calls for c in cycles), last.deferred,
                     max(c.seconds for c in cycles))
