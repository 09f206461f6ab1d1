"""Signals and certificate rotation against the real CLI (issue 12, item 8).

SIGHUP re-reads --config and --web.config.file (a bad file keeps the running settings),
renewed TLS files are served without a restart, and SIGTERM ends the process promptly even
when the sampler or the Kubernetes watch is stuck in a read that never returns.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import socket
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import bcrypt
import pytest
from deploytools import Certs, make_test_certs
from exporter_process import ExporterProcess
from fake_kube_api import FakeKubeApi, make_pod, write_kubeconfig
from simnode import SimulatedNode

pytestmark = pytest.mark.slow


_STATIC = 'kwatt_carbon_intensity_grams_per_kwh{{node="e2e",source="static",zone=""}} {}.0'


def _node(tmp_path: Path) -> SimulatedNode:
    node = SimulatedNode(tmp_path / "node")
    node.add_rapl_zone("0", "package-0")
    return node


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def _status(port: int, path: str, user: str, password: str) -> tuple[int, str]:
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}",
                                     headers={"Authorization": f"Basic {token}"})
    try:
        with urllib.request.urlopen(request, timeout=20) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""


def _wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.1)
    return False


def _terminate(exporter: ExporterProcess, limit: float) -> float:
    started = time.monotonic()
    exporter.proc.send_signal(signal.SIGTERM)
    try:
        exporter.proc.wait(timeout=limit)
    except Exception:
        exporter.proc.kill()
        exporter.proc.wait()
        pytest.fail(f"SIGTERM did not end the exporter within {limit} s")
    return time.monotonic() - started


# --------------------------------------------------------------------------- SIGHUP


def test_sighup_applies_a_valid_config_and_keeps_running_on_an_invalid_one(
        tmp_path: Path) -> None:
    web = tmp_path / "web.yml"
    web.write_text(f"basic_auth_users:\n  alice: '{_hash('a-pass')}'\n")
    config = tmp_path / "kwatt.yml"
    config.write_text("carbon:\n  intensity_grams_per_kwh: 100\n")
    exporter = ExporterProcess(_node(tmp_path), f"--config={config}",
                               f"--web.config.file={web}")
    try:
        status, body = _status(exporter.port, "/metrics", "alice", "a-pass")
        assert status == 200 and _STATIC.format(100) in body

        web.write_text(f"basic_auth_users:\n  bob: '{_hash('b-pass')}'\n")
        config.write_text("carbon:\n  intensity_grams_per_kwh: 200\nretention: 10m\n")
        exporter.proc.send_signal(signal.SIGHUP)
        assert _wait_for(lambda: _status(exporter.port, "/metrics", "bob", "b-pass")[0] == 200)
        assert _status(exporter.port, "/metrics", "alice", "a-pass")[0] == 401
        body = _status(exporter.port, "/metrics", "bob", "b-pass")[1]
        assert _STATIC.format(200) in body

        config.write_text("carbon: [\n")
        exporter.proc.send_signal(signal.SIGHUP)
        assert _wait_for(lambda: "reload failed" in exporter.log_path.read_text())
        web.write_text("basic_auth_users:\n  bob: plaintext\n")
        config.write_text("carbon:\n  intensity_grams_per_kwh: 300\n")
        exporter.proc.send_signal(signal.SIGHUP)
        assert _wait_for(lambda: exporter.log_path.read_text().count("reload failed") == 2)
        assert exporter.proc.poll() is None
        status, body = _status(exporter.port, "/metrics", "bob", "b-pass")
        assert status == 200  # the running web config stayed
        assert _STATIC.format(200) in body
    finally:
        log = exporter.stop()
    restart_lines = [line for line in log.splitlines() if "need a restart" in line]
    assert len(restart_lines) == 1 and "keys=retention" in restart_lines[0], log
    failed = [line for line in log.splitlines() if "reload failed" in line]
    assert "kwatt.yml" in failed[0] and "basic_auth_users.bob" in failed[1], failed
    assert "Traceback" not in log


# --------------------------------------------------------------------------- TLS rotation


def _served_certificate(port: int) -> bytes:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=20) as raw, \
            context.wrap_socket(raw) as tls:
        der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def _pem_der(path: Path) -> bytes:
    return ssl.PEM_cert_to_DER_cert(path.read_text())


def _install(source: Path, target: Path) -> None:
    staging = target.with_suffix(".new")
    shutil.copyfile(source, staging)
    os.replace(staging, target)


def test_renewed_certificate_is_served_without_a_restart(tmp_path: Path) -> None:
    (tmp_path / "first").mkdir()
    (tmp_path / "second").mkdir()
    first: Certs = make_test_certs(tmp_path / "first")
    second: Certs = make_test_certs(tmp_path / "second")
    live = tmp_path / "tls"
    live.mkdir()
    _install(first.cert, live / "tls.crt")
    _install(first.key, live / "tls.key")
    web = tmp_path / "web.yml"
    web.write_text(f"tls_server_config:\n  cert_file: {live / 'tls.crt'}\n"
                   f"  key_file: {live / 'tls.key'}\n")
    exporter = ExporterProcess(_node(tmp_path), f"--web.config.file={web}")
    try:
        assert _served_certificate(exporter.port) == _pem_der(first.cert)
        _install(second.key, live / "tls.key")
        _install(second.cert, live / "tls.crt")
        assert _wait_for(lambda: _served_certificate(exporter.port) == _pem_der(second.cert))

        # A broken pair (the key of another certificate) is logged; the last good stays.
        _install(first.cert, live / "tls.crt")
        assert _wait_for(lambda: "do not load" in exporter.log_path.read_text())
        assert _served_certificate(exporter.port) == _pem_der(second.cert)
        assert exporter.proc.poll() is None
    finally:
        log = exporter.stop()
    assert "Traceback" not in log


# --------------------------------------------------------------------------- SIGTERM


def test_sigterm_ends_the_exporter_while_the_sampler_is_blocked_in_a_read(
        tmp_path: Path) -> None:
    node = _node(tmp_path)
    exporter = ExporterProcess(node, interval="200ms")
    try:
        exporter.wait_for_cycle(after=0)
        # A read that never returns (a FIFO nobody writes): the sampler blocks on it.
        stat = node.procfs / "stat"
        stat.unlink()
        os.mkfifo(stat)
        assert _wait_for(lambda: exporter.get("/healthz")[0] == 503)
        elapsed = _terminate(exporter, limit=10)
        assert exporter.proc.returncode == 0
        print(f"SIGTERM with a blocked sampler: exited in {elapsed:.2f} s")
    finally:
        exporter.stop()


def test_sigterm_ends_the_exporter_while_the_kubernetes_api_hangs(tmp_path: Path) -> None:
    api = FakeKubeApi()
    api.add(make_pod("web-0", node="e2e"))
    with api.serve() as url:
        kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", url)
        exporter = ExporterProcess(_node(tmp_path), "--kubernetes", "on",
                                   f"--kubeconfig={kubeconfig}")
        try:
            exporter.wait_for_cycle(after=0)
            api.set_failure(hang=True)  # every request (and the open watch) now hangs
            time.sleep(1.0)
            # The old shutdown joined the watch thread for 5 s; the pod gets 2 s.
            elapsed = _terminate(exporter, limit=10)
            assert exporter.proc.returncode == 0
            assert elapsed < 4.0, f"exited after {elapsed:.2f} s"
            print(f"SIGTERM with a hanging API: exited in {elapsed:.2f} s")
        finally:
            exporter.stop()
