"""Learned idle power per component: the lowest power seen while the node was nearly idle.

Only samples taken under a utilisation threshold may teach the baseline. Learning from busy
periods would make a node under steady load report all of its energy as idle (the trap of
residual-idle models). The minimum is kept over a rolling window so a baseline learned
before a hardware or firmware change ages out.
"""

from __future__ import annotations

from collections import deque


class IdleBaseline:
    def __init__(self, window_seconds: float, max_utilisation: float) -> None:
        self._window = window_seconds
        self._max_utilisation = max_utilisation
        # Monotonic deque of (time, watts): watts strictly increasing from the left, so the
        # left end is the window's minimum and each update is amortised O(1).
        self._samples: deque[tuple[float, float]] = deque()

    def observe(self, now: float, watts: float, utilisation: float) -> None:
        while self._samples and self._samples[0][0] < now - self._window:
            self._samples.popleft()
        if utilisation > self._max_utilisation or watts < 0:
            return
        while self._samples and self._samples[-1][1] >= watts:
            self._samples.pop()
        self._samples.append((now, watts))

    def watts(self) -> float | None:
        return self._samples[0][1] if self._samples else None
