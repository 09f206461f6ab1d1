"""Training runs and served models: AI workloads by the objects their users created.

A run is one workload (TrainJob, JobSet, PyTorchJob, RayJob, ...): the workload counter
outlives its pods, so a run's energy over the range is one increase() over one series per
component, restarted and short-lived pods included. Durations, GPU-hours and peak power
are read from subqueries over the range at the panel's interval ($__interval: the range over
Grafana's max data points), the resolution they have.
"""

from __future__ import annotations

from grafana_foundation_sdk.builders import common as common_builders
from grafana_foundation_sdk.builders import dashboard, prometheus, table
from grafana_foundation_sdk.cog.builder import Builder
from grafana_foundation_sdk.cog.variants import Dataquery
from grafana_foundation_sdk.models import dashboard as dm

from kwatt_dashboards.common import (
    CLUSTER,
    DS,
    KWH,
    NS,
    UID_RUNS,
    UID_WORKLOAD,
    bars,
    cluster_variable,
    drill,
    new_dashboard,
    over_range,
    query_variable,
    row,
    sel,
    target,
    ts,
)
from kwatt_dashboards.namespace import namespace_variable

WL = "kwatt_workload_energy_joules_total"
BY_RUN = "cluster, namespace, workload_kind, workload"
# Kinds that make a run (finite, named by their user); docs/kubernetes.md says which
# operator chain each comes from.
RUN_KINDS = "TrainJob|JobSet|PyTorchJob|MPIJob|TFJob|XGBoostJob|PaddleJob|JAXJob|RayJob|Job"
# Kinds that serve models (long-running).
SERVER_KINDS = "InferenceService|LeaderWorkerSet|RayService"
RUN_SEL = sel(NS, f'workload_kind=~"{RUN_KINDS}"', 'workload_kind=~"$workload_kind"')
SERVER_SEL = sel(NS, f'workload_kind=~"{SERVER_KINDS}"')
POWER_RULE = "workload:kwatt_power_watts:sum_rate5m"  # recorded by kwatt.power
# Subqueries step at Grafana's interval for the panel (range / max data points), so a
# longer range is read at a coarser step; $__interval_ms converts steps into time.
STEP = "$__interval"
STEP_HOURS = "$__interval_ms / 1000 / 3600"
STEP_SECONDS = "$__interval_ms / 1000"


def run_queries(selector: str) -> dict[str, str]:
    """Column title -> instant query, one value per run."""
    pods = (f"max by (cluster, node, namespace, pod, workload_kind, workload) "
            f"(kwatt_pod_info{selector})")
    gpus = (f"count by ({BY_RUN}) (\n"
            f"  max by (cluster, node, uuid, namespace, pod) "
            f"(kwatt_gpu_allocation_info{sel(NS)})\n"
            f"  * on (cluster, node, namespace, pod) group_left (workload_kind, workload)\n"
            f"  {pods}\n)")
    power = f"sum by ({BY_RUN}) ({POWER_RULE}{selector})"
    return {
        "Energy": f"sum by ({BY_RUN}) (increase({WL}{selector}[$__range])) / {KWH}",
        "GPU-hours": f"sum_over_time(({gpus})[$__range:{STEP}]) * {STEP_HOURS}",
        # Carbon and cost integrate the recorded per-second rates, each at the intensity and
        # price of its moment (kwatt.carbon-cost-rate), never energy x the latest value.
        "Carbon": (f"sum by ({BY_RUN}) (\n  "
                   f"{over_range(f'workload:kwatt_carbon_grams_per_second:rate5m{selector}')}"
                   "\n)"),
        "Cost": (f"sum by ({BY_RUN}) (\n  "
                 f"{over_range(f'workload:kwatt_cost_per_second:rate5m{selector}')}\n)"),
        "Duration": f"count_over_time(({power} > 0)[$__range:{STEP}]) * {STEP_SECONDS}",
        "Peak power": f"max_over_time(({power})[$__range:{STEP}])",
    }


def run_table(currency_unit: str) -> Builder[dm.Panel]:
    units = {"Energy": "kwatth", "GPU-hours": "h", "Carbon": "massg",
             "Cost": currency_unit, "Duration": "s", "Peak power": "watt"}
    queries = run_queries(RUN_SEL)
    targets: list[Builder[Dataquery]] = [target(expr, title, instant=True, table_format=True)
                                         for title, expr in queries.items()]
    refs = [chr(ord("A") + index) for index in range(len(queries))]
    renames = {f"Value #{ref}": title for ref, title in zip(refs, queries, strict=True)}
    panel = (table.Panel()
             .title("Training runs")
             .description(
                 "One row per run (TrainJob, JobSet, PyTorchJob, MPIJob, RayJob, Job, ...) "
                 "with energy in the range: energy from the workload counter (one series per "
                 "run, restarted and short-lived pods included); GPU-hours from GPU "
                 "allocations (kubelet PodResources) joined to the pods' workload; carbon "
                 "and cost integrated from the recorded rates at each moment's intensity "
                 "and price (with PUE); duration = time drawing "
                 "power and peak power, both sampled at the panel's interval. Sorted by energy.")
             .unit("none")
             .datasource(DS)
             .targets(targets)
             .height(12).span(24)
             .with_transformation(dm.DataTransformerConfig(id_val="merge", options={}))
             .with_transformation(dm.DataTransformerConfig(id_val="organize", options={
                 "excludeByName": {"Time": True},
                 "renameByName": renames}))
             .sort_by([common_builders.TableSortByFieldState().display_name("Energy").desc(True)])
             .data_links([drill(UID_WORKLOAD, "Workload ${__field.labels.workload}",
                                namespace="namespace", workload="workload")]))
    for index, query in enumerate(targets):
        assert isinstance(query, prometheus.Dataquery)
        query.ref_id(refs[index])
    for title, unit in units.items():
        panel = panel.override_by_name(title, [dm.DynamicConfigValue(id_val="unit",
                                                                     value=unit)])
    return panel


def build(currency_unit: str) -> dashboard.Dashboard:
    variables = [
        cluster_variable(), namespace_variable(),
        query_variable("workload_kind", "Run kind", WL,
                       [f"{CLUSTER}", NS, f'workload_kind=~"{RUN_KINDS}"'],
                       "Kind of the object that owns the run's pods at the top of their "
                       "ownerReferences (TrainJob, JobSet, PyTorchJob, RayJob, Job, ...)."),
    ]
    per_server_day = (f"sum by ({BY_RUN}) (workload:kwatt_energy_joules:increase1d"
                      f"{SERVER_SEL}) / {KWH}")
    return (
        new_dashboard(UID_RUNS, "Training runs and served models: energy, GPU-hours, carbon, "
                      "cost, duration and peak power of each run, and the daily energy of "
                      "each model server.", variables)
        .with_row(row("Training runs"))
        .with_panel(run_table(currency_unit))
        .with_panel(ts(
            "Power of the runs", "Power of each run over time (recording rule "
            f"{POWER_RULE}), all components.", "watt",
            target(f"sum by (namespace, workload_kind, workload) ({POWER_RULE}{RUN_SEL})",
                   "{{namespace}}/{{workload}} ({{workload_kind}})"), width=24))
        .with_row(row("Served models"))
        .with_panel(ts(
            "Energy per model server per day", "Energy of each InferenceService, "
            "LeaderWorkerSet and RayService over the 24 hours before each point (recording "
            "rule workload:kwatt_energy_joules:increase1d).", "kwatth",
            target(per_server_day, "{{namespace}}/{{workload}} ({{workload_kind}})"),
            width=12))
        .with_panel(ts(
            "Joules per generated token per model server", "Power of the pods that "
            "generate tokens (vLLM, TGI, SGLang) divided by their token rate, per model "
            "server (recording rules workload:kwatt_serving_power_watts:rate5m and "
            "workload:kwatt_generated_tokens:rate5m of the AI efficiency group). Servers "
            "that report no tokens (Triton: requests only) have no line here; see the AI "
            "efficiency dashboard.", "joule",
            target(f"sum by ({BY_RUN}) (workload:kwatt_serving_power_watts:rate5m"
                   f"{SERVER_SEL})\n/ (sum by ({BY_RUN}) (workload:kwatt_generated_tokens"
                   f":rate5m{SERVER_SEL}) > 0)",
                   "{{namespace}}/{{workload}} ({{workload_kind}})"),
            width=12))
        .with_panel(bars(
            "Model servers by energy over range", "Energy of each model server over the "
            "range, from the workload counter.", "kwatth",
            target(f"sort_desc(sum by ({BY_RUN}) (increase({WL}{SERVER_SEL}[$__range])) "
                   f"/ {KWH})", "{{namespace}}/{{workload}} ({{workload_kind}})",
                   instant=True),
            links=[drill(UID_WORKLOAD, "Workload ${__field.labels.workload}",
                         namespace="namespace", workload="workload")], width=24))
    )
