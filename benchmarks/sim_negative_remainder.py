"""How often `other` would go negative (and is booked as 0): a simulation on the real sampler.

A node's CPU power steps at random every interval (uniform between 40 and ``PEAK`` W);
DRAM draws 20 W and the rest of the server (fans, PSU losses, NICs) a constant ``REST`` W.
RAPL reads the true energy. The ACPI power meter (hwmon ``power1_average``) reports the
average over its own window, which lags the sampler's interval by ``lag`` intervals and is
smoothed over ``window`` intervals. Prints, per scenario, the share of intervals with a
negative remainder (counted as negative_remainder, other booked 0) and how much of the
true `other` energy the clamping lost or gained over the run.

    .venv/bin/python benchmarks/sim_negative_remainder.py [intervals]
"""

from __future__ import annotations

import logging
import random
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import FakeClock
from hwmon_sim import install_hwmon, set_hwmon
from kwatt.config import load_config
from kwatt.sampler import Sampler
from kwatt.sources.hwmon import build_hwmon_meters
from kwatt.stages.platform import PlatformStage
from kwatt.workloads.naming import HostNamer
from simnode import SimulatedNode

DT = 5.0
DRAM = 20.0
METER = "hwmon1/device/power1_average"


def scenario(intervals: int, lag: int, window: int, rest: float, peak: float,
             seed: int = 1) -> tuple[float, float]:
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory() as tmp:
        node = SimulatedNode(Path(tmp), vcpus=8)
        node.add_rapl_zone("0", "package-0")
        node.add_rapl_zone("0:0", "dram")
        install_hwmon(node, "acpi-power-meter")
        clock = FakeClock()
        config = load_config(["--path.sysfs", str(node.sysfs), "--path.procfs",
                              str(node.procfs), "--kubernetes", "off", "--gpu", "off",
                              "--node-name", "sim"], env={})
        stage = PlatformStage(build_hwmon_meters(config, clock), config)
        sampler = Sampler(config, HostNamer(), clock=clock, platform=stage)
        history: list[float] = []
        true_other = 0.0
        set_hwmon(node, METER, round((150 + DRAM + rest) * 1e6))
        sampler.sample()
        for _ in range(intervals):
            cpu = rng.uniform(40.0, peak)
            history.append(cpu + DRAM + rest)
            node.add_energy("0", cpu * DT)
            node.add_energy("0:0", DRAM * DT)
            node.add_node_cpu(busy_seconds=DT, idle_seconds=DT)
            # The meter's average, `lag` intervals late, over `window` intervals.
            end = max(len(history) - lag, 1)
            shown = history[max(end - window, 0):end]
            set_hwmon(node, METER, round(sum(shown) / len(shown) * 1e6))
            true_other += rest * DT
            clock.advance(DT)
            sampler.sample()
        booked = sum(j for c, _, j in sampler.snapshot().node_energy if c == "other")
        share = stage.negative_remainders / max(stage.remainders, 1)
        return share, (booked - true_other) / true_other


def main() -> None:
    logging.disable(logging.WARNING)  # each negative remainder logs; only figures here
    intervals = int(sys.argv[1]) if len(sys.argv) > 1 else 400
    print(f"{intervals} intervals of {DT:g} s; cpu uniform 40..PEAK W, dram {DRAM:g} W")
    print(f"{'meter':<34} {'rest W':>6} {'peak W':>6} {'negative':>9} {'other error':>11}")
    cases = [("exact (no lag, same window)", 0, 1), ("1 interval late", 1, 1),
             ("averaged over 6 intervals (30 s)", 0, 6)]
    for label, lag, window in cases:
        for rest, peak in ((150.0, 250.0), (60.0, 400.0)):
            share, error = scenario(intervals, lag, window, rest, peak)
            print(f"{label:<34} {rest:>6.0f} {peak:>6.0f} {share:>8.1%} {error:>+10.1%}")


if __name__ == "__main__":
    main()
