"""Finding the external tools the deployment tests run (helm, hadolint, checkov, promtool...).

A missing tool fails the test with the command that installs it: these tests exist to run
the real tools, so a skip would hide exactly what they are for (and under CI=true the house
rule is that a missing tool fails).
"""

from __future__ import annotations

import os
import shutil
import sys
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
