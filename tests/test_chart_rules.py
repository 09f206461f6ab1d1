"""Alert thresholds set from the chart's values render exactly what the generator renders.

The chart's PrometheusRule is built from files/kwatt-rules.chart.yaml, the generated rules
with a placeholder token for each tunable value, which the template replaces with
prometheusRule.* values. These tests hold the two paths to one result: for the defaults
and for values that change every parameter (numbers chosen where Python's and Go's usual
number formatting disagree), the rendered groups equal `generate.py rules` with the same
parameters, and they pass promtool.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from deploytools import REPO, find_tool
from test_chart import CHART, RELEASE, helm, only, render

sys.path.insert(0, str(REPO / "dashboards"))

from kwatt_dashboards.rules import (
    CHART_TOP_LEVEL,
    NOT_IN_CHART,
    TOKEN_PREFIX,
    RuleParams,
    chart_key,
)

SHIPPED = REPO / "dashboards" / "rules" / "kwatt-rules.yaml"
CHART_RULES = CHART / "files" / "kwatt-rules.chart.yaml"
CHART_FIELDS = [f for f in dataclasses.fields(RuleParams) if f.name not in NOT_IN_CHART]

# A value differing from the default for every chart parameter. 0.575 is 57% with Python's
# float `.0%` but 58% with Helm's decimal mulf; 0.1234567 is 0.123457 with Python's `:g`;
# 1234567 takes Go's %g to exponent form.
CUSTOM: dict[str, Any] = {
    "job": "energy-exporter",
    "daily_interval": "5m",
    "exporter_down_for": "7m",
    "exporter_absent_for": "20m",
    "source_down_for": "11m",
    "estimation_for": "16m",
    "estimation_lookback": "2d",
    "gpu_idle_utilization": 0.575,
    "gpu_idle_window": "45m",
    "gpu_idle_for": "30m",
    "budget_for": "1h30m",
    "unattributed_reasons": "system|unidentified",
    "unattributed_ratio": 0.1234567,
    "unattributed_for": "40m",
    "sample_duration_ratio": 1234567.0,
    "sample_rate_ratio": 0.9,
    "sampling_for": "20m",
    # Quotes and braces must reach the rule unchanged (JSON-escaped in the template).
    "sci_functional_unit": 'http_requests_total{job="api", code=~"2.."}',
}
# A namespace that reads as a number must stay a string label.
BUDGETS = {"ml": 100.0, "web": 2.5, "2024": 0.575}


def _values_path(name: str) -> tuple[str, ...]:
    key = chart_key(name)
    return (key,) if name in CHART_TOP_LEVEL else ("alerts", key)


def _chart_values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    rule_values: dict[str, Any] = values["prometheusRule"]
    return rule_values


def _rendered_groups(*args: str) -> list[dict[str, Any]]:
    groups: list[dict[str, Any]] = only(render("default", "--set", "prometheusRule.enabled=true",
                                               *args), "PrometheusRule")["spec"]["groups"]
    return groups


def _generated_groups(*flags: str) -> list[dict[str, Any]]:
    result = subprocess.run([sys.executable, str(REPO / "dashboards" / "generate.py"), "rules",
                             *flags], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    groups: list[dict[str, Any]] = yaml.safe_load(result.stdout)["groups"]
    return groups


def _promtool_check(groups: list[dict[str, Any]], tmp_path: Path) -> None:
    rules_file = tmp_path / "rendered-rules.yaml"
    rules_file.write_text(yaml.safe_dump({"groups": groups}))
    result = subprocess.run([find_tool("promtool"), "check", "rules", str(rules_file)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_default_values_render_the_shipped_rules(tmp_path: Path) -> None:
    assert _rendered_groups() == yaml.safe_load(SHIPPED.read_text())["groups"]


def test_custom_values_render_what_the_generator_renders(tmp_path: Path) -> None:
    assert set(CUSTOM) == {f.name for f in CHART_FIELDS}, "give every chart parameter a value"
    assert all(CUSTOM[f.name] != f.default for f in CHART_FIELDS)
    values: dict[str, Any] = {"enabled": True, "alerts": {},
                              "namespaceBudgetsKWh": BUDGETS}
    flags: list[str] = []
    for name, value in CUSTOM.items():
        *parents, key = _values_path(name)
        (values["alerts"] if parents else values)[key] = value
        flags += ["--" + name.replace("_", "-"), str(value)]
    for namespace, kwh in BUDGETS.items():
        flags += ["--namespace-budget", f"{namespace}={kwh}"]
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump({"prometheusRule": values}))

    rendered = _rendered_groups("-f", str(values_file))
    assert rendered == _generated_groups(*flags)
    budgets = {r["labels"]["namespace"]: r["expr"]
               for g in rendered if g["name"] == "kwatt.budgets" for r in g["rules"]}
    assert budgets == {"2024": "vector(2070000)", "ml": "vector(360000000)",
                       "web": "vector(9000000)"}
    alerts = {r["alert"]: r for g in rendered for r in g["rules"] if "alert" in r}
    assert alerts["KwattGpuAllocatedIdle"]["for"] == "30m"
    assert "under 58% for 45m" in alerts["KwattGpuAllocatedIdle"]["annotations"]["description"]
    assert alerts["KwattExporterDown"]["expr"] == 'up{job="energy-exporter"} == 0'
    _promtool_check(rendered, tmp_path)


def test_values_set_on_the_command_line_change_only_those_values() -> None:
    # --set turns 2 into an integer, --set-json 0.2 into a float: both are numbers.
    rendered = _rendered_groups("--set-json", "prometheusRule.alerts.gpuIdleUtilization=0.2",
                                "--set", "prometheusRule.alerts.gpuIdleFor=30m",
                                "--set", "prometheusRule.alerts.sampleDurationRatio=2")
    assert rendered == _generated_groups("--gpu-idle-utilization", "0.2",
                                         "--gpu-idle-for", "30m", "--sample-duration-ratio", "2")


def test_values_defaults_are_the_generator_defaults() -> None:
    values = _chart_values()
    chart_name = yaml.safe_load((CHART / "Chart.yaml").read_text())["name"]
    alerts = {chart_key(f.name): f.default for f in CHART_FIELDS
              if f.name not in CHART_TOP_LEVEL}
    assert values["alerts"] == alerts
    assert values["dailyInterval"] == RuleParams.daily_interval
    # Empty job: the chart derives it, by default the chart name, the generator's default.
    assert values["job"] == "" and RuleParams.job == chart_name
    assert values["namespaceBudgetsKWh"] == {}


def test_every_token_in_the_chart_file_has_a_value() -> None:
    text = CHART_RULES.read_text()
    body = text.split("\ngroups:", 1)[1]  # the header comment names the token syntax
    keys = {chart_key(f.name) for f in CHART_FIELDS} | {"budgetNamespace", "budgetKWh"}
    tokens = set()
    for piece in body.split(TOKEN_PREFIX)[1:]:
        name = piece.split("__", 1)[0]
        tokens.add(name.split("_", 1)[1] if "_" in name else name)
    assert tokens == keys
    assert TOKEN_PREFIX not in SHIPPED.read_text()


def test_schema_types_follow_the_generator_parameters() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    rule_schema = schema["properties"]["prometheusRule"]["properties"]
    for item in CHART_FIELDS:
        *parents, key = _values_path(item.name)
        node = rule_schema["alerts"]["properties"][key] if parents else rule_schema[key]
        assert node["type"] == ("number" if isinstance(item.default, float) else "string"), key


@pytest.mark.parametrize(("flag", "problem"), [
    ("prometheusRule.alerts.gpuIdleUtilization=high", "/prometheusRule/alerts/gpuIdleUtilization"),
    ("prometheusRule.alerts.gpuIdleUtilization=0.2", "/prometheusRule/alerts/gpuIdleUtilization"),
    ("prometheusRule.alerts.gpuIdleFor=soon", "/prometheusRule/alerts/gpuIdleFor"),
    ("prometheusRule.alerts.unattributedReasons=a\"b", "/prometheusRule/alerts/unattributed"),
    ("prometheusRule.alerts.noSuchThreshold=1", "noSuchThreshold"),
    ("prometheusRule.namespaceBudgetsKWh.ml=lots", "/prometheusRule/namespaceBudgetsKWh/ml"),
    ("prometheusRule.namespaceBudgetsKWh.Not_A_Namespace=1", "Not_A_Namespace"),
    ("prometheusRule.job=__KWATT_gpuIdleFor__", "/prometheusRule/job"),
    ("prometheusRule.dailyInterval=daily", "/prometheusRule/dailyInterval"),
])
def test_schema_rejects_bad_thresholds(flag: str, problem: str) -> None:
    # --set-string: a threshold given as text (as plain --set passes 0.2) is refused by
    # the schema rather than rendered into an expression.
    result = helm("template", RELEASE, str(CHART), "--set-string", flag, check=False)
    output = result.stdout + result.stderr
    assert result.returncode != 0, f"helm accepted {flag}"
    assert "schema" in output and problem in output, output


@pytest.mark.parametrize(("monitor", "labels_of"), [
    ("serviceMonitor", "Service"), ("podMonitor", "DaemonSet")])
def test_job_is_the_one_the_monitor_gives_the_targets(monitor: str, labels_of: str) -> None:
    docs = render("default", "--set", "prometheusRule.enabled=true", "--set",
                  f"{monitor}.enabled=true", "--set", "nameOverride=energy")
    kind = monitor[0].upper() + monitor[1:]
    job_label = only(docs, kind)["spec"]["jobLabel"]
    owner = only(docs, labels_of)
    labels = (owner["spec"]["template"]["metadata"]["labels"] if labels_of == "DaemonSet"
              else owner["metadata"]["labels"])
    groups = only(docs, "PrometheusRule")["spec"]["groups"]
    alerts = {r["alert"]: r for g in groups for r in g["rules"] if "alert" in r}
    assert alerts["KwattExporterDown"]["expr"] == f'up{{job="{labels[job_label]}"}} == 0'
    assert labels[job_label] == "energy"


def test_a_token_the_template_does_not_know_fails_the_render(tmp_path: Path) -> None:
    chart = tmp_path / "kwatt"
    shutil.copytree(CHART, chart)
    chart_rules = chart / "files" / "kwatt-rules.chart.yaml"
    chart_rules.write_text(chart_rules.read_text().replace(
        "__KWATT_gpuIdleFor__", "__KWATT_gpuIdleForever__"))
    result = helm("template", RELEASE, str(chart), "--set", "prometheusRule.enabled=true",
                  check=False)
    assert result.returncode != 0
    assert "no value for __KWATT_gpuIdleForever__" in result.stderr


def test_budget_group_is_left_out_without_budgets() -> None:
    names = [g["name"] for g in _rendered_groups()]
    assert "kwatt.budgets" not in names
    assert "interval" not in {k for g in _rendered_groups() for k in g}
