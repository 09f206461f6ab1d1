"""The container image recipe: hadolint, plus the properties the chart relies on.

No Docker engine runs here, so the image is not built; what can be checked without one is:
hadolint's rules, the stage layout, the pinned base, the labels and version, the entry
point, and that the build context .dockerignore leaves holds what the COPY lines need and
builds the wheel.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from deploytools import REPO, find_tool

DOCKERFILE = REPO / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        stripped = line.strip()
        if stripped and not stripped.startswith("#"):
            word, _, rest = stripped.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def _stages() -> list[list[tuple[str, str]]]:
    stages: list[list[tuple[str, str]]] = []
    for instruction in _instructions():
        if instruction[0] == "FROM":
            stages.append([])
        if stages:
            stages[-1].append(instruction)
    return stages


def test_hadolint_passes() -> None:
    result = subprocess.run([find_tool("hadolint"), "--format", "json", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    findings = json.loads(result.stdout or "[]")
    assert findings == [], "\n".join(f"{f['line']}: {f['code']} {f['message']}"
                                     for f in findings)
    assert result.returncode == 0


def test_multi_stage_with_a_pinned_slim_base() -> None:
    stages = _stages()
    assert len(stages) == 2
    for stage in stages:
        image = stage[0][1].split()[0]
        assert re.fullmatch(r"python:3\.11\.\d+-slim-bookworm", image), image
    final = stages[-1]
    # Only runtime wheels reach the final stage: it installs from the build stage, offline.
    runs = [args for word, args in final if word == "RUN"]
    assert len(runs) == 1 and "--no-index" in runs[0] and "from=build" in runs[0]
    assert not [args for word, args in final if word == "COPY"]


def test_final_stage_labels_user_and_entrypoint() -> None:
    final = dict((word, args) for word, args in _stages()[-1] if word != "LABEL")
    labels = " ".join(args for word, args in _stages()[-1] if word == "LABEL")
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert final["ARG"] == f"VERSION={version}"
    assert json.loads(final["ENTRYPOINT"]) == ["kwatt-exporter"]
    user = final["USER"].split(":")[0]
    assert user.isdigit() and int(user) != 0  # non-root unless the chart asks for root
    assert final["EXPOSE"] == "9877"


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last matching pattern wins; '!' re-includes."""
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        body = pattern[1:] if negate else pattern
        body = body.rstrip("/")
        parts = path.split("/")
        prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
        glob = body.replace("**/", "*")
        if any(fnmatch.fnmatch(p, body) or fnmatch.fnmatch(p, glob) for p in prefixes):
            ignored = not negate
    return ignored


@pytest.mark.slow
def test_build_context_holds_what_copy_needs_and_builds_the_wheel(tmp_path: Path) -> None:
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True,
                             check=True).stdout.split()
    context = [path for path in tracked if not _ignored(path, patterns)]
    assert "pyproject.toml" in context and "exporter/kwatt/__main__.py" in context
    assert not [p for p in context if p.startswith(("tests/", "helm/", ".venv", ".tools"))]
    for path in context:
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / path, tmp_path / path)
    # The build stage's `pip wheel .`, minus dependencies (no index access needed).
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path / "wheels"), str(tmp_path)],
        capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert list((tmp_path / "wheels").glob(f"kwatt-{version}-*.whl"))
