"""The one rule every energy counter passes before its difference becomes joules.

A counter (RAPL ``energy_uj``, NVML total energy, hwmon ``energy*_input``, ...) is read once
per interval. The difference of two readings is booked only if it is plausible:

- it is monotonic: a lower reading is a wrap only when the counter has a plausible wrap
  point (``wrap_at``) and both readings lie within it; otherwise it is a reset or a glitch;
- a reading above the wrap point is impossible;
- the power it implies over the interval (``joules / dt``) is at most ``ceiling_watts``.

A wrap is the only thing a monotonic counter may do that looks like going down, so a 1 µJ
glitch or a read truncated to its first digits looks like a wrap of (nearly) the whole
range: at any sampling interval shorter than the wrap period that implies a power far above
the ceiling, and the ceiling catches it. The caller counts an implausible step as a fault
(reason ``implausible``), re-baselines on the new reading and books nothing for that
interval: the component falls back to what it would do after a failed read.

Every new counter source (hwmon ``energy*_input``, a BMC's energy register, ...) states its
``CounterLimits`` and calls ``checked_step``; nothing else turns counter readings into
joules.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

# How far a counter's own limit (a powercap constraint, an NVML power limit) may be exceeded
# over one interval before a step is implausible. Limits are averages over their own time
# windows (RAPL PL1 over ~1-28 s, PL2 over ms) and turbo may exceed them briefly, so the
# margin is wide; what it has to catch is off by orders of magnitude.
LIMIT_MARGIN = 2.0


@dataclass(frozen=True)
class CounterLimits:
    """What a plausible step of one counter looks like.

    ``unit_joules``: joules per counter unit (1e-6 for µJ, 1e-3 for mJ).
    ``wrap_at``: the value at which the counter wraps to 0, or None when it is unknown or
    the counter never wraps (then a lower reading is never booked).
    ``ceiling_watts``: the highest average power the counter can honestly show.
    """

    unit_joules: float
    ceiling_watts: float
    wrap_at: int | None = None


@dataclass(frozen=True)
class CounterStep:
    """The energy between two readings, or why there is none (``problem``)."""

    joules: float | None
    problem: str | None = None
    wrapped: bool = False
    over_ceiling: bool = False  # rejected only for the power it implies


def counter_step(previous: int, current: int, dt: float | None,
                 limits: CounterLimits) -> CounterStep:
    """Joules between two readings ``dt`` seconds apart, if the step is plausible.

    ``dt`` None or not positive: the time between the readings is unknown, so nothing can
    be checked and nothing is booked (no problem either: the caller just re-baselines).
    """
    wrap_at = limits.wrap_at
    if wrap_at is not None and current > wrap_at:
        return CounterStep(None, f"reading {current} is above the counter's wrap point "
                                 f"{wrap_at}")
    wrapped = current < previous
    if wrapped:
        if wrap_at is None or previous > wrap_at:
            return CounterStep(None, f"counter went back from {previous} to {current} and "
                                     "has no plausible wrap point")
        units = wrap_at - previous + current
    else:
        units = current - previous
    if dt is None or dt <= 0:
        return CounterStep(None)
    joules = units * limits.unit_joules
    if joules > limits.ceiling_watts * dt:
        how = "wrap" if wrapped else "jump"
        return CounterStep(None, f"{how} from {previous} to {current} implies "
                                 f"{joules / dt:.0f} W over {dt:.3g} s, above the "
                                 f"{limits.ceiling_watts:.0f} W ceiling", wrapped, True)
    return CounterStep(joules, None, wrapped)


def checked_step(previous: int, current: int, dt: float | None, limits: CounterLimits,
                 current_ceiling: Callable[[], float]) -> tuple[CounterStep, float]:
    """``counter_step``; a step rejected only for its power is judged once more against
    ``current_ceiling()``, the ceiling re-derived from the device's limits as they are now
    (an administrator may have raised a power limit since discovery). Returns the step and
    the ceiling to use from now on. Rejections are rare, so the re-read costs nothing."""
    step = counter_step(previous, current, dt, limits)
    if not step.over_ceiling:
        return step, limits.ceiling_watts
    fresh = current_ceiling()
    if fresh <= limits.ceiling_watts:
        return step, limits.ceiling_watts
    return counter_step(previous, current, dt, replace(limits, ceiling_watts=fresh)), fresh


def ceiling_from_limits(limits_watts: list[float], bound_watts: float) -> float:
    """The ceiling for a counter whose device states its own power limits (watts).

    ``LIMIT_MARGIN`` times the highest stated limit, but never above ``bound_watts`` (the
    documented generous bound for that kind of device): a limit misread as 1e12 must not
    open the door to what the ceiling is meant to stop. Without a usable limit, the bound.
    """
    usable = [w for w in limits_watts if 0 < w < bound_watts]
    if not usable:
        return bound_watts
    return min(LIMIT_MARGIN * max(usable), bound_watts)
