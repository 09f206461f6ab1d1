"""Reading the generated dashboard JSON: panels, queries, variables, links."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
GRAFANA_DIR = REPO / "dashboards" / "grafana"
RULES_FILE = REPO / "dashboards" / "rules" / "kwatt-rules.yaml"
RULE_TESTS_DIR = REPO / "dashboards" / "rules" / "tests"
GENERATE = REPO / "dashboards" / "generate.py"

_VARIABLE = re.compile(r"\$(?:\{(\w+)(?::\w+)?\}|(\w+))")


@dataclass(frozen=True)
class Query:
    dashboard: str  # uid
    panel: str  # title
    expr: str
    instant: bool
    time_from: str | None


def load_dashboards(directory: Path = GRAFANA_DIR) -> dict[str, dict[str, Any]]:
    models = {}
    for path in sorted(directory.glob("*.json")):
        model = json.loads(path.read_text(encoding="utf-8"))
        models[model["uid"]] = model
    return models


def panels(model: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (rows excluded), including panels inside collapsed rows."""
    for panel in model.get("panels", []):
        if panel.get("type") == "row":
            yield from (p for p in panel.get("panels", []) if p.get("type") != "row")
        else:
            yield panel


def queries(model: dict[str, Any]) -> Iterator[Query]:
    for panel in panels(model):
        for target in panel.get("targets", []):
            yield Query(model["uid"], panel["title"], target["expr"],
                        bool(target.get("instant")), panel.get("timeFrom"))


def variables_used(text: str) -> set[str]:
    return {a or b for a, b in _VARIABLE.findall(text)}


def link_urls(model: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, url) of every dashboard link and panel/data link."""
    for link in model.get("links", []):
        yield "dashboard links", link.get("url", "")
    for panel in panels(model):
        for link in panel.get("links", []):
            yield panel["title"], link.get("url", "")
        for link in panel.get("fieldConfig", {}).get("defaults", {}).get("links", []):
            yield panel["title"], link.get("url", "")
