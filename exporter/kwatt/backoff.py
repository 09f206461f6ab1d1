"""The retry delay of every polled meter: its interval, or exponential backoff with jitter.

After ``failures`` failures in a row the delay is interval * 2**failures (the exponent
capped, the delay at most ``backoff_max``) scaled by a random 0.5-1.0, so that many
exporters that lost the same BMC network or API do not retry in step. Never shorter than
the interval.
"""

from __future__ import annotations

import random

MAX_BACKOFF_EXPONENT = 10


def next_delay(interval: float, failures: int, backoff_max: float,
               rng: random.Random) -> float:
    if failures <= 0:
        return interval
    backoff = min(interval * float(2 ** min(failures, MAX_BACKOFF_EXPONENT)), backoff_max)
    return max(interval, backoff * (0.5 + rng.random() / 2))
