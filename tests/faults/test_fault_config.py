"""Hostile config and web-config files, and an interval too short to sample at.

Each case runs the real CLI (``python -m kwatt``) and expects what the README promises for
every configuration mistake: exit status 2, nothing on stdout, and one stderr line that
names the file or the key. A case that hangs is a failure: the subprocess runs under a
timeout far above what a rejection needs, and running into it fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

# Far above the fraction of a second a rejection takes; only a hang gets near it.
_HANG = 15.0
_BASE = ["--kubernetes", "off", "--gpu", "off", "--node-name", "fault",
         "--web.listen-address", "127.0.0.1:0"]


def _run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run([sys.executable, "-m", "kwatt", *_BASE, *argv],
                              capture_output=True, text=True, errors="replace",
                              timeout=_HANG, env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired:
        pytest.fail(f"kwatt {' '.join(argv)} did not exit within {_HANG:g} s")


def _assert_one_line_exit_2(result: subprocess.CompletedProcess[str], *names: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr[-2000:]
    line = lines[0]
    assert line.startswith("kwatt-exporter: "), line
    assert len(line) < 400, line
    for name in names:
        assert name in line, line
    return line


def _billion_laughs() -> bytes:
    lines = ['a0: &a0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for level in range(1, 10):
        refs = ",".join([f"*a{level - 1}"] * 9)
        lines.append(f"a{level}: &a{level} [{refs}]")
    return ("\n".join(lines) + "\n").encode()


def _deep_lists() -> bytes:
    return b"interval: " + b"[" * 5000 + b"]" * 5000 + b"\n"


def _deep_mappings() -> bytes:
    return b"web: " + b"{a: " * 5000 + b"1" + b"}" * 5000 + b"\n"


def _fifty_megabytes() -> bytes:
    line = b"# " + b"x" * 1021 + b"\n"
    return b"interval: 5s\n" + line * (50 * 1024)


def _recursive_alias() -> bytes:
    return b"web: &loop\n  inner: *loop\n"


# (file contents, a substring of the expected line besides the file name)
_HOSTILE_FILES: dict[str, tuple[Callable[[], bytes], str]] = {
    "latin1": (lambda: "interval: 5s\nnode_name: n\u00e9ud\n".encode("latin-1"), "UTF-8"),
    "binary": (lambda: bytes(range(256)) * 16, "UTF-8"),
    "control-characters": (lambda: b"interval: 5s\n\x00\x01\x02\x03\n", "character"),
    "billion-laughs": (_billion_laughs, "alias"),
    "deep-lists": (_deep_lists, "nest"),
    "deep-mappings": (_deep_mappings, "nest"),
    "fifty-megabytes": (_fifty_megabytes, "larger than"),
    "recursive-alias": (_recursive_alias, "alias"),
}


@pytest.mark.parametrize("flag", ["--config", "--web.config.file"])
@pytest.mark.parametrize("case", sorted(_HOSTILE_FILES))
def test_hostile_file_is_one_line_and_exit_2(tmp_path: Path, flag: str, case: str) -> None:
    make, expected = _HOSTILE_FILES[case]
    path = tmp_path / f"{case}.yaml"
    path.write_bytes(make())
    line = _assert_one_line_exit_2(_run(flag, str(path)), str(path))
    assert expected.lower() in line.replace(str(path), "FILE").lower(), line


@pytest.mark.parametrize(("flag", "text", "key"), [
    ("--config", "interval: 5s\ninterval: 10s\n", "interval"),
    ("--config", "web:\n  listen_address: ':1'\npath:\n  sysfs: /s\nweb:\n"
                 "  listen_address: ':2'\n", "web"),
    ("--config", "attribution:\n  idle_watts:\n    cpu: 1\n    cpu: 2\n", "cpu"),
    ("--web.config.file", "basic_auth_users:\n  alice: $2y$04$x\n  alice: $2y$04$y\n",
     "alice"),
    ("--web.config.file", "http_server_config:\n  http2: true\nhttp_server_config:\n"
                          "  http2: false\n", "http_server_config"),
])
def test_duplicate_keys_are_rejected(tmp_path: Path, flag: str, text: str, key: str) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(text)
    line = _assert_one_line_exit_2(_run(flag, str(path)), str(path), f"duplicate key '{key}'")
    assert "line " in line, line


def test_merge_keys_may_still_override(tmp_path: Path) -> None:
    """A `<<` merge followed by an explicit key is overriding, not duplicating; the file
    then fails on the first key kwatt does not know, past the duplicate check."""
    path = tmp_path / "merge.yaml"
    path.write_text("base: &base\n  sysfs: /a\npath:\n  <<: *base\n  sysfs: /b\n")
    line = _assert_one_line_exit_2(_run("--config", str(path)), "unknown key 'base.sysfs'")
    assert "duplicate" not in line


@pytest.mark.parametrize(("argv", "env", "yaml", "key"), [
    (["--interval", "0.001ms"], {}, None, "--interval"),
    (["--interval", "99ms"], {}, None, "--interval"),
    ([], {"KWATT_INTERVAL": "1ms"}, None, "KWATT_INTERVAL"),
    ([], {}, "interval: 0.01\n", "interval"),
])
def test_interval_below_the_minimum_is_rejected(tmp_path: Path, argv: list[str],
                                                 env: dict[str, str], yaml: str | None,
                                                 key: str) -> None:
    if yaml is not None:
        (tmp_path / "c.yaml").write_text(yaml)
        argv = ["--config", str(tmp_path / "c.yaml"), *argv]
    line = _assert_one_line_exit_2(_run(*argv, env=env), f"{key}: must be at least 100ms")
    assert line.startswith(f"kwatt-exporter: {key}:"), line
