"""Stdlib logging in logfmt or JSON, one line per event, with rate-limited repeats."""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
           "error": logging.ERROR}
_LEVEL_NAMES = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warn",
                logging.ERROR: "error", logging.CRITICAL: "error"}
_RESERVED = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    # The keys of Prometheus' go-kit log style (promslog's "go-kit" style, what exporters
    # built on exporter-toolkit print): ts (UTC, milliseconds), level in lower case, caller
    # as file:line, msg; plus kwatt's logger name and each event's own fields. kwatt's
    # events use a `source` field of their own (the energy source), which promslog's slog
    # style would rename, so the go-kit style is the one that keeps every key as is.
    out: dict[str, Any] = {
        "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        + f".{int(record.msecs):03d}Z",
        "level": _LEVEL_NAMES.get(record.levelno, "info"),
        "caller": f"{record.filename}:{record.lineno}",
        "logger": record.name,
        "msg": record.getMessage(),
    }
    for key, value in vars(record).items():
        if key not in _RESERVED and not key.startswith("_"):
            out[key] = value
    if record.exc_info and record.exc_info[1] is not None:
        out["error"] = f"{type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
    return out


def _logfmt_value(value: Any) -> str:
    text = str(value)
    if text == "" or any(c in text for c in ' ="\n\t'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


class LogfmtFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in _fields(record).items())


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(_fields(record), default=str)


def configure_logging(level: str, fmt: str, stream: TextIO | None = None) -> None:
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else LogfmtFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS[level])


class RateLimitedLog:
    """Logs the first occurrence of each key, then at most once per ``every`` seconds.

    Repeats in between are counted and reported with the next line, so a fault that
    happens every sample shows up as one line per window, not one per sample.
    """

    def __init__(self, logger: logging.Logger, every: float = 600.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._logger = logger
        self._every = every
        self._clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def log(self, level: int, key: str, msg: str, **fields: Any) -> bool:
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self._every:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return False
        self._last[key] = now
        suppressed = self._suppressed.pop(key, 0)
        if suppressed:
            fields["repeats_suppressed"] = suppressed
        self._logger.log(level, msg, extra=fields)
        return True

    def forget(self, key: str) -> None:
        """The condition cleared: log it again at once if it comes back."""
        self._last.pop(key, None)
        self._suppressed.pop(key, None)
