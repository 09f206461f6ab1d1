"""Redfish BMC faults: 401, 500, a reply slower than the timeout, malformed JSON, a TLS
error, the BMC vanishing and coming back. Each is one counted Fault (source ``redfish``)
with its reason, the last good sample stays available, and the meter recovers at the next
poll once the BMC behaves. A real HTTPS server (tests/redfish_bmc.py) plays the BMC.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FakeClock
from kwatt.sources.redfish import RedfishMeter, RedfishSettings
from redfish_bmc import PASSWORD, USERNAME, FaultyBmc, Pki, copy_mockup, make_pki

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def bmc(tmp_path: Path, pki: Pki) -> Iterator[FaultyBmc]:
    server = FaultyBmc(copy_mockup("environment-metrics", tmp_path / "mockup"), pki)
    yield server
    server.close()


def make_meter(bmc: FaultyBmc, tmp_path: Path, ca: Path, timeout: float = 5.0,
               insecure: bool = False) -> RedfishMeter:
    (tmp_path / "u").write_text(USERNAME)
    (tmp_path / "p").write_text(PASSWORD)
    settings = RedfishSettings(base_url=bmc.url, username_file=str(tmp_path / "u"),
                               password_file=str(tmp_path / "p"), ca_file=str(ca),
                               insecure_skip_verify=insecure, interval_seconds=30.0,
                               timeout_seconds=timeout, backoff_max_seconds=300.0)
    return RedfishMeter(settings, clock=FakeClock(), rng=random.Random(7))


def reasons(meter: RedfishMeter) -> list[str]:
    return [f.reason for f in meter.latest()[1]]


@pytest.mark.parametrize(("mode", "reason"), [
    ("401", "permission"), ("500", "api"), ("malformed", "parse")])
def test_bad_reply_is_counted_and_recovered(bmc: FaultyBmc, pki: Pki, tmp_path: Path,
                                            mode: str, reason: str) -> None:
    meter = make_meter(bmc, tmp_path, pki.ca)
    assert meter.poll_once()
    good, _ = meter.latest()
    bmc.mode = mode
    assert not meter.poll_once()
    samples, faults = meter.latest()
    assert [(f.source, f.reason) for f in faults] == [("redfish", reason)]
    assert samples == good  # the last good sample stays; its generation says it is old
    assert meter.consecutive_failures == 1
    bmc.mode = "ok"
    assert meter.poll_once()
    samples, faults = meter.latest()
    assert faults == [] and [s.generation for s in samples] == [2]
    assert meter.consecutive_failures == 0


def test_reply_slower_than_the_timeout(bmc: FaultyBmc, pki: Pki, tmp_path: Path) -> None:
    meter = make_meter(bmc, tmp_path, pki.ca, timeout=0.5)
    assert meter.poll_once()
    bmc.mode = "hang"
    assert not meter.poll_once()  # the server holds the request until released
    assert reasons(meter) == ["timeout"]
    bmc.release.set()
    bmc.mode = "ok"
    assert meter.poll_once()
    assert reasons(meter) == []


def test_tls_error_untrusted_certificate(bmc: FaultyBmc, pki: Pki, tmp_path: Path) -> None:
    meter = make_meter(bmc, tmp_path, pki.other_ca)
    assert not meter.poll_once()
    faults = meter.latest()[1]
    assert [f.reason for f in faults] == ["api"]
    assert "TLS" in faults[0].detail and "CERTIFICATE_VERIFY_FAILED" in faults[0].detail
    assert bmc.requests == 0  # no credentials were sent to the unverified server


def test_insecure_switch_skips_verification_and_warns(
        bmc: FaultyBmc, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="kwatt.redfish"):
        meter = make_meter(bmc, tmp_path, pki.other_ca, insecure=True)
    assert any("TLS verification is OFF" in r.getMessage() for r in caplog.records)
    assert meter.poll_once()


def test_bmc_vanishes_and_comes_back(bmc: FaultyBmc, pki: Pki, tmp_path: Path) -> None:
    meter = make_meter(bmc, tmp_path, pki.ca)
    assert meter.poll_once()
    (before,), _ = meter.latest()
    bmc.stop()
    assert not meter.poll_once()
    assert not meter.poll_once()
    assert reasons(meter) == ["absent", "absent"]
    assert meter.consecutive_failures == 2
    bmc.start()
    assert meter.poll_once()
    samples, faults = meter.latest()
    assert faults == [] and [s.generation for s in samples] == [2]
    assert samples[0].energy_joules == before.energy_joules  # the counter did not restart


def test_backoff_grows_with_jitter_and_resets(bmc: FaultyBmc, pki: Pki,
                                              tmp_path: Path) -> None:
    meter = make_meter(bmc, tmp_path, pki.ca)
    assert meter.next_delay() == 30.0
    bmc.mode = "500"
    delays = []
    for _ in range(6):
        meter.poll_once()
        delays.append(meter.next_delay())
    # interval * 2**n, capped at backoff_max (300 s), times a jitter in [0.5, 1.0].
    bounds = [60.0, 120.0, 240.0, 300.0, 300.0, 300.0]
    for delay, bound in zip(delays, bounds, strict=True):
        assert max(30.0, bound / 2) <= delay <= bound
    assert len(set(delays[3:])) == 3  # jittered, not in step
    bmc.mode = "ok"
    assert meter.poll_once()
    assert meter.next_delay() == 30.0


def test_repeated_faults_are_logged_rate_limited(
        bmc: FaultyBmc, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    meter = make_meter(bmc, tmp_path, pki.ca)
    bmc.mode = "500"
    with caplog.at_level(logging.WARNING, logger="kwatt.redfish"):
        for _ in range(5):
            meter.poll_once()
    failures = [r for r in caplog.records if r.getMessage() == "Redfish read failed"]
    assert len(failures) == 1
    assert len(meter.latest()[1]) == 5  # each one still counted
    assert PASSWORD not in caplog.text
