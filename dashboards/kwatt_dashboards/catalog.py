"""Every shipped dashboard, keyed by uid, as the JSON model Grafana imports."""

from __future__ import annotations

import json
from typing import Any

from grafana_foundation_sdk.cog.encoder import JSONEncoder

from kwatt_dashboards import ai, cluster, exporter, gpu, namespace, node, runs, workload


def all_dashboards(currency: str = "USD") -> dict[str, dict[str, Any]]:
    unit = f"currency{currency}"
    built = [cluster.build(unit), namespace.build(unit), workload.build(unit), gpu.build(),
             node.build(), exporter.build(), runs.build(unit), ai.build()]
    models: dict[str, dict[str, Any]] = {}
    for builder in built:
        model = json.loads(json.dumps(builder.build(), cls=JSONEncoder))
        # Stable panel ids: Grafana keys panel links and state on them.
        for panel_id, panel in enumerate(model["panels"], start=1):
            panel["id"] = panel_id
        models[model["uid"]] = model
    return models
