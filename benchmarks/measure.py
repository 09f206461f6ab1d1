"""What the benchmarks measure the same way: this process's RSS, and a cycle profile."""

from __future__ import annotations

import cProfile
import io
import pstats
from collections.abc import Callable


def rss_mb() -> float:
    with open("/proc/self/status") as status:  # the benchmark's own memory, not an input
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def profile_cycles(cycle: Callable[[], None], cycles: int = 100, top: int = 10) -> str:
    """The functions with the most own time over ``cycles`` calls, as pstats prints them."""
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(cycles):
        cycle()
    profiler.disable()
    report = io.StringIO()
    pstats.Stats(profiler, stream=report).sort_stats("tottime").print_stats(top)
    lines = report.getvalue().splitlines()
    return "\n".join(lines[6:7 + top])
