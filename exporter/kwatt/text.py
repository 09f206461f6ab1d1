"""Names from the kernel and the Kubernetes API, made safe to expose and to log.

cgroup directory names, ``/proc/<pid>/cgroup`` lines, systemd unit names and API strings
are not guaranteed to be valid UTF-8: Python hands undecodable filesystem bytes over as
lone surrogates (PEP 383), and JSON can carry lone ``\\ud800`` escapes. Either would make
the text exposition unencodable, so every such name passes through here first. Each
undecodable byte or lone surrogate becomes U+FFFD (the Unicode replacement character),
which is what docs/metrics.md documents.
"""

from __future__ import annotations

import re

REPLACEMENT = "\ufffd"
_SURROGATE = re.compile("[\ud800-\udfff]")


def clean_text(value: str) -> str:
    """``value`` with every lone surrogate replaced by U+FFFD; valid text is unchanged."""
    if value.isascii():
        return value
    return _SURROGATE.sub(REPLACEMENT, value)


def is_clean(value: str) -> bool:
    """True when ``value`` encodes to UTF-8 as it is."""
    return value.isascii() or _SURROGATE.search(value) is None


def decode_bytes(raw: bytes) -> str:
    """Kernel bytes as text, each undecodable byte replaced by U+FFFD."""
    return raw.decode("utf-8", "replace")
