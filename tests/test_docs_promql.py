"""Every PromQL block in the docs parses with promtool (Prometheus 2.42)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import yaml
from conftest import require_tool
from dashboard_model import REPO

DOCS_WITH_PROMQL = [REPO / "docs" / "promql-examples.md", REPO / "docs" / "carbon-and-cost.md",
                    REPO / "README.md"]
_BLOCK = re.compile(r"```promql\n(.*?)```", re.S)


def promql_blocks(path: Path) -> list[str]:
    return [block.strip() for block in _BLOCK.findall(path.read_text())]


def test_the_three_readme_questions_are_answered() -> None:
    text = (REPO / "docs" / "promql-examples.md").read_text()
    for heading in ("Energy of a namespace yesterday", "Top workloads by kWh this week",
                    "Carbon of a CronJob"):
        assert f"### {heading}" in text
    readme = (REPO / "README.md").read_text()
    for question in ("Energy of the namespace `ml` yesterday", "Top workloads by kWh this week",
                     "Carbon (g CO2e) of the CronJob"):
        assert question in readme
    assert len(promql_blocks(REPO / "README.md")) >= 3


def test_every_documented_query_parses(tmp_path: Path) -> None:
    promtool = require_tool("promtool")
    queries = [q for path in DOCS_WITH_PROMQL for q in promql_blocks(path)]
    assert len(queries) >= 12
    rules = [{"record": f"doc:query_{i}:check", "expr": q} for i, q in enumerate(queries)]
    path = tmp_path / "doc-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "docs", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
