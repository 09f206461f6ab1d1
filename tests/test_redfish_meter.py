"""The Redfish meter against DMTF-style mockups served over HTTPS by sushy-static.

Readings change by rewriting the mockup on disk; the meter's clock is a fake, so every
joule below is computed by hand from the readings and the clock.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FakeClock
from kwatt.config import ConfigError, load_config
from kwatt.sources.meter import PlatformMeter
from kwatt.sources.redfish import (
    RedfishMeter,
    RedfishSettings,
    build_redfish_meter,
    redfish_settings,
)
from redfish_bmc import (
    PASSWORD,
    USERNAME,
    FaultyBmc,
    Pki,
    SushyStatic,
    copy_mockup,
    make_pki,
    set_reading,
)

pytestmark = pytest.mark.slow
KWH = 3.6e6
ENV = "Chassis/1U/EnvironmentMetrics"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def secrets(tmp_path: Path) -> tuple[Path, Path]:
    user, password = tmp_path / "username", tmp_path / "password"
    user.write_text(USERNAME + "\n")
    password.write_text(PASSWORD + "\n")
    return user, password


def settings_for(url: str, pki: Pki, secrets: tuple[Path, Path], **extra: object
                 ) -> RedfishSettings:
    fields: dict[str, object] = {"interval_seconds": 1.0, "timeout_seconds": 5.0, **extra}
    return RedfishSettings(base_url=url, username_file=str(secrets[0]),
                           password_file=str(secrets[1]), ca_file=str(pki.ca),
                           **fields)  # type: ignore[arg-type]


@pytest.fixture
def environment_bmc(tmp_path: Path, pki: Pki) -> Iterator[tuple[SushyStatic, Path]]:
    mockup = copy_mockup("environment-metrics", tmp_path / "mockup")
    server = SushyStatic(mockup, pki)
    yield server, mockup
    server.close()


def test_environment_metrics_power_and_exact_energy(
        environment_bmc: tuple[SushyStatic, Path], pki: Pki,
        secrets: tuple[Path, Path]) -> None:
    server, mockup = environment_bmc
    clock = FakeClock(100.0)
    meter: PlatformMeter
    meter = rf = RedfishMeter(settings_for(server.url, pki, secrets), clock=clock)

    assert rf.poll_once()
    samples, faults = meter.latest()
    assert faults == []
    # Only the top-level chassis: the GPU baseboard is ContainedBy 1U, counted in it.
    assert [(s.source, s.sensor, s.watts, s.read_at, s.generation) for s in samples] == [
        ("redfish", "1U", 374.0, 100.0, 1)]
    first = samples[0].energy_joules
    assert first == pytest.approx(3256.75 * KWH)

    # 0.01 kWh (36 kJ) in 120 s: 300 W, plausible under 2 x AllowableMax (2000 W).
    set_reading(mockup, ENV, "EnergykWh", 3256.76)
    set_reading(mockup, ENV, "PowerWatts", 400)
    clock.now = 220.0
    assert rf.poll_once()
    (sample,), faults = meter.latest()
    assert faults == []
    assert (sample.watts, sample.read_at, sample.generation) == (400.0, 220.0, 2)
    assert first is not None and sample.energy_joules is not None
    assert sample.energy_joules - first == pytest.approx(36_000.0, abs=1e-6)

    # An unchanged coarse register keeps its baseline time: the next 0.01 kWh over 2 x
    # 60 s is judged over 120 s (300 W), not over the last 60 s alone.
    clock.now = 280.0
    assert rf.poll_once()
    set_reading(mockup, ENV, "EnergykWh", 3256.77)
    clock.now = 340.0
    assert rf.poll_once()
    (sample,), faults = meter.latest()
    assert faults == []
    assert sample.energy_joules - first == pytest.approx(72_000.0, abs=1e-6)
    assert sample.generation == 4


def test_implausible_energy_jump_is_a_fault_and_not_booked(
        environment_bmc: tuple[SushyStatic, Path], pki: Pki,
        secrets: tuple[Path, Path]) -> None:
    server, mockup = environment_bmc
    clock = FakeClock(0.0)
    meter = RedfishMeter(settings_for(server.url, pki, secrets), clock=clock)
    assert meter.poll_once()
    (start,), _ = meter.latest()

    # +10 kWh in 30 s would be 1.2 MW: above 2 x AllowableMax (2000 W).
    set_reading(mockup, ENV, "EnergykWh", 3266.75)
    clock.now = 30.0
    meter.poll_once()
    (after_jump,), faults = meter.latest()
    assert [(f.source, f.reason, f.subject) for f in faults] == [
        ("redfish", "implausible", "1U")]
    assert after_jump.energy_joules == start.energy_joules
    assert after_jump.watts == 374.0  # power still read

    # A register reset to 0 (a BMC firmware update): never a negative step.
    set_reading(mockup, ENV, "EnergykWh", 0.0)
    clock.now = 60.0
    meter.poll_once()
    (after_reset,), faults = meter.latest()
    assert [f.reason for f in faults] == ["implausible"]
    assert after_reset.energy_joules == start.energy_joules

    # Counting resumes from the new baseline: 0.05 kWh in 600 s = 300 W.
    set_reading(mockup, ENV, "EnergykWh", 0.05)
    clock.now = 660.0
    assert meter.poll_once()
    (resumed,), faults = meter.latest()
    assert faults == []
    assert start.energy_joules is not None and resumed.energy_joules is not None
    assert resumed.energy_joules - start.energy_joules == pytest.approx(0.05 * KWH)


def test_energy_joules_where_energykwh_is_absent(
        environment_bmc: tuple[SushyStatic, Path], pki: Pki,
        secrets: tuple[Path, Path]) -> None:
    import json
    server, mockup = environment_bmc
    path = mockup / ENV / "index.json"
    data = json.loads(path.read_text())
    del data["EnergykWh"]
    data["EnergyJoules"] = {"Reading": 7_200_000}  # 2 kWh
    path.write_text(json.dumps(data))
    clock = FakeClock(0.0)
    meter = RedfishMeter(settings_for(server.url, pki, secrets), clock=clock)
    assert meter.poll_once()
    (first,), _ = meter.latest()
    assert first.energy_joules == pytest.approx(7_200_000)
    set_reading(mockup, ENV, "EnergyJoules", 7_200_000 + 36_000)  # 300 W for 120 s
    clock.now = 120.0
    assert meter.poll_once()
    (second,), faults = meter.latest()
    assert faults == []
    assert second.energy_joules == pytest.approx(7_236_000)


def test_legacy_power_resource(tmp_path: Path, pki: Pki, secrets: tuple[Path, Path]) -> None:
    mockup = copy_mockup("legacy-power", tmp_path / "mockup")
    server = SushyStatic(mockup, pki)
    try:
        meter = RedfishMeter(settings_for(server.url, pki, secrets), clock=FakeClock(5.0))
        assert meter.poll_once()
        samples, faults = meter.latest()
        assert faults == []
        assert [(s.sensor, s.watts, s.energy_joules) for s in samples] == [("1U", 344.0, None)]
        set_reading(mockup, "Chassis/1U/Power", "PowerControl.0.PowerConsumedWatts", 512)
        assert meter.poll_once()
        assert [s.watts for s in meter.latest()[0]] == [512.0]
        # 5000 W is above 2 x PowerCapacityWatts (1600 W): not a reading to believe.
        set_reading(mockup, "Chassis/1U/Power", "PowerControl.0.PowerConsumedWatts", 5000)
        meter.poll_once()
        samples, faults = meter.latest()
        assert [f.reason for f in faults] == ["implausible"]
        assert [s.watts for s in samples] == [None]
    finally:
        server.close()


def test_basic_auth_is_sent_from_the_secret_files(tmp_path: Path, pki: Pki,
                                                   secrets: tuple[Path, Path]) -> None:
    bmc = FaultyBmc(copy_mockup("environment-metrics", tmp_path / "mockup"), pki)
    try:
        meter = RedfishMeter(settings_for(bmc.url, pki, secrets), clock=FakeClock())
        assert meter.poll_once()
        # A rotated Secret is read at the next poll.
        secrets[1].write_text("wrong\n")
        assert not meter.poll_once()
        assert [f.reason for f in meter.latest()[1]] == ["permission"]
        secrets[1].write_text(PASSWORD)
        assert meter.poll_once()
    finally:
        bmc.close()


def test_latest_returns_while_a_poll_hangs(tmp_path: Path, pki: Pki,
                                           secrets: tuple[Path, Path]) -> None:
    bmc = FaultyBmc(copy_mockup("environment-metrics", tmp_path / "mockup"), pki)
    meter = RedfishMeter(settings_for(bmc.url, pki, secrets, timeout_seconds=60.0),
                         clock=FakeClock())
    try:
        assert meter.poll_once()
        bmc.mode = "hang"
        poller = threading.Thread(target=meter.poll_once, daemon=True)
        poller.start()
        assert bmc.entered.wait(30), "the poll never reached the BMC"
        answered = threading.Event()
        got: list[object] = []

        def ask() -> None:
            got.append(meter.latest())
            answered.set()

        threading.Thread(target=ask, daemon=True).start()
        # The BMC is still holding the poll (release not set): latest() must not wait.
        assert answered.wait(30), "latest() blocked on the hanging poll"
        assert poller.is_alive()
        samples, faults = got[0]  # type: ignore[misc]
        assert [s.generation for s in samples] == [1] and faults == []
        bmc.release.set()
        poller.join(30)
    finally:
        bmc.close()
        meter.close()


def test_thread_polls_on_its_own(tmp_path: Path, pki: Pki,
                                 secrets: tuple[Path, Path]) -> None:
    bmc = FaultyBmc(copy_mockup("environment-metrics", tmp_path / "mockup"), pki)
    meter = RedfishMeter(settings_for(bmc.url, pki, secrets))
    try:
        meter.start()
        for _ in range(600):
            samples, _ = meter.latest()
            if samples:
                break
            threading.Event().wait(0.05)
        assert [s.watts for s in samples] == [374.0]
    finally:
        meter.close()
        bmc.close()


# ------------------------------------------------------------------------------ config


def test_config_map_wins_over_template(tmp_path: Path) -> None:
    cfg = tmp_path / "kwatt.yaml"
    cfg.write_text(
        "redfish:\n"
        "  url: https://bmc-{node}.example:8443/\n"
        "  urls:\n"
        "    gpu-1.example.internal: https://10.0.0.7\n"
        "  username_file: /etc/kwatt/bmc/username\n"
        "  password_file: /etc/kwatt/bmc/password\n"
        "  interval: 45s\n"
        "  backoff_max: 10m\n"
        "  chassis: [1U]\n")
    mapped = load_config(["--config", str(cfg), "--node-name", "gpu-1.example.internal"],
                         env={})
    assert mapped.redfish_urls == (("gpu-1.example.internal", "https://10.0.0.7"),)
    settings = redfish_settings(mapped)
    assert settings is not None
    assert (settings.base_url, settings.interval_seconds, settings.backoff_max_seconds,
            settings.chassis, settings.insecure_skip_verify) == (
        "https://10.0.0.7", 45.0, 600.0, ("1U",), False)
    templated = redfish_settings(load_config(["--config", str(cfg), "--node-name", "n2"],
                                             env={}))
    assert templated is not None and templated.base_url == "https://bmc-n2.example:8443/"
    assert build_redfish_meter(load_config(["--node-name", "n3"], env={})) is None


@pytest.mark.parametrize(("argv", "message"), [
    (["--redfish.url", "http://bmc"], "--redfish.url: expected an https:// URL"),
    (["--redfish.url", "https://bmc"], "--redfish.username-file:"),
    (["--redfish.interval", "200ms"], "--redfish.interval: must be at least 1s"),
])
def test_config_errors_name_the_key(argv: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_config(["--node-name", "n", *argv], env={})


class _BrokenClient:
    """A client double whose every request fails as told (no HTTP needed here)."""

    where = "bmc.test:443"

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0
        self.called_twice = threading.Event()

    def get(self, path: str) -> dict[str, object]:
        self.calls += 1
        if self.calls >= 2:
            self.called_twice.set()
        raise self.error


def test_pending_faults_are_bounded_when_nobody_asks(secrets: tuple[Path, Path]) -> None:
    from kwatt.sources.redfish import MAX_PENDING_FAULTS, RedfishError
    meter = RedfishMeter(RedfishSettings("https://bmc.test", str(secrets[0]), str(secrets[1])),
                         client=_BrokenClient(RedfishError("api", "HTTP 500")))  # type: ignore[arg-type]
    for _ in range(MAX_PENDING_FAULTS + 44):
        meter.poll_once()
    assert len(meter.latest()[1]) == MAX_PENDING_FAULTS
    assert meter.latest()[1] == []


def test_an_unexpected_error_does_not_end_polling(secrets: tuple[Path, Path]) -> None:
    client = _BrokenClient(RuntimeError("a bug"))
    meter = RedfishMeter(RedfishSettings("https://bmc.test", str(secrets[0]), str(secrets[1]),
                                         interval_seconds=0.01, backoff_max_seconds=0.02),
                         client=client)  # type: ignore[arg-type]
    meter.start()
    try:
        assert client.called_twice.wait(30), "the polling thread died after the first error"
    finally:
        meter.close()
