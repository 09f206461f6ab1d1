"""Cluster energy: what the whole cluster draws and who uses it."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from kwatt_dashboards.common import (
    INTEGRAL_MIN_STEP,
    KWH,
    UID_AI,
    UID_CLUSTER,
    UID_NAMESPACE,
    UID_RUNS,
    UID_WORKLOAD,
    bars,
    cluster_variable,
    drill,
    new_dashboard,
    over_range,
    pie,
    row,
    sel,
    single,
    target,
    ts,
)

NODE_E = f"kwatt_node_energy_joules_total{sel()}"
# Cluster-wide panels read recorded rates (rules.py, group kwatt.power): at 1,000 nodes
# raw container/workload series take seconds to tens of seconds (docs/scale-cluster.md).
NODE_P = f"node:kwatt_power_watts:sum_rate5m{sel()}"
NS_P = f"namespace:kwatt_power_watts:sum_rate5m{sel()}"
WL_P = f"workload:kwatt_power_watts:sum_rate5m{sel()}"
UN_P = f"node_reason:kwatt_unattributed_power_watts:sum_rate5m{sel()}"


def build(currency_unit: str) -> dashboard.Dashboard:
    to_ns = drill(UID_NAMESPACE, "Namespace ${__field.labels.namespace}",
                  namespace="namespace")
    to_ai = drill(UID_AI, "AI efficiency of ${__field.labels.namespace}",
                  namespace="namespace")
    to_wl = drill(UID_WORKLOAD, "Workload ${__field.labels.workload}",
                  namespace="namespace", workload="workload")
    return (
        new_dashboard(UID_CLUSTER, "Power, energy, carbon and cost of the whole cluster, and "
                      "the namespaces and workloads that use it.", [cluster_variable()])
        .with_row(row("Now and over the selected range"))
        .with_panel(single(
            "Power now", "Node power by component (cpu = RAPL package or psys, dram, gpu), "
            "averaged over 5 minutes (recording rule node:kwatt_power_watts:sum_rate5m).", "watt",
            target(f"sum by (component) ({NODE_P})", "{{component}}", instant=True)))
        .with_panel(single(
            "Energy today", "Energy used by all nodes since local midnight.", "kwatth",
            target(f"sum(increase({NODE_E}[$__range])) / {KWH}", "energy", instant=True),
            time_from="now/d"))
        .with_panel(single(
            "Energy over range", "Energy used by all nodes over the dashboard time range.",
            "kwatth", target(f"sum(increase({NODE_E}[$__range])) / {KWH}", "energy",
                             instant=True)))
        .with_panel(single(
            "Carbon over range", "Operational emissions over the range, the integral of "
            "each node's power x its grid intensity at that moment x PUE (recording rule "
            "node:kwatt_carbon_grams_per_second:rate5m), and beside it the embodied carbon "
            "of the nodes' hardware amortised over the same time (SCI's M).", "massg",
            target(f"sum({over_range(f'node:kwatt_carbon_grams_per_second:rate5m{sel()}')})",
                   "operational", instant=True),
            target(f"sum({over_range(f'kwatt_embodied_grams_per_second{sel()}')})",
                   "embodied", instant=True), min_interval=INTEGRAL_MIN_STEP))
        .with_panel(single(
            "Cost over range", "Energy cost over the range, the integral of each node's "
            "power x its price at that moment x PUE (node:kwatt_cost_per_second:rate5m), "
            "per currency.", currency_unit,
            target(f"sum by (currency) "
                   f"({over_range(f'node:kwatt_cost_per_second:rate5m{sel()}')})",
                   "{{currency}}", instant=True), min_interval=INTEGRAL_MIN_STEP))
        .with_panel(single(
            "Carbon rate now", "Grams CO2e per hour at the current power draw and the "
            "current grid intensity, PUE included.", "suffix:g/h",
            target(f"sum(node:kwatt_carbon_grams_per_second:rate5m{sel()}) * 3600", "g/h",
                   instant=True)))
        .with_row(row("Power and sources"))
        .with_panel(ts(
            "Power by component", "Node power by component and source (rapl, nvml: measured; "
            "estimated: power model), summed over nodes (recording rule "
            "node:kwatt_power_watts:sum_rate5m).", "watt",
            target(f"sum by (component, source) ({NODE_P})",
                   "{{component}} ({{source}})"), stacked=True))
        .with_panel(pie(
            "Measured vs estimated", "Share of energy over the range that was measured (rapl, "
            "nvml) or estimated by the power model.", "kwatth",
            target(f"sum by (source) (increase({NODE_E}[$__range])) / {KWH}", "{{source}}",
                   instant=True)))
        .with_panel(ts(
            "Unattributed share", "Share of node energy charged to no container: idle (static "
            "power), system (processes outside containers), unallocated (GPUs nobody holds), "
            "unidentified (GPU holders kwatt cannot map to a container). Recording rules "
            "node_reason:kwatt_unattributed_power_watts:sum_rate5m over "
            "node:kwatt_power_watts:sum_rate5m.",
            "percentunit",
            target(f"sum by (reason) ({UN_P})\n/ on () group_left () sum({NODE_P})",
                   "{{reason}}"), width=6))
        .with_row(row("Who uses it"))
        .with_panel(bars(
            "Top namespaces by energy", "The ten namespaces with most energy over the range, "
            "finished pods included: the integral of the recording rule "
            "namespace:kwatt_power_watts:sum_rate5m. Click a bar for the namespace dashboard.",
            "kwatth",
            target(f"topk(10, sum by (namespace) ({over_range(NS_P)})) / {KWH}",
                   "{{namespace}}", instant=True), links=[to_ns, to_ai],
            min_interval=INTEGRAL_MIN_STEP))
        .with_panel(bars(
            "Top workloads by energy", "The ten workloads (Deployment, StatefulSet, CronJob, "
            "TrainJob, InferenceService, ...: the top owner of their pods) with most energy "
            "over the range: the integral of the recording rule "
            "workload:kwatt_power_watts:sum_rate5m. Click for the workload dashboard, or for "
            "training runs and served models.",
            "kwatth",
            target(f"topk(10, sum by (namespace, workload_kind, workload) "
                   f"({over_range(WL_P)})) / {KWH}",
                   "{{namespace}}/{{workload}} ({{workload_kind}})", instant=True),
            links=[to_wl, drill(UID_RUNS, "Training runs and served models",
                                namespace="namespace")], min_interval=INTEGRAL_MIN_STEP))
        .with_panel(bars(
            "Top namespaces by carbon", "Grams CO2e over the range per namespace: "
            "operational (integral of its power x its nodes' intensity at each moment x PUE) "
            "beside embodied (its share of its nodes' energy x their amortised embodied "
            "carbon).", "massg",
            target("topk(10, sum by (namespace) ("
                   + over_range(f"namespace:kwatt_carbon_grams_per_second:rate5m{sel()}")
                   + "))", "{{namespace}} operational", instant=True),
            target("topk(10, sum by (namespace) ("
                   + over_range(f"namespace:kwatt_embodied_grams_per_second:rate5m{sel()}")
                   + "))", "{{namespace}} embodied", instant=True),
            links=[to_ns], min_interval=INTEGRAL_MIN_STEP))
        .with_panel(bars(
            "Top namespaces by cost", "Energy cost over the range per namespace, the "
            "integral of its power x the price at each moment x PUE.", currency_unit,
            target("topk(10, sum by (namespace, currency) ("
                   + over_range(f"namespace:kwatt_cost_per_second:rate5m{sel()}") + "))",
                   "{{namespace}} ({{currency}})", instant=True), links=[to_ns],
            min_interval=INTEGRAL_MIN_STEP))
        .with_panel(ts(
            "Power by namespace", "Power drawn by each namespace's containers (recording "
            "rule namespace:kwatt_power_watts:sum_rate5m).", "watt",
            target(f"sum by (namespace) ({NS_P})", "{{namespace}}"),
            links=[to_ns], stacked=True))
        .with_panel(ts(
            "Energy per namespace, rolling 24h", "Recording rule "
            "namespace:kwatt_energy_joules:increase1d: energy of the 24 hours before each "
            "point.", "kwatth",
            target(f"sum by (namespace) (namespace:kwatt_energy_joules:increase1d{sel()}) "
                   f"/ {KWH}", "{{namespace}}"), links=[to_ns]))
    )
