"""Flags > env KWATT_* > YAML file > defaults; every mistake is one line and exit 2."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from kwatt.config import ConfigError, load_config, parse_duration


def _load(argv: list[str], env: dict[str, str] | None = None):  # type: ignore[no-untyped-def]
    return load_config(argv, env=env or {}, hostname=lambda: "host-a")


def test_defaults() -> None:
    config = _load([])
    assert config.listen_address == ":9877"
    assert config.interval_seconds == 5.0
    assert (config.procfs, config.sysfs) == ("/proc", "/sys")
    assert config.kubernetes == "auto" and config.gpu == "auto"
    assert config.node_name == "host-a"
    assert config.retention_seconds == 300.0
    assert config.attribution.idle_policy == "unattributed"


def test_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "kwatt.yaml"
    cfg.write_text("interval: 10s\npath:\n  sysfs: /file/sys\n  procfs: /file/proc\n"
                   "carbon:\n  intensity_grams_per_kwh: 350\nattribution:\n"
                   "  idle_policy: even\n")
    env = {"KWATT_PATH_SYSFS": "/env/sys", "KWATT_INTERVAL": "2s", "NODE_NAME": "node-7"}
    config = _load(["--config", str(cfg), "--interval", "500ms"], env)
    assert config.interval_seconds == 0.5  # flag
    assert config.sysfs == "/env/sys"  # env over file
    assert config.procfs == "/file/proc"  # file over default
    assert config.carbon_intensity_grams_per_kwh == 350
    assert config.attribution.idle_policy == "even"
    assert config.node_name == "node-7"


@pytest.mark.parametrize(("text", "seconds"), [("500ms", 0.5), ("5s", 5), ("1m", 60),
                                                ("1m30s", 90), ("2h", 7200), (3, 3.0)])
def test_durations(text: object, seconds: float) -> None:
    assert parse_duration("interval", text) == seconds


@pytest.mark.parametrize(("argv", "env", "yaml", "message"), [
    (["--interval", "5 parsecs"], {}, None,
     "--interval: expected a duration like 5s or 500ms, got '5 parsecs'"),
    (["--interval", "0s"], {}, None, "--interval: must be a positive duration, got '0s'"),
    (["--kubernetes", "maybe"], {}, None,
     "--kubernetes: must be one of auto, on, off, got 'maybe'"),
    (["--web.listen-address", "localhost"], {}, None,
     "--web.listen-address: expected [host]:port, got 'localhost'"),
    (["--bogus"], {}, None, "command line: unrecognized arguments: --bogus"),
    ([], {"KWATT_GPU": "sometimes"}, None,
     "KWATT_GPU: must be one of auto, on, off, got 'sometimes'"),
    ([], {}, "interval: [1, 2]\n",
     "interval: expected a duration like 5s or 500ms, got [1, 2]"),
    ([], {}, "carbon:\n  intensity_grams_per_kwh: lots\n",
     "carbon.intensity_grams_per_kwh: expected a number, got 'lots'"),
    ([], {}, "pue: 0.5\n", "pue: must be >= 1, got 0.5"),
    ([], {}, "attribution:\n  idle_policy: fair\n",
     "attribution.idle_policy: must be one of unattributed, even, cpu-request, got 'fair'"),
    ([], {}, "model:\n  cpu_watts_idle_per_vcpu: 5\n  cpu_watts_max_per_vcpu: 1\n",
     "model.cpu_watts_max_per_vcpu: must be >= model.cpu_watts_idle_per_vcpu (1 < 5)"),
    (["--kubernetes", "on"], {}, None, "--node-name: required when --kubernetes=on"),
])
def test_errors_name_the_key(tmp_path: Path, argv: list[str], env: dict[str, str],
                             yaml: str | None, message: str) -> None:
    if yaml is not None:
        (tmp_path / "c.yaml").write_text(yaml)
        argv = ["--config", str(tmp_path / "c.yaml"), *argv]
    with pytest.raises(ConfigError) as err:
        _load(argv, env)
    assert str(err.value).startswith(message)


def test_file_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("interval: 5s\n  nested: : :\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line 2"):
        _load(["--config", str(bad)])
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("web:\n  listen_adress: ':1'\n")
    with pytest.raises(ConfigError, match=r"unknown key 'web.listen_adress'"):
        _load(["--config", str(unknown)])
    with pytest.raises(ConfigError, match=r"--config: cannot read .*missing.yaml"):
        _load(["--config", str(tmp_path / "missing.yaml")])
    listing = tmp_path / "list.yaml"
    listing.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"expected a mapping at the top level"):
        _load(["--config", str(listing)])


@pytest.mark.parametrize("argv", [["--interval", "soon"], ["--nope"],
                                  ["--config", "/nonexistent/kwatt.yaml"]])
def test_cli_prints_one_line_and_exits_2(argv: list[str]) -> None:
    result = subprocess.run([sys.executable, "-m", "kwatt", *argv], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kwatt-exporter: "), result.stderr


def test_cli_rejects_a_port_in_use() -> None:
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "kwatt", "--web.listen-address", f"127.0.0.1:{port}",
             "--kubernetes", "off", "--gpu", "off"], capture_output=True, text=True,
            timeout=60)
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr.strip().splitlines()[-1]
