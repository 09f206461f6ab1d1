"""The committed dashboards and rules are exactly what the generator produces."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from dashboard_model import GENERATE, REPO


def run_generate(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(cwd / "dashboards" / "generate.py"), *args],
                          capture_output=True, text=True, cwd=cwd, timeout=120)


def test_committed_files_match_generator() -> None:
    result = run_generate("--check")
    assert result.returncode == 0, result.stderr


def test_check_detects_a_hand_edited_file(tmp_path: Path) -> None:
    shutil.copytree(REPO / "dashboards", tmp_path / "dashboards",
                    ignore=shutil.ignore_patterns("__pycache__"))
    edited = tmp_path / "dashboards" / "grafana" / "kwatt-node.json"
    edited.write_text(edited.read_text().replace('"watt"', '"kwatt"', 1))
    chart_rules = tmp_path / "dashboards" / "chart" / "kwatt-rules.chart.yaml"
    chart_rules.write_text(chart_rules.read_text().replace("__KWATT_gpuIdleFor__", "2h"))
    stale = tmp_path / "dashboards" / "grafana" / "kwatt-old.json"
    stale.write_text("{}\n")
    result = run_generate("--check", cwd=tmp_path)
    assert result.returncode == 1
    assert "kwatt-node.json: out of date" in result.stderr
    assert "kwatt-rules.chart.yaml: out of date" in result.stderr
    assert "kwatt-old.json: no dashboard generates it" in result.stderr
    assert GENERATE.exists()


def test_rules_cli_changes_thresholds_and_adds_budgets() -> None:
    result = run_generate("rules", "--gpu-idle-utilization", "0.2", "--gpu-idle-for", "2h",
                          "--job", "energy", "--daily-interval", "5m",
                          "--namespace-budget", "ml=100",
                          "--namespace-budget", "web=2.5")
    assert result.returncode == 0, result.stderr
    parsed = yaml.safe_load(result.stdout)["groups"]
    groups = {g["name"]: g["rules"] for g in parsed}
    assert {g["name"]: g.get("interval") for g in parsed}["kwatt.energy-carbon-cost"] == "5m"
    alerts = {r["alert"]: r for r in groups["kwatt.alerts"]}
    assert "< 0.2\n" in alerts["KwattGpuAllocatedIdle"]["expr"]
    assert alerts["KwattGpuAllocatedIdle"]["for"] == "2h"
    assert alerts["KwattExporterDown"]["expr"] == 'up{job="energy"} == 0'
    budgets = {r["labels"]["namespace"]: r["expr"] for r in groups["kwatt.budgets"]}
    assert budgets == {"ml": "vector(360000000)", "web": "vector(9000000)"}


def test_rules_cli_rejects_a_bad_budget() -> None:
    result = run_generate("rules", "--namespace-budget", "ml=lots")
    assert result.returncode == 2
    assert "'lots' is not a number" in result.stderr


def test_dashboards_cli_renders_another_currency(tmp_path: Path) -> None:
    result = run_generate("dashboards", "--currency", "EUR", "--output-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr
    cluster = json.loads((tmp_path / "kwatt-cluster.json").read_text())
    units = {p["title"]: p["fieldConfig"]["defaults"]["unit"]
             for p in cluster["panels"] if p["type"] != "row"}
    assert units["Cost over range"] == "currencyEUR"
    assert "currencyUSD" not in (tmp_path / "kwatt-namespace.json").read_text()
    bad = run_generate("dashboards", "--currency", "euro", "--output-dir", str(tmp_path))
    assert bad.returncode == 2
    assert "3-letter ISO code" in bad.stderr


def test_panels_that_break_down_below_namespace_say_what_coarser_levels_show() -> None:
    """--metrics.level: a panel grouped by container, pod or workload names the level."""
    import json

    from conftest import REPO

    for name, title in (("kwatt-node", "Top containers on the node"),
                        ("kwatt-namespace", "Power by pod"),
                        ("kwatt-namespace", "Power by workload")):
        model = json.loads((REPO / "dashboards" / "grafana" / f"{name}.json").read_text())
        (panel,) = [p for p in model["panels"] if p.get("title") == title]
        assert "--metrics.level" in panel["description"], (name, title)
    model = json.loads((REPO / "dashboards" / "grafana" / "kwatt-cluster.json").read_text())
    plain = [p for p in model["panels"] if p.get("title") == "Power by namespace"]
    assert plain and all("--metrics.level" not in p["description"] for p in plain)
