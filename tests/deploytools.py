"""Finding the external tools the deployment tests run (helm, hadolint, checkov, promtool...).

A missing tool fails the test with the command that installs it: these tests exist to run
the real tools, so a skip would hide exactly what they are for (and under CI=true the house
rule is that a missing tool fails).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_VENV_BIN = Path(sys.executable).parent
_INSTALL_HINT = "run scripts/install-test-tools (and pip install -e '.[test]')"


def find_tool(name: str, *extra_dirs: Path) -> str:
    """The tool on PATH, else in .tools/bin, the test venv or ``extra_dirs``; else fail."""
    found = shutil.which(name)
    if found:
        return found
    for directory in (REPO / ".tools" / "bin", _VENV_BIN, *extra_dirs):
        candidate = directory / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    ci = " (CI=true)" if os.environ.get("CI") == "true" else ""
    pytest.fail(f"{name} not found on PATH, in .tools/bin or {_VENV_BIN}{ci}: {_INSTALL_HINT}",
                pytrace=False)


@dataclass(frozen=True)
class Certs:
    """A throwaway CA, a server certificate for localhost/127.0.0.1 and a client one."""

    ca: Path
    cert: Path
    key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run([find_tool("openssl"), *map(str, args)], check=True,
                   capture_output=True, timeout=60)


def _make_ca(tmp: Path, name: str) -> tuple[Path, Path]:
    cert, key = tmp / f"{name}.crt", tmp / f"{name}.key"
    _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", cert, "-days", "2", "-subj", f"/CN={name}",
             "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign")
    return cert, key


def _issue(ca: Path, ca_key: Path, out: Path, key: Path, cn: str, ext: str,
           tmp: Path) -> None:
    csr = tmp / f"{cn}.csr"
    _openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
             "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
    extfile = tmp / f"{cn}.ext"
    extfile.write_text(ext)
    _openssl("x509", "-req", "-in", csr, "-CA", ca, "-CAkey", ca_key, "-CAcreateserial",
             "-days", "2", "-out", out, "-extfile", extfile)


def make_test_certs(tmp: Path) -> Certs:
    """Certificates made now with the openssl CLI (no key material is committed)."""
    ca, ca_key = _make_ca(tmp, "test-ca")
    _issue(ca, ca_key, tmp / "server.crt", tmp / "server.key", "kwatt",
           "subjectAltName=DNS:localhost,DNS:kwatt,IP:127.0.0.1\n"
           "extendedKeyUsage=serverAuth\n", tmp)
    _issue(ca, ca_key, tmp / "client.crt", tmp / "client.key", "prometheus",
           "extendedKeyUsage=clientAuth\n", tmp)
    return Certs(ca, tmp / "server.crt", tmp / "server.key", tmp / "client.crt",
                 tmp / "client.key")
