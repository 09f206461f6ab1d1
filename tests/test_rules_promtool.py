"""The shipped rules: promtool check and unit tests, naming, annotations, runbook anchors."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml
from conftest import require_tool
from dashboard_model import REPO, RULE_TESTS_DIR, RULES_FILE

RUNBOOKS = REPO / "docs" / "runbooks.md"
RECORD_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")
# Series users define themselves (documented in docs/runbooks.md), not level:metric:ops.
USER_SERIES = {"kwatt_namespace_energy_budget_joules"}


def rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(RULES_FILE.read_text())["groups"]
            for rule in group["rules"]]


def alerts() -> dict[str, dict[str, Any]]:
    return {r["alert"]: r for r in rules() if "alert" in r}


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([require_tool("promtool"), *args], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


def test_promtool_check_rules() -> None:
    result = promtool("check", "rules", str(RULES_FILE))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    files = sorted(str(p) for p in RULE_TESTS_DIR.glob("*.yaml"))
    assert files
    result = promtool("test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAILED" not in result.stdout


def test_unit_tests_fail_when_a_threshold_changes(tmp_path: Path) -> None:
    """The unit tests pin behaviour: rules rendered with other thresholds must fail them."""
    (tmp_path / "tests").mkdir()
    shutil.copy(RULE_TESTS_DIR / "kwatt-rules-test.yaml", tmp_path / "tests")
    generated = subprocess.run(
        [sys.executable, str(REPO / "dashboards" / "generate.py"), "rules",
         "--gpu-idle-utilization", "0.001", "--unattributed-ratio", "0.9",
         "--output", str(tmp_path / "kwatt-rules.yaml")],
        capture_output=True, text=True, timeout=120)
    assert generated.returncode == 0, generated.stderr
    result = promtool("test", "rules", "tests/kwatt-rules-test.yaml", cwd=tmp_path)
    assert result.returncode != 0
    assert "KwattGpuAllocatedIdle" in result.stdout + result.stderr
    assert "KwattHighUnattributedShare" in result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS_DIR.glob("*.yaml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert set(alerts()) - firing == set(), "alerts never tested firing"
    assert set(alerts()) - quiet == set(), "alerts never tested staying quiet"


def test_recording_rules_are_named_level_metric_operations() -> None:
    names = [r["record"] for r in rules() if "record" in r]
    bad = [n for n in names if not RECORD_NAME.match(n) and n not in USER_SERIES]
    assert bad == []


def github_anchors(markdown: str) -> set[str]:
    anchors = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            text = line.lstrip("#").strip().lower()
            anchors.add(re.sub(r"[^\w\- ]", "", text).replace(" ", "-"))
    return anchors


def test_alerts_carry_severity_annotations_and_a_runbook_that_exists() -> None:
    anchors = github_anchors(RUNBOOKS.read_text())
    for name, rule in alerts().items():
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule.get("for"), name
        annotations = rule["annotations"]
        assert annotations["summary"] and annotations["description"], name
        url = annotations["runbook_url"]
        assert url.split("#")[0].endswith("docs/runbooks.md"), name
        assert url.split("#")[1] in anchors, f"{name}: no section for #{url.split('#')[1]}"
