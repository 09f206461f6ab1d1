"""Reload the TLS certificate and key when their files change (cert-manager rotation).

A thread stats the files every few seconds; scrapes never touch them. When the files'
identity (inode, size, mtime) changes, a new SSLContext is built and handed over; new
connections use it, open ones finish on the old. A pair that does not load (a half-written
rotation, a key that does not match) is logged as one line and the old context stays; the
next change is tried again.
"""

from __future__ import annotations

import logging
import os
import ssl
import threading
from collections.abc import Callable

from kwatt.config import ConfigError
from kwatt.webconfig import TLSSettings, build_ssl_context

log = logging.getLogger("kwatt.web")

DEFAULT_PERIOD_SECONDS = 5.0

FileId = tuple[int, int, int, int] | None


def _identity(path: str) -> FileId:
    try:
        st = os.stat(path)  # follows the ..data symlink a Secret volume swaps
    except OSError:
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class CertWatcher:
    """Watches one TLSSettings' files; ``apply`` receives each new SSLContext."""

    def __init__(self, tls: TLSSettings, apply: Callable[[ssl.SSLContext], None],
                 period_seconds: float = DEFAULT_PERIOD_SECONDS,
                 build: Callable[[TLSSettings], ssl.SSLContext] = build_ssl_context) -> None:
        self._tls = tls
        self._apply = apply
        self._period = period_seconds
        self._build = build
        self._seen = self._identities()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _identities(self) -> tuple[FileId, ...]:
        paths = [self._tls.cert_file, self._tls.key_file]
        if self._tls.client_ca_file:
            paths.append(self._tls.client_ca_file)
        return tuple(_identity(p) for p in paths)

    def check(self) -> bool:
        """Reload if the files changed; True when a new context was applied."""
        current = self._identities()
        if current == self._seen:
            return False
        self._seen = current
        try:
            context = self._build(self._tls)
        except ConfigError as exc:
            log.warning("TLS files changed but do not load; still serving the previous "
                        "certificate", extra={"error": str(exc)})
            return False
        self._apply(context)
        log.info("TLS certificate reloaded", extra={"cert_file": self._tls.cert_file})
        return True

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="kwatt-cert-watch",
                                        daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            try:
                self.check()
            except Exception as exc:  # never let the watcher die silently
                log.error("TLS file check failed", extra={"error": f"{type(exc).__name__}: "
                                                                   f"{exc}"})

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
