"""Faults that readers report instead of raising, and the fixed set of reasons."""

from __future__ import annotations

import errno
from dataclasses import dataclass

# The `reason` label of kwatt_source_errors_total: a small, fixed set (cardinality).
# negative_remainder: a whole-node meter read less than the components inside it (meter lag
# or averaging window); the platform stage books `other` as 0 for that interval.
REASONS = ("permission", "absent", "parse", "timeout", "api", "implausible",
           "negative_remainder")


@dataclass(frozen=True)
class Fault:
    """One failed read: which source, why (one of REASONS), of what, and the detail."""

    source: str
    reason: str
    subject: str
    detail: str

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"unknown fault reason {self.reason!r}")


def reason_for_oserror(exc: OSError) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "permission"
    if exc.errno in (errno.ENOENT, errno.ENODEV, errno.ENXIO, errno.ENOTDIR):
        return "absent"
    if exc.errno in (errno.ETIMEDOUT, errno.EAGAIN):
        return "timeout"
    return "api"
