"""Our own dashboard lint: conventions every shipped dashboard must follow.

Each check returns problems as text, so a failure names the dashboard and panel, and
test_lint_catches_each_defect proves every check can fail.
"""

from __future__ import annotations

import copy
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import require_tool
from dashboard_model import link_urls, load_dashboards, panels, queries, variables_used

DS_UID = "${datasource}"
GRAFANA_BUILTINS = {"__rate_interval", "__range", "__interval", "__interval_ms", "__all",
                    "__url_time_range", "__field", "__value", "__series", "__data"}
_COUNTER = re.compile(r"\b(\w+_total)\b")
_RANGE = re.compile(r"\[([^\]]+)\]")
_SUBQUERY_OVER_RANGE = re.compile(r"^\$__range:\$__interval$")
_RATE_CALL = re.compile(r"\b(i?rate)\(")
_DASHBOARD_URL = re.compile(r"^/d/([\w-]+)")
KWH_DIVISOR = "3600000"

DASHBOARDS = load_dashboards()


def lint(model: dict[str, Any], known_uids: set[str]) -> list[str]:
    uid = model["uid"]
    problems: list[str] = []
    variables = model.get("templating", {}).get("list", [])
    ds_vars = [v for v in variables if v.get("type") == "datasource"]
    if [v.get("name") for v in ds_vars] != ["datasource"] or ds_vars[0].get("query") != \
            "prometheus":
        problems.append(f"{uid}: needs exactly one prometheus variable named datasource")
    defined: list[str] = []
    for var in variables:
        if var.get("type") == "query":
            if (var.get("datasource") or {}).get("uid") != DS_UID:
                problems.append(f"{uid}: variable {var['name']} does not use $datasource")
            text = json.dumps(var.get("query"))
            if "label_values(" not in text:
                problems.append(f"{uid}: variable {var['name']} is not a label_values query")
            for used in variables_used(text) - GRAFANA_BUILTINS:
                if used not in defined:
                    problems.append(f"{uid}: variable {var['name']} uses ${used} before it "
                                    "is defined (chain order)")
            if var.get("includeAll") and var.get("allValue") != ".*":
                problems.append(f"{uid}: variable {var['name']} All must be .*")
        defined.append(var["name"])
    if "cluster" not in defined:
        problems.append(f"{uid}: no cluster variable")

    seen_titles: set[str] = set()
    for panel in panels(model):
        title = panel.get("title") or ""
        where = f"{uid}/{title or panel.get('id')}"
        if not title:
            problems.append(f"{where}: panel without title")
        if title in seen_titles:
            problems.append(f"{where}: duplicate panel title")
        seen_titles.add(title)
        if not (panel.get("description") or "").strip():
            problems.append(f"{where}: panel without description")
        panel_unit = panel.get("fieldConfig", {}).get("defaults", {}).get("unit")
        if not panel_unit:
            problems.append(f"{where}: panel without unit")
        if (panel.get("datasource") or {}).get("uid") != DS_UID:
            problems.append(f"{where}: panel datasource is not $datasource")
        targets = panel.get("targets", [])
        if not targets:
            problems.append(f"{where}: panel without queries")
        column_units = _column_units(panel)
        for target in targets:
            expr = target.get("expr", "")
            unit = column_units.get(target.get("refId", ""), panel_unit)
            if (target.get("datasource") or {}).get("uid") != DS_UID:
                problems.append(f"{where}: query datasource is not $datasource")
            problems += [f"{where}: {p}" for p in lint_expr(expr, set(defined))]
            if 'cluster=~"$cluster"' not in expr:
                problems.append(f"{where}: query does not filter on $cluster")
            if (KWH_DIVISOR in expr) != (unit == "kwatth") and unit != "massg" \
                    and not str(unit).startswith(("currency", "suffix:g")):
                problems.append(f"{where}: unit {unit} but expression "
                                f"{'divides' if KWH_DIVISOR in expr else 'does not divide'} "
                                "joules into kWh")

    for where, url in link_urls(model):
        match = _DASHBOARD_URL.match(url)
        if not match:
            problems.append(f"{uid}/{where}: link {url!r} is not a /d/<uid> link")
        elif match.group(1) not in known_uids:
            problems.append(f"{uid}/{where}: link to unknown dashboard {match.group(1)}")
    if not any(_DASHBOARD_URL.match(url) for _, url in link_urls(model)):
        problems.append(f"{uid}: no drill-down links")
    return problems


def _column_units(panel: dict[str, Any]) -> dict[str, str]:
    """refId -> unit, for tables whose merged columns ("Value #<refId>", renamed by an
    organize transformation) each carry their unit in a by-name override."""
    renames: dict[str, str] = {}
    for transformation in panel.get("transformations") or []:
        if transformation.get("id") == "organize":
            renames.update((transformation.get("options") or {}).get("renameByName") or {})
    by_name = {override["matcher"].get("options"): prop.get("value")
               for override in panel.get("fieldConfig", {}).get("overrides") or []
               if override.get("matcher", {}).get("id") == "byName"
               for prop in override.get("properties") or [] if prop.get("id") == "unit"}
    units = {}
    for target in panel.get("targets", []):
        ref = target.get("refId", "")
        column = renames.get(f"Value #{ref}", f"Value #{ref}")
        if column in by_name:
            units[ref] = by_name[column]
    return units


def lint_expr(expr: str, defined: set[str]) -> list[str]:
    problems = []
    for match in _COUNTER.finditer(expr):
        before = expr[:match.start()].rstrip()
        if not re.search(r"\b(rate|irate|increase)\($", before):
            problems.append(f"counter {match.group(1)} used without rate/increase")
    for window in _RANGE.findall(expr):
        # A subquery over the range at the panel's interval (sum_over_time of a gauge,
        # scaled by $__interval_ms) is allowed.
        if window not in ("$__rate_interval", "$__range") \
                and not _SUBQUERY_OVER_RANGE.match(window):
            problems.append(f"range [{window}] should be $__rate_interval or $__range")
    for call in _RATE_CALL.finditer(expr):
        window = _RANGE.search(expr, call.end())
        if window is None or window.group(1) != "$__rate_interval":
            problems.append(f"{call.group(1)}() without [$__rate_interval]")
    for used in variables_used(expr) - GRAFANA_BUILTINS:
        if used not in defined:
            problems.append(f"query uses undefined variable ${used}")
    return problems


def test_shipped_dashboards_are_the_seven_documented() -> None:
    assert set(DASHBOARDS) == {"kwatt-cluster", "kwatt-namespace", "kwatt-workload",
                               "kwatt-gpu", "kwatt-node", "kwatt-exporter", "kwatt-runs",
                               "kwatt-ai"}


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_dashboard_follows_conventions(uid: str) -> None:
    assert lint(DASHBOARDS[uid], set(DASHBOARDS)) == []


def test_every_dashboard_is_reachable_by_drill_down() -> None:
    targets = {m.group(1) for model in DASHBOARDS.values()
               for where, url in link_urls(model) if where != "dashboard links"
               for m in [_DASHBOARD_URL.match(url)] if m}
    # Cluster is the entry point; the rest are reached from a panel.
    assert targets >= set(DASHBOARDS) - {"kwatt-cluster"}


def test_lint_catches_each_defect() -> None:
    model = copy.deepcopy(DASHBOARDS["kwatt-cluster"])
    data_panels = list(panels(model))
    first, second, third = data_panels[0], data_panels[1], data_panels[2]
    first["description"] = ""
    first["fieldConfig"]["defaults"].pop("unit")
    second["targets"][0]["expr"] = 'sum(kwatt_node_energy_joules_total{cluster=~"$cluster"})'
    second["targets"][0]["datasource"] = {"type": "prometheus", "uid": "prom-1"}
    third["targets"][0]["expr"] = (
        'sum(rate(kwatt_node_energy_joules_total{cluster=~"$cluster"}[5m])) by ($team)')
    model["links"][0]["url"] = "/d/kwatt-nowhere"
    problems = "\n".join(lint(model, set(DASHBOARDS)))
    for expected in ("panel without description", "panel without unit",
                     "counter kwatt_node_energy_joules_total used without rate/increase",
                     "query datasource is not $datasource", "range [5m]",
                     "rate() without [$__rate_interval]", "undefined variable $team",
                     "link to unknown dashboard kwatt-nowhere"):
        assert expected in problems, expected


def substitute_for_parsing(expr: str) -> str:
    return (expr.replace("$__rate_interval", "1m").replace("$__range", "1h")
            .replace("$__interval_ms", "60000").replace("$__interval", "1m")
            .replace("$idle_utilization", "0.05")
            .replace('"$', '"').replace("${", "{"))


def test_every_query_parses_with_prometheus_2_42(tmp_path: Path) -> None:
    """promtool (the Debian 2.42 one) parses every panel query, variables substituted."""
    promtool = require_tool("promtool")
    rules = [{"record": f"panel:query_{i}:check", "expr": substitute_for_parsing(q.expr)}
             for i, q in enumerate(q for m in DASHBOARDS.values() for q in queries(m))]
    path = tmp_path / "panel-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "panels", "rules": rules}]}))
    result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def _drop_empty_custom(model: Any) -> Any:
    if isinstance(model, dict):
        return {k: _drop_empty_custom(v) for k, v in model.items()
                if not (k == "custom" and v == {})}
    if isinstance(model, list):
        return [_drop_empty_custom(v) for v in model]
    return model


@pytest.mark.parametrize("uid", sorted(DASHBOARDS))
def test_dashboard_round_trips_through_the_grafana_11_6_schema(uid: str) -> None:
    """No Grafana server installs here: the SDK's typed 11.6 model stands in for its schema.
    A field it does not know (a typo, a key from another Grafana version) is dropped on the
    way and fails the comparison; value types are not checked."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.models.dashboard import Dashboard

    # __inputs and __requires are import metadata: Grafana's import reads and drops them,
    # so they are not part of the dashboard model (tests/test_release.py checks them).
    original = {k: v for k, v in DASHBOARDS[uid].items()
                if k not in ("__inputs", "__requires")}
    back = json.loads(json.dumps(Dashboard.from_json(copy.deepcopy(original)),
                                 cls=JSONEncoder))
    assert _drop_empty_custom(back) == _drop_empty_custom(original)
