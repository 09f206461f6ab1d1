"""Carbon-intensity and price sources against real HTTP(S) servers on loopback.

The poller is stepped by hand (``poll_once``) with a fake monotonic clock, so the grace
period is tested by moving the clock, not by waiting.
"""

from __future__ import annotations

import datetime as dt
import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from deploytools import make_test_certs
from exporter_process import ExporterProcess
from fake_intensity_api import FakeIntensityApi, serve
from fake_kube_api import write_kubeconfig
from kwatt.config import Config, ConfigError, load_config
from kwatt.signals.documents import DocumentError, parse_document, parse_ukgrid
from kwatt.signals.families import SignalReading
from kwatt.signals.nodezone import NodeLabelZone
from kwatt.signals.stage import SignalStage, build_signal_stage
from kwatt.workloads.kubernetes import api_client_for
from simnode import SimulatedNode


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _config(tmp_path: Path, *args: str) -> Config:
    return load_config(["--kubernetes", "off", "--node-name", "n1", *args], env={})


def _stage(config: Config, prefix: str, clock: Clock,
           wall: float = 1_764_590_400.0) -> SignalStage:
    stage = build_signal_stage(config, prefix, None, clock=clock, wall_clock=lambda: wall)
    assert stage is not None
    return stage


def _reading(stage: SignalStage) -> tuple[SignalReading | None, dict[str, bool], list[str]]:
    result = stage.sample(0.0, {})
    reading = result.snapshot
    assert reading is None or isinstance(reading, SignalReading)
    return reading, dict(result.source_up), [f.reason for f in result.faults]


def _token(tmp_path: Path, value: str = "em-token") -> str:
    path = tmp_path / "token"
    path.write_text(value + "\n")
    return str(path)


def _em(tmp_path: Path, base: str, *extra: str) -> Config:
    return _config(tmp_path, "--carbon.source", "electricitymaps", "--carbon.url",
                   base + "/v3/carbon-intensity/latest?zone={zone}", "--carbon.zone", "DE",
                   "--carbon.token-file", _token(tmp_path), "--carbon.period", "60s",
                   "--carbon.timeout", "2s", "--carbon.grace", "5m", *extra)


# --------------------------------------------------------------------------- formats


def test_electricitymaps_value_zone_and_auth_token_header(tmp_path: Path) -> None:
    api = FakeIntensityApi(value=412.5)
    with serve(api) as base:
        stage = _stage(_em(tmp_path, base), "carbon", Clock())
        assert _reading(stage) == (None, {}, [])  # nothing fetched yet: no value, no up
        stage.poller.poll_once()
        reading, up, faults = _reading(stage)
    assert reading == SignalReading(412.5, "DE", "electricitymaps", "")
    assert up == {"carbon": True} and faults == []
    assert api.requests[0].headers["auth-token"] == "em-token"
    assert api.requests[0].query == {"zone": ["DE"]}


def test_ukgrid_national_takes_actual_then_forecast_and_regional(tmp_path: Path) -> None:
    api = FakeIntensityApi(uk_actual=250.0, forecast=300.0)
    with serve(api) as base:
        national = _stage(_config(tmp_path, "--carbon.source", "ukgrid", "--carbon.url",
                                  base + "/intensity"), "carbon", Clock())
        national.poller.poll_once()
        assert _reading(national)[0] == SignalReading(250.0, "", "ukgrid", "")
        api.uk_actual = None  # the current half hour has no actual yet
        national.poller.poll_once()
        assert _reading(national)[0] == SignalReading(300.0, "", "ukgrid", "")

        regional = _stage(_config(tmp_path, "--carbon.source", "ukgrid", "--carbon.url",
                                  base + "/regional/regionid/{zone}", "--carbon.zone", "13"),
                          "carbon", Clock())
        regional.poller.poll_once()
        assert _reading(regional)[0] == SignalReading(300.0, "13", "ukgrid", "")
    assert api.requests[-1].path == "/regional/regionid/13"


def test_electricitymaps_answer_for_another_zone_is_not_used(tmp_path: Path) -> None:
    api = FakeIntensityApi(value=412.5)
    with serve(api) as base:
        stage = _stage(_config(
            tmp_path, "--carbon.source", "electricitymaps", "--carbon.url",
            base + "/v3/carbon-intensity/latest?zone=FR", "--carbon.zone", "DE",
            "--carbon.token-file", _token(tmp_path)), "carbon", Clock())
        stage.poller.poll_once()
    assert _reading(stage) == (None, {"carbon": False}, ["implausible"])


def test_ukgrid_rejects_a_body_without_intensity() -> None:
    with pytest.raises(DocumentError) as err:
        parse_ukgrid({"data": [{"from": "x"}]})
    assert err.value.reason == "parse"


# --------------------------------------------------------------------------- faults


@pytest.mark.parametrize(("fault", "reason"), [
    ("401", "permission"), ("429", "api"), ("500", "api"), ("slow", "timeout"),
    ("malformed", "parse"), ("oversize", "parse"), ("implausible", "implausible"),
])
def test_a_fault_keeps_the_last_value_for_the_grace_then_withdraws_it(
        tmp_path: Path, fault: str, reason: str) -> None:
    api = FakeIntensityApi(value=400.0)
    clock = Clock()
    with serve(api) as base:
        stage = _stage(_em(tmp_path, base, "--carbon.timeout", "0.3s", "--carbon.period",
                           "10s", "--carbon.grace", "60s"), "carbon", clock)
        stage.poller.poll_once()
        assert _reading(stage)[0] is not None
        if fault.isdigit():
            api.fail(int(fault))
        elif fault == "slow":
            api.hang()
        elif fault == "malformed":
            api.malformed()
        elif fault == "oversize":
            api.oversize()
        else:
            api.value = -5.0
        clock.now += 30
        stage.poller.poll_once()
        reading, up, faults = _reading(stage)
        assert reading == SignalReading(400.0, "DE", "electricitymaps", "")  # kept
        assert up == {"carbon": True} and faults == [reason]

        clock.now += 31  # the held value is now 61 s old: past the 60 s grace
        reading, up, faults = _reading(stage)
        assert reading is None and up == {"carbon": False} and faults == []

        stage.poller.poll_once()  # still failing: counted again, still down
        assert _reading(stage)[1:] == ({"carbon": False}, [reason])
        api.release()
        api.ok()
        api.value = 390.0
        stage.poller.poll_once()
        assert _reading(stage) == (SignalReading(390.0, "DE", "electricitymaps", ""),
                                   {"carbon": True}, [])


def test_a_redirect_is_refused_and_the_token_not_sent_on(tmp_path: Path) -> None:
    api = FakeIntensityApi()
    with serve(api) as base:
        stage = _stage(_em(tmp_path, base, "--carbon.url", base + "/redirect"), "carbon",
                       Clock())
        stage.poller.poll_once()
    assert _reading(stage) == (None, {"carbon": False}, ["api"])
    assert [seen.path for seen in api.requests] == ["/redirect"]


def test_an_unreadable_ca_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        build_signal_stage(_em(tmp_path, "https://x", "--carbon.ca-file",
                               str(tmp_path / "missing.crt")), "carbon", None)
    assert str(err.value).startswith("carbon.ca_file: cannot load")


def test_a_wrong_token_is_a_permission_fault(tmp_path: Path) -> None:
    api = FakeIntensityApi(token="the-right-one")
    with serve(api) as base:
        stage = _stage(_em(tmp_path, base), "carbon", Clock())
        stage.poller.poll_once()
    assert _reading(stage) == (None, {"carbon": False}, ["permission"])


def test_retry_after_is_honoured_and_backoff_grows_with_jitter_up_to_the_period(
        tmp_path: Path) -> None:
    api = FakeIntensityApi()
    with serve(api) as base:
        stage = _stage(_em(tmp_path, base, "--carbon.period", "60s"), "carbon", Clock())
        api.fail(429, retry_after="120")
        assert stage.poller.poll_once() >= 120
        api.fail(500)
        waits = [stage.poller.poll_once() for _ in range(6)]
    # backoff 10 s doubling (failures 2..7: 20, 40, 60, 60, ...), each drawn in [b/2, b]
    bounds = [min(60.0, 10.0 * 2 ** n) for n in range(1, 7)]
    assert all(b / 2 <= w <= b for w, b in zip(waits, bounds, strict=True)), waits
    assert stage.poller.poll_once() <= 60.0


def test_tls_is_verified_against_the_ca_file(tmp_path: Path) -> None:
    certs = make_test_certs(tmp_path)
    api = FakeIntensityApi(value=123.0)
    with serve(api, certs.cert, certs.key) as base:
        trusted = _stage(_em(tmp_path, base, "--carbon.ca-file", str(certs.ca)), "carbon",
                         Clock())
        trusted.poller.poll_once()
        assert _reading(trusted)[0] == SignalReading(123.0, "DE", "electricitymaps", "")
        untrusted = _stage(_em(tmp_path, base), "carbon", Clock())  # system CAs only
        untrusted.poller.poll_once()
        assert _reading(untrusted) == (None, {"carbon": False}, ["api"])


# --------------------------------------------------------------------------- file kind


def test_file_kind_picks_up_changes_and_keeps_the_last_value_on_a_broken_file(
        tmp_path: Path) -> None:
    path = tmp_path / "carbon.yaml"
    path.write_text("value: 200\n")
    clock = Clock()
    stage = _stage(_config(tmp_path, "--carbon.source", "file", "--carbon.file", str(path),
                           "--carbon.zone", "site-a", "--carbon.period", "1m",
                           "--carbon.grace", "3m"), "carbon", clock)
    stage.poller.poll_once()
    assert _reading(stage)[0] == SignalReading(200.0, "site-a", "file", "")
    path.write_text("180\n")  # a bare number is a document too
    stage.poller.poll_once()
    assert _reading(stage)[0] == SignalReading(180.0, "site-a", "file", "")
    path.write_text("value: [\n")
    clock.now += 60
    stage.poller.poll_once()
    assert _reading(stage) == (SignalReading(180.0, "site-a", "file", ""), {"carbon": True},
                               ["parse"])
    path.unlink()
    clock.now += 60
    stage.poller.poll_once()
    assert _reading(stage)[2] == ["absent"]
    clock.now += 61
    assert _reading(stage)[:2] == (None, {"carbon": False})


def test_price_file_schedule_by_weekday_and_hour(tmp_path: Path) -> None:
    path = tmp_path / "price.yaml"
    path.write_text(
        "value: 0.20\ncurrency: EUR\ntimezone: Europe/Berlin\nschedule:\n"
        "  - days: [mon, tue, wed, thu, fri]\n    from: '07:00'\n    to: '22:00'\n"
        "    value: 0.32\n"
        "  - days: [sat]\n    from: '22:00'\n    to: '06:00'\n    value: 0.11\n")
    config = _config(tmp_path, "--cost.source", "file", "--cost.file", str(path))

    def at(local: str) -> float | None:
        berlin = dt.datetime.fromisoformat(local).replace(
            tzinfo=__import__("zoneinfo").ZoneInfo("Europe/Berlin"))
        stage = _stage(config, "cost", Clock(), wall=berlin.timestamp())
        stage.poller.poll_once()
        reading = _reading(stage)[0]
        assert reading is not None and reading.currency == "EUR" and reading.kind == "file"
        return reading.value

    assert at("2026-12-01T07:00") == 0.32  # Tuesday, first minute of the window
    assert at("2026-12-01T06:59") == 0.20
    assert at("2026-12-01T22:00") == 0.20  # the window's end is exclusive
    assert at("2026-12-05T23:30") == 0.11  # Saturday night ...
    assert at("2026-12-06T05:59") == 0.11  # ... runs into Sunday morning
    assert at("2026-12-06T06:00") == 0.20
    assert at("2026-12-06T23:30") == 0.20  # Sunday night is not in the window


def test_price_http_document_and_bearer_token(tmp_path: Path) -> None:
    api = FakeIntensityApi(token="price-token", price={"value": 0.27, "currency": "GBP"})
    with serve(api) as base:
        stage = _stage(_config(tmp_path, "--cost.source", "http", "--cost.url", base + "/price",
                               "--cost.token-file", _token(tmp_path, "price-token"),
                               "--cost.zone", "tariff-a"), "cost", Clock())
        stage.poller.poll_once()
    assert _reading(stage) == (SignalReading(0.27, "tariff-a", "http", "GBP"),
                               {"price": True}, [])
    assert api.requests[0].headers["authorization"] == "Bearer price-token"


@pytest.mark.parametrize(("document", "message"), [
    ({"value": 1, "extra": 2}, "unknown key 'extra'"),
    ({"schedule": []}, "no value"),
    ({"value": 1, "schedule": [{"from": "25:00", "to": "01:00", "value": 1}]}, "HH:MM"),
    ({"value": 1, "schedule": [{"days": ["funday"], "from": "01:00", "to": "02:00",
                                "value": 1}]}, "day names"),
    ({"value": 1, "timezone": "Mars/Olympus"}, "unknown zone"),
    ({"value": float("nan")}, "outside"),
    ("cheap", "expected an object"),
])
def test_bad_documents_say_what_is_wrong(document: object, message: str) -> None:
    with pytest.raises(DocumentError) as err:
        parse_document(document, (-1000.0, 1000.0), allow_currency=True)
    assert message in err.value.detail


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(("args", "message"), [
    (["--carbon.source", "electricitymaps", "--carbon.zone", "DE"],
     "carbon.token_file: required with carbon.source electricitymaps"),
    (["--carbon.source", "electricitymaps", "--carbon.token-file", "t"],
     "carbon.zone: required"),
    (["--carbon.source", "file"], "carbon.file: required with carbon.source file"),
    (["--cost.source", "http"], "cost.url: required with cost.source http"),
    (["--cost.source", "http", "--cost.url", "http://x", "--cost.period", "15m"],
     "cost.grace: must be at least cost.period + cost.timeout (910s), got 900s"),
    (["--carbon.source", "watttime"], "--carbon.source: must be one of static, "
     "electricitymaps, ukgrid, file"),
    (["--carbon.zone-by-node", "n1"], "expected node=zone entries"),
    (["--carbon.source", "ukgrid", "--carbon.zone", "GB"],
     "carbon.zone: the UK API's zones are region ids 1 to 17, got 'GB'"),
])
def test_config_errors_name_the_key(tmp_path: Path, args: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, *args)
    assert message in str(err.value)


def test_static_value_with_a_fetched_source_is_an_error(tmp_path: Path) -> None:
    config = tmp_path / "k.yaml"
    config.write_text("carbon:\n  intensity_grams_per_kwh: 300\n  source: ukgrid\n")
    with pytest.raises(ConfigError) as err:
        _config(tmp_path, "--config", str(config))
    assert str(err.value).startswith("carbon.intensity_grams_per_kwh: only used with "
                                     "carbon.source static")


def test_zone_by_node_wins_over_zone(tmp_path: Path) -> None:
    config = _config(tmp_path, "--carbon.zone", "DE", "--carbon.zone-by-node", "n0=FR,n1=PL")
    assert config.carbon_source.zone_for("n1") == "PL"
    assert config.carbon_source.zone_for("n9") == "DE"


def test_a_label_zone_needs_kubernetes(tmp_path: Path) -> None:
    config = _config(tmp_path, "--carbon.source", "ukgrid", "--carbon.zone-node-label",
                     "topology.kubernetes.io/region")
    with pytest.raises(ConfigError) as err:
        build_signal_stage(config, "carbon", None)
    assert "carbon.zone_node_label: needs Kubernetes mode" in str(err.value)


# --------------------------------------------------------------------------- node label


class _NodeApi:
    """Serves one node object at /api/v1/nodes/<name> (what a GET of the node returns)."""

    def __init__(self, labels: dict[str, str], status: int = 200) -> None:
        self.labels = labels
        self.status = status
        self.paths: list[str] = []


@pytest.fixture
def node_api() -> Iterator[tuple[_NodeApi, str]]:
    state = _NodeApi({"topology.kubernetes.io/region": "eu-central-1"})

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            if not self.path.startswith("/api/v1/nodes/"):
                self.send_error(404)  # the pod watch of a CLI test: not this test's concern
                return
            state.paths.append(self.path)
            body = json.dumps({"kind": "Node", "apiVersion": "v1", "metadata": {
                "name": "n1", "labels": state.labels}} if state.status == 200 else
                {"kind": "Status", "code": state.status}).encode()
            self.send_response(state.status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield state, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_zone_from_the_node_label_through_the_kubernetes_client(
        tmp_path: Path, node_api: tuple[_NodeApi, str]) -> None:
    state, server = node_api
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", server)
    price = tmp_path / "price.yaml"
    price.write_text("0.2\n")
    config = load_config(["--kubernetes", "on", "--kubeconfig", str(kubeconfig),
                          "--node-name", "n1", "--cost.source", "file", "--cost.file",
                          str(price), "--cost.zone-node-label",
                          "topology.kubernetes.io/region"], env={})
    lookup = NodeLabelZone(api_client_for(config), "n1", "topology.kubernetes.io/region", 5.0)
    state.status = 403  # RBAC not granted yet: counted, retried
    stage = build_signal_stage(config, "cost", lookup, clock=Clock())
    assert stage is not None
    stage.poller.poll_once()
    assert _reading(stage) == (None, {"price": False}, ["permission"])
    state.status = 200
    state.labels = {}
    stage.poller.poll_once()
    assert _reading(stage)[2] == ["absent"]
    state.labels = {"topology.kubernetes.io/region": "eu-central-1"}
    stage.poller.poll_once()
    assert _reading(stage) == (SignalReading(0.2, "eu-central-1", "file", "USD"),
                               {"price": True}, [])
    stage.poller.poll_once()  # the zone is read once, then kept
    assert state.paths == ["/api/v1/nodes/n1"] * 3


def test_the_cli_labels_the_gauge_with_the_zone_of_its_node(
        tmp_path: Path, node_api: tuple[_NodeApi, str]) -> None:
    _, server = node_api
    carbon = tmp_path / "carbon.json"
    carbon.write_text('{"value": 321}')
    exporter = ExporterProcess(
        SimulatedNode(tmp_path / "node"), "--kubernetes", "on", "--kubeconfig",
        str(write_kubeconfig(tmp_path / "kubeconfig", server)), "--carbon.source", "file",
        "--carbon.file", str(carbon), "--carbon.zone-node-label",
        "topology.kubernetes.io/region", "--carbon.period", "1s", "--carbon.grace", "1m",
        log_path=tmp_path / "exporter.log")
    line = ('kwatt_carbon_intensity_grams_per_kwh{node="e2e",source="file",'
            'zone="eu-central-1"} 321.0')
    try:
        deadline = time.monotonic() + 60
        while line not in exporter.metrics():
            assert time.monotonic() < deadline, exporter.metrics()
            time.sleep(0.05)
    finally:
        exporter.stop()


def test_a_changed_source_needs_a_restart_and_a_static_value_does_not(tmp_path: Path) -> None:
    from kwatt.reload import changed_settings

    before = _config(tmp_path, "--carbon.zone", "DE")
    after = _config(tmp_path, "--carbon.source", "ukgrid", "--carbon.zone", "13",
                    "--cost.period", "1m")
    live, restart = changed_settings(before, after)
    assert live == [] and restart == ["carbon.source", "carbon.zone", "cost.period"]
