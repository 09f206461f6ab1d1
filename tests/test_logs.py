"""Log lines carry the keys users of Prometheus exporters parse: ts, level, caller, msg."""

from __future__ import annotations

import inspect
import io
import json
import logging
import re

import pytest
from kwatt.logs import configure_logging


@pytest.fixture(autouse=True)
def _restore_root_logger() -> object:
    # configure_logging sets the process-wide root logger; later tests must not inherit it.
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def _log_one(fmt: str) -> tuple[str, int]:
    stream = io.StringIO()
    configure_logging("info", fmt, stream)
    line = inspect.currentframe().f_lineno + 1  # type: ignore[union-attr]
    logging.getLogger("kwatt.test").warning("zone read failed", extra={"source": "rapl",
                                                                        "subject": "a b"})
    return stream.getvalue(), line


def test_logfmt_keys_and_order_follow_the_go_kit_style() -> None:
    text, line = _log_one("logfmt")
    assert text.count("\n") == 1
    keys = re.findall(r'(?:^| )([a-z_]+)=', text)
    assert keys == ["ts", "level", "caller", "logger", "msg", "source", "subject"]
    assert re.match(r"ts=\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z level=warn ", text)
    assert f"caller=test_logs.py:{line} " in text
    assert 'logger=kwatt.test msg="zone read failed" source=rapl subject="a b"' in text


def test_json_has_the_same_keys() -> None:
    text, line = _log_one("json")
    record = json.loads(text)
    assert list(record)[:5] == ["ts", "level", "caller", "logger", "msg"]
    assert record["level"] == "warn"
    assert record["caller"] == f"test_logs.py:{line}"
    assert record["source"] == "rapl"
