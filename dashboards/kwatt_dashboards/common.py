"""Shared building blocks: the datasource and chained variables, panel shortcuts, links.

Conventions every dashboard follows (tests/test_dashboards_lint.py enforces them):
one ``datasource`` variable used by every query; ``cluster`` first in the variable chain,
tolerating Prometheus setups without a cluster label (All = ``.*``); counters only through
``rate``/``increase`` with ``$__rate_interval`` or ``$__range``; every panel has a title,
a description and a unit; links point at shipped dashboards by uid.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from grafana_foundation_sdk.builders import (
    bargauge,
    dashboard,
    piechart,
    prometheus,
    stat,
    table,
    timeseries,
)
from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders.dashboard import DashboardLink
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.models import common as common_models
from grafana_foundation_sdk.models import dashboard as dm
from grafana_foundation_sdk.models import prometheus as pm

DS = dm.DataSourceRef(type_val="prometheus", uid="${datasource}")
KWH = "3600000"  # joules per kWh

# Dashboard uids: links use them, the lint test resolves them.
UID_CLUSTER = "kwatt-cluster"
UID_NAMESPACE = "kwatt-namespace"
UID_WORKLOAD = "kwatt-workload"
UID_GPU = "kwatt-gpu"
UID_NODE = "kwatt-node"
UID_EXPORTER = "kwatt-exporter"
UID_RUNS = "kwatt-runs"
UID_AI = "kwatt-ai"

TITLES = {
    UID_CLUSTER: "kwatt / Cluster energy",
    UID_NAMESPACE: "kwatt / Namespace",
    UID_WORKLOAD: "kwatt / Workload and pod",
    UID_GPU: "kwatt / GPUs",
    UID_NODE: "kwatt / Node",
    UID_EXPORTER: "kwatt / Exporter health",
    UID_RUNS: "kwatt / Training runs and served models",
    UID_AI: "kwatt / AI efficiency",
}

CLUSTER = 'cluster=~"$cluster"'
# Carbon and cost over the range are integrals of the per-second rates the recording
# rules keep (carbon_rules.py): each step's rate times the step, Grafana's $__interval.
# Carbon and cost panels set INTEGRAL_MIN_STEP as their minimum interval: finer steps
# only re-read the same 5-minute rate average.
INTEGRAL_MIN_STEP = "1m"


def over_range(rate: str) -> str:
    """The integral of a recorded per-second rate over the dashboard's time range."""
    return f"sum_over_time({rate}[$__range:$__interval]) * $__interval_ms / 1000"


LAST_VALUE = common_builders.ReduceDataOptions().calcs(["lastNotNull"]).values(False)


def datasource_variable() -> dashboard.DatasourceVariable:
    return (dashboard.DatasourceVariable("datasource").label("Data source").type("prometheus")
            .description("Prometheus that scrapes kwatt and evaluates its rules."))


def query_variable(name: str, label: str, metric: str, matchers: Sequence[str],
                   description: str, include_all: bool = True) -> dashboard.QueryVariable:
    selector = "{" + ", ".join(matchers) + "}" if matchers else ""
    var = (dashboard.QueryVariable(name).label(label).description(description)
           .query({"query": f"label_values({metric}{selector}, {name})",
                   "refId": f"{name}-values", "qryType": 1})
           .datasource(DS)
           .refresh(dm.VariableRefresh.ON_TIME_RANGE_CHANGED)
           .sort(dm.VariableSort.ALPHABETICAL_ASC))
    if include_all:
        var = (var.include_all(True).all_value(".*")
               .current(dm.VariableOption(selected=True, text="All", value="$__all")))
    return var


def cluster_variable() -> dashboard.QueryVariable:
    return query_variable(
        "cluster", "Cluster", "kwatt_build_info", [],
        "Set by your Prometheus (external label or relabelling); All also matches series "
        "without a cluster label.")


def dashboard_links(current: str) -> list[Builder[dm.DashboardLink]]:
    return [DashboardLink(TITLES[uid]).type(dm.DashboardLinkType.LINK).url(f"/d/{uid}")
            .include_vars(True).keep_time(True).icon("dashboard")
            for uid in TITLES if uid != current]


def drill(uid: str, title: str, **labels: str) -> DashboardLink:
    """Data link to another dashboard, carrying datasource, cluster, time and labels."""
    params = ["${datasource:queryparam}", "${cluster:queryparam}", "${__url_time_range}"]
    params += [f"var-{var}=${{__field.labels.{label}}}" for var, label in labels.items()]
    return DashboardLink(title).url(f"/d/{uid}?" + "&".join(params))


def target(expr: str, legend: str = "", instant: bool = False,
           table_format: bool = False) -> prometheus.Dataquery:
    query = prometheus.Dataquery().expr(expr).datasource(DS).legend_format(legend or "__auto")
    query = query.instant() if instant else query.range()
    if table_format:
        query = query.format(pm.PromQueryFormat.TABLE)
    return query


PanelBuilder = timeseries.Panel | stat.Panel | bargauge.Panel | piechart.Panel | table.Panel

# --metrics.level (docs/metrics.md): below the level the exporter leaves labels empty, so a
# panel that breaks energy down by a finer label shows one row per coarser group there.
_BY = re.compile(r"\bby \(([^)]*)\)")
_FAMILIES_WITH_LEVELS = ("kwatt_container_energy_joules_total",
                         "kwatt_workload_energy_joules_total", "pod:kwatt_", "workload:kwatt_")
LEVEL_NOTES = (
    ("container", "Per container at --metrics.level container (the default); at pod, "
                  "workload or namespace level, one row per pod, workload or namespace."),
    ("pod", "Per pod at --metrics.level container or pod; at workload or namespace level, "
            "one row per workload or namespace."),
    ("workload", "Per workload at --metrics.level container, pod or workload; at namespace "
                 "level, one row per namespace."),
)


def level_note(exprs: Sequence[str]) -> str:
    """What a panel shows at coarser --metrics.level settings, or "" when nothing changes."""
    grouped: set[str] = set()
    for expr in exprs:
        if any(family in expr for family in _FAMILIES_WITH_LEVELS):
            for match in _BY.finditer(expr):
                grouped |= {label.strip() for label in match.group(1).split(",")}
    for label, note in LEVEL_NOTES:
        if label in grouped:
            return note
    return ""


def _common(panel: PanelBuilder, title: str, description: str, unit: str,
            targets: Sequence[prometheus.Dataquery], links: Sequence[DashboardLink],
            height: int, width: int) -> Builder[dm.Panel]:
    for index, query in enumerate(targets):
        query.ref_id(chr(ord("A") + index))
    note = level_note([query.build().expr or "" for query in targets])
    if note:
        description = f"{description} {note}"
    panel = (panel.title(title).description(description).unit(unit)
             .datasource(DS).targets(list(targets)).height(height).span(width))
    if links:
        panel = panel.data_links(list(links))
    return panel


def ts(title: str, description: str, unit: str, *targets: prometheus.Dataquery,
       links: Sequence[DashboardLink] = (), stacked: bool = False, height: int = 8,
       width: int = 12) -> Builder[dm.Panel]:
    panel = timeseries.Panel().fill_opacity(10).legend(
        common_builders.VizLegendOptions().display_mode(common_models.LegendDisplayMode.TABLE)
        .placement(common_models.LegendPlacement.BOTTOM).show_legend(True)
        .calcs(["mean", "lastNotNull"]))
    if stacked:
        panel = panel.stacking(common_builders.StackingConfig().mode(
            common_models.StackingMode.NORMAL))
    return _common(panel, title, description, unit, targets, links, height, width)


def single(title: str, description: str, unit: str, *targets: prometheus.Dataquery,
           time_from: str | None = None, height: int = 5, width: int = 6,
           min_interval: str | None = None) -> Builder[dm.Panel]:
    panel = (stat.Panel().graph_mode(common_models.BigValueGraphMode.NONE)
             .reduce_options(LAST_VALUE))
    if time_from:
        panel = panel.time_from(time_from)
    if min_interval:
        panel = panel.interval(min_interval)
    return _common(panel, title, description, unit, targets, (), height, width)


def bars(title: str, description: str, unit: str, *targets: prometheus.Dataquery,
         links: Sequence[DashboardLink] = (), height: int = 8,
         width: int = 12, min_interval: str | None = None) -> Builder[dm.Panel]:
    panel = (bargauge.Panel().orientation(common_models.VizOrientation.HORIZONTAL)
             .reduce_options(LAST_VALUE))
    if min_interval:
        panel = panel.interval(min_interval)
    return _common(panel, title, description, unit, targets, links, height, width)


def pie(title: str, description: str, unit: str, *targets: prometheus.Dataquery,
        height: int = 8, width: int = 6) -> Builder[dm.Panel]:
    return _common(piechart.Panel(), title, description, unit, targets, (), height, width)


def grid(title: str, description: str, unit: str, *targets: prometheus.Dataquery,
         links: Sequence[DashboardLink] = (), height: int = 8,
         width: int = 12) -> Builder[dm.Panel]:
    return _common(table.Panel(), title, description, unit, targets, links, height, width)


def row(title: str) -> dashboard.Row:
    return dashboard.Row(title)


def new_dashboard(uid: str, description: str,
                  variables: Sequence[Builder[dm.VariableModel]]) -> dashboard.Dashboard:
    return (dashboard.Dashboard(TITLES[uid]).uid(uid).description(description)
            .tags(["kwatt", "energy"]).refresh("1m").time("now-6h", "now")
            .timezone("browser").editable()
            .variables([datasource_variable(), *variables])
            .links(dashboard_links(uid)))


def sel(*matchers: str) -> str:
    """A label selector that always starts with the cluster matcher."""
    return "{" + ", ".join((CLUSTER, *matchers)) + "}"


NS = 'namespace=~"$namespace"'
WL = 'workload=~"$workload"'
POD = 'pod=~"$pod"'
NODE = 'node=~"$node"'
JOB = 'job=~"$job"'
