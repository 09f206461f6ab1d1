"""Carbon intensity and price sources through the real CLI (issue 11, item 1).

A fake Electricity Maps / price API on loopback answers, fails (401, 429, 500, malformed,
hanging) and recovers; the exporter keeps serving, keeps the last value for the grace
period, then withdraws the gauge and reports the source down; every fault is counted. A
hanging API never holds up /metrics: the scrapes are made while the server is known to be
holding the exporter's request (ordering by events, not by timing).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from exporter_process import ExporterProcess
from fake_intensity_api import FakeIntensityApi, serve
from simnode import SimulatedNode

pytestmark = pytest.mark.slow

_CARBON = re.compile(r"^kwatt_carbon_intensity_grams_per_kwh\{([^}]*)\} (\S+)$", re.M)


def _node(tmp_path: Path) -> SimulatedNode:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    return node


def _wait(condition: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise TimeoutError("condition not met")


def _errors(body: str, reason: str) -> float:
    pattern = rf'^kwatt_source_errors_total\{{node="e2e",reason="{reason}",source="carbon"\}} '
    match = re.search(pattern + r"(\S+)$", body, re.M)
    return float(match.group(1)) if match else 0.0


def _up(body: str) -> str | None:
    match = re.search(r'^kwatt_source_up\{node="e2e",source="carbon"\} (\S+)$', body, re.M)
    return match.group(1) if match else None


def _exporter(tmp_path: Path, base: str, *extra: str) -> ExporterProcess:
    token = tmp_path / "token"
    token.write_text("em-token\n")
    return ExporterProcess(
        _node(tmp_path), "--carbon.source", "electricitymaps",
        "--carbon.url", base + "/v3/carbon-intensity/latest?zone={zone}",
        "--carbon.zone", "DE", "--carbon.token-file", str(token), *extra,
        log_path=tmp_path / "exporter.log")


def test_faults_keep_the_value_for_the_grace_then_withdraw_it_and_count_each(
        tmp_path: Path) -> None:
    api = FakeIntensityApi(value=412.0)
    seen_values: set[str] = set()
    with serve(api) as base:
        exporter = _exporter(tmp_path, base, "--carbon.period", "1s", "--carbon.timeout",
                             "1s", "--carbon.grace", "8s")

        def scrape() -> str:
            body = exporter.metrics()
            seen_values.update(value for _, value in _CARBON.findall(body))
            return body

        try:
            _wait(lambda: 'kwatt_carbon_intensity_grams_per_kwh{node="e2e",'
                  'source="electricitymaps",zone="DE"} 412.0' in scrape())
            assert _up(scrape()) == "1.0"

            for fault, reason in (("401", "permission"), ("429", "api"),
                                  ("malformed", "parse"), ("hang", "timeout"),
                                  ("500", "api")):
                before = _errors(scrape(), reason)
                if fault == "401":
                    api.token = "rotated"  # the exporter's token is now wrong
                elif fault == "malformed":
                    api.malformed()
                elif fault == "hang":
                    api.hang()
                else:
                    api.fail(int(fault))
                body = ""

                def counted(reason: str = reason, before: float = before) -> bool:
                    nonlocal body
                    body = scrape()
                    return _errors(body, reason) > before
                _wait(counted)
                # The cycle that published the fault still shows the held value.
                assert 'source="electricitymaps",zone="DE"} 412.0' in body
                assert _up(body) == "1.0"
                api.release()
                api.ok()
                api.token = "em-token"
                before_ok = exporter.cycles()
                exporter.wait_for_cycle(before_ok)

            api.fail(500)  # for good: past the grace the gauge goes, the source is down
            _wait(lambda: _up(scrape()) == "0.0")
            body = scrape()
            assert not _CARBON.search(body)  # withdrawn: no series at all, never a 0
            assert _errors(body, "api") >= 2

            api.ok()
            api.value = 390.0
            _wait(lambda: _up(scrape()) == "1.0" and "390.0" in seen_values)
        finally:
            log = exporter.stop()
    assert seen_values <= {"412.0", "390.0"}, seen_values  # never 0, never anything else
    assert "signal fetch failed" in log and "withdrawn" in log


def test_a_hanging_api_does_not_delay_metrics_or_the_sampler(tmp_path: Path) -> None:
    api = FakeIntensityApi(value=412.0)
    api.hang()  # every request is held until released
    with serve(api) as base:
        exporter = _exporter(tmp_path, base, "--carbon.period", "1s", "--carbon.timeout",
                             "5m", "--carbon.grace", "6m")
        try:
            _wait(lambda: api.requests_held >= 1)  # the exporter's fetch is stuck in it
            cycles = exporter.cycles()
            for _ in range(3):
                status, body = exporter.get("/metrics")
                assert status == 200
                assert api.requests_held >= 1  # answered while the fetch was still held
            assert exporter.wait_for_cycle(cycles) > cycles  # the sampler kept its cadence
            assert api.requests_held >= 1
            # No value yet and no verdict yet: no gauge, no up series (not a 0).
            assert not _CARBON.search(body) and _up(body) is None
            api.release()
            _wait(lambda: 'source="electricitymaps",zone="DE"} 412.0' in exporter.metrics())
            assert _up(exporter.metrics()) == "1.0"
        finally:
            exporter.stop()


def test_price_file_through_the_cli(tmp_path: Path) -> None:
    price = tmp_path / "price.yaml"
    price.write_text("value: 0.25\ncurrency: EUR\n")
    exporter = ExporterProcess(
        _node(tmp_path), "--cost.source", "file", "--cost.file", str(price),
        "--cost.zone", "tariff-a", "--cost.period", "1s", "--cost.grace", "1m",
        log_path=tmp_path / "exporter.log")
    line = 'kwatt_energy_price_per_kwh{{currency="{}",node="e2e",source="file",zone="tariff-a"}} {}'

    try:
        _wait(lambda: line.format("EUR", "0.25") in exporter.metrics())
        assert 'kwatt_source_up{node="e2e",source="price"} 1.0' in exporter.metrics()
        price.write_text("value: 0.4\ncurrency: GBP\n")
        _wait(lambda: line.format("GBP", "0.4") in exporter.metrics())
        assert line.format("EUR", "0.25") not in exporter.metrics()
    finally:
        exporter.stop()
