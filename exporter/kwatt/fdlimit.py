"""The open-files limit, raised once at start for the whole process.

Held cgroup counter files (kwatt.workloads.cgroups) and HTTP connections (kwatt.web) both
need descriptors; the default soft limit of 1024 would ration them. Go raises the soft limit
to the hard one at start; so does kwatt.
"""

from __future__ import annotations

import resource


def raise_open_file_limit(wanted: int | None = None) -> int:
    """Lift the soft RLIMIT_NOFILE to ``wanted`` (None: the hard limit), never lowering it.

    Returns the soft limit in force afterwards (RLIM_INFINITY as is)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return soft
    if wanted is None:
        target = hard
    else:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if target == resource.RLIM_INFINITY or target > soft:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError):
            pass  # e.g. a hard limit of infinity that the kernel caps at nr_open
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]
