"""Command line: regenerate the committed dashboards and rules, or check they are current.

    python dashboards/generate.py                 # write dashboards/grafana/*.json, rules/
                                                  # and the chart's rules (chart/)
    python dashboards/generate.py --check         # exit 1 when a committed file differs
    python dashboards/generate.py rules --gpu-idle-utilization 0.1 --output my-rules.yaml
    python dashboards/generate.py dashboards --currency EUR --output-dir my-dashboards/
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kwatt_dashboards.catalog import all_dashboards
from kwatt_dashboards.rules import RuleParams, render_chart_rules, render_rules

DASHBOARDS_DIR = Path(__file__).resolve().parent.parent
GRAFANA_DIR = DASHBOARDS_DIR / "grafana"
RULES_FILE = DASHBOARDS_DIR / "rules" / "kwatt-rules.yaml"
# Not under rules/: a rule_files glob over that directory must not load placeholders.
CHART_RULES_FILE = DASHBOARDS_DIR / "chart" / "kwatt-rules.chart.yaml"


# What Grafana's import (from a file or grafana.com) asks for: one Prometheus data source.
# Panels query through the `datasource` variable, whose default is this input; where a
# dashboard is provisioned from a file, the unresolved input falls back to the default
# Prometheus data source, so the same JSON serves both.
IMPORT_INPUT = "DS_PROMETHEUS"
GRAFANA_MIN_VERSION = "11.0.0"


def importable(model: dict[str, Any]) -> dict[str, Any]:
    """The dashboard with ``__inputs`` and ``__requires`` for Grafana's import."""
    out = dict(model)
    out["__inputs"] = [{"name": IMPORT_INPUT, "label": "Prometheus",
                        "description": "Prometheus that scrapes kwatt and evaluates its rules",
                        "type": "datasource", "pluginId": "prometheus",
                        "pluginName": "Prometheus"}]
    panel_types = sorted({p.get("type", "") for p in model.get("panels", ())} - {""})
    out["__requires"] = [
        {"type": "grafana", "id": "grafana", "name": "Grafana",
         "version": GRAFANA_MIN_VERSION},
        {"type": "datasource", "id": "prometheus", "name": "Prometheus", "version": "1.0.0"},
        *({"type": "panel", "id": kind, "name": kind, "version": ""} for kind in panel_types)]
    templating = dict(out.get("templating", {}))
    variables = []
    for variable in templating.get("list", []):
        if variable.get("type") == "datasource":
            variable = {**variable, "current": {"text": "${" + IMPORT_INPUT + "}",
                                                "value": "${" + IMPORT_INPUT + "}"}}
        variables.append(variable)
    templating["list"] = variables
    out["templating"] = templating
    return out


def render_dashboards(currency: str = "USD") -> dict[str, str]:
    """File name -> JSON text of every shipped dashboard."""
    return {f"{uid}.json": json.dumps(importable(model), indent=2, sort_keys=True) + "\n"
            for uid, model in all_dashboards(currency).items()}


def _budget(text: str) -> tuple[str, float]:
    namespace, sep, kwh = text.partition("=")
    if not sep or not namespace:
        raise argparse.ArgumentTypeError(f"expected NAMESPACE=KWH, got {text!r}")
    try:
        return namespace, float(kwh)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"budget {text!r}: {kwh!r} is not a number") from exc


def _add_rule_flags(parser: argparse.ArgumentParser) -> None:
    for item in dataclasses.fields(RuleParams):
        if item.name == "namespace_budgets_kwh":
            continue
        flag = "--" + item.name.replace("_", "-")
        kind = float if isinstance(item.default, float) else str
        parser.add_argument(flag, dest=item.name, type=kind, default=item.default,
                            help=f"default {item.default}")
    parser.add_argument("--namespace-budget", dest="budgets", type=_budget, action="append",
                        default=[], metavar="NAMESPACE=KWH",
                        help="energy budget per rolling day (repeatable)")


def _params(args: argparse.Namespace) -> RuleParams:
    values = {item.name: getattr(args, item.name) for item in dataclasses.fields(RuleParams)
              if item.name != "namespace_budgets_kwh"}
    return RuleParams(**values, namespace_budgets_kwh=dict(args.budgets))


def _write_or_check(path: Path, text: str, check: bool) -> bool:
    current = path.read_text(encoding="utf-8") if path.exists() else None
    if current == text:
        return True
    if check:
        print(f"{path}: out of date, run dashboards/generate.py", file=sys.stderr)
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path}")
    return True


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="generate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true",
                        help="compare with the committed files instead of writing")
    sub = parser.add_subparsers(dest="command")
    rules = sub.add_parser("rules", help="render the rules file with other thresholds")
    rules.add_argument("--output", "-o", default="-", help="file to write, - for stdout")
    _add_rule_flags(rules)
    boards = sub.add_parser("dashboards", help="render the dashboards with another currency")
    boards.add_argument("--currency", default="USD",
                        help="ISO code for the cost panels' unit, as in cost.currency")
    boards.add_argument("--output-dir", "-o", required=True, type=Path)
    args = parser.parse_args(argv)

    if args.command == "dashboards":
        if not re.fullmatch(r"[A-Z]{3}", args.currency):
            parser.error(f"--currency: expected a 3-letter ISO code, got {args.currency!r}")
        args.output_dir.mkdir(parents=True, exist_ok=True)
        for name, text in render_dashboards(args.currency).items():
            (args.output_dir / name).write_text(text, encoding="utf-8")
        return 0

    if args.command == "rules":
        text = render_rules(_params(args))
        if args.output == "-":
            sys.stdout.write(text)
        else:
            Path(args.output).write_text(text, encoding="utf-8")
        return 0

    ok = _write_or_check(RULES_FILE, render_rules(RuleParams()), args.check)
    ok = _write_or_check(CHART_RULES_FILE, render_chart_rules(), args.check) and ok
    expected = render_dashboards()
    for name, text in expected.items():
        ok = _write_or_check(GRAFANA_DIR / name, text, args.check) and ok
    for stale in sorted(set(p.name for p in GRAFANA_DIR.glob("*.json")) - set(expected)):
        print(f"{GRAFANA_DIR / stale}: no dashboard generates it", file=sys.stderr)
        ok = False
    return 0 if ok else 1
