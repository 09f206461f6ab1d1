"""linux/arm64: the image recipe has nothing x86-only, and every runtime dependency has an
aarch64 (or pure-Python) wheel. The wheel check asks the package index (CI has it); a run
without one fails, it does not skip."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from conftest import REPO

SCRIPT = REPO / "scripts" / "check-arm64-wheels"


def _run(*requirements: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *requirements], capture_output=True,
                          text=True, timeout=600)


@pytest.mark.slow
def test_every_runtime_dependency_has_an_aarch64_wheel() -> None:
    result = _run()
    assert result.returncode == 0, result.stderr
    assert "manylinux2014_aarch64" in result.stdout
    for name in ("grpcio", "protobuf", "bcrypt", "pyyaml"):  # the compiled ones
        assert re.search(rf"^ok  {name}-\S+aarch64\S*\.whl$", result.stdout, re.M | re.I), name


@pytest.mark.slow
def test_check_fails_for_an_x86_only_package() -> None:
    # Intel's OpenMP runtime is published for x86-64 only.
    result = _run("intel-openmp")
    assert result.returncode == 1
    assert "intel-openmp" in result.stderr


def test_dockerfile_has_nothing_x86_only() -> None:
    lines = [line for line in (REPO / "Dockerfile").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    for line in lines:
        assert not re.search(r"amd64|x86[_-]64|i[3-6]86", line, re.I), line
    for line in lines:
        if line.startswith("FROM "):
            # No --platform pin; an official multi-arch Python image.
            assert "--platform" not in line
            assert re.match(r"FROM python:3\.11[\w.-]*-slim-bookworm( AS \w+)?$", line), line
