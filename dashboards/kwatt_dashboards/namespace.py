"""Namespace: its workloads and pods over time, energy, carbon and cost."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from kwatt_dashboards.common import (
    INTEGRAL_MIN_STEP,
    KWH,
    NS,
    UID_NAMESPACE,
    UID_WORKLOAD,
    bars,
    cluster_variable,
    drill,
    grid,
    new_dashboard,
    over_range,
    query_variable,
    row,
    sel,
    single,
    target,
    ts,
)

NS_E = f"kwatt_namespace_energy_joules_total{sel(NS)}"
CT_E = f"kwatt_container_energy_joules_total{sel(NS)}"
# Workload views: this counter outlives pods, so short-lived pods count in increase().
WL_E = f"kwatt_workload_energy_joules_total{sel(NS)}"


def namespace_variable() -> dashboard.QueryVariable:
    return query_variable(
        "namespace", "Namespace", "kwatt_namespace_energy_joules_total", ['cluster=~"$cluster"'],
        "Namespaces kwatt has charged energy to. Host mode (no Kubernetes) has none: "
        "All then shows systemd units and containers.")


def build(currency_unit: str) -> dashboard.Dashboard:
    to_wl = drill(UID_WORKLOAD, "Workload ${__field.labels.workload}",
                  namespace="namespace", workload="workload")
    to_pod = drill(UID_WORKLOAD, "Pod ${__field.labels.pod}", namespace="namespace",
                   pod="pod")
    carbon = f"namespace:kwatt_carbon_grams_per_second:rate5m{sel(NS)}"
    embodied = f"namespace:kwatt_embodied_grams_per_second:rate5m{sel(NS)}"
    cost = f"namespace:kwatt_cost_per_second:rate5m{sel(NS)}"
    return (
        new_dashboard(UID_NAMESPACE, "Energy of one namespace: its workloads and pods over "
                      "time, carbon and cost.", [cluster_variable(), namespace_variable()])
        .with_row(row("Totals"))
        .with_panel(single(
            "Power now", "Power drawn by the namespace's containers now.", "watt",
            target(f"sum(rate({NS_E}[$__rate_interval]))", "power", instant=True)))
        .with_panel(single(
            "Energy over range", "Energy of the namespace over the range, finished pods "
            "included (kwatt_namespace_energy_joules_total keeps them).", "kwatth",
            target(f"sum(increase({NS_E}[$__range])) / {KWH}", "energy", instant=True)))
        .with_panel(single(
            "Carbon over range", "Operational: the integral of power x the node's grid "
            "intensity at each moment x PUE (namespace:kwatt_carbon_grams_per_second:rate5m). "
            "Embodied: the share of the nodes' amortised embodied carbon, by energy.",
            "massg",
            target(f"sum({over_range(carbon)})", "operational", instant=True),
            target(f"sum({over_range(embodied)})", "embodied", instant=True),
            min_interval=INTEGRAL_MIN_STEP))
        .with_panel(single(
            "Cost over range", "The integral of power x the price at each moment x PUE "
            "(namespace:kwatt_cost_per_second:rate5m).", currency_unit,
            target(f"sum by (currency) ({over_range(cost)})", "{{currency}}", instant=True),
            min_interval=INTEGRAL_MIN_STEP))
        .with_row(row("Workloads and pods"))
        .with_panel(ts(
            "Power by workload", "Power of each workload: the top owner of its pods "
            "(Deployment, StatefulSet, CronJob, TrainJob, RayJob, InferenceService, ...). "
            "Click a series for the workload dashboard.", "watt",
            target(f"sum by (namespace, workload_kind, workload) "
                   f"(rate({WL_E}[$__rate_interval]))", "{{workload}} ({{workload_kind}})"),
            links=[to_wl], stacked=True))
        .with_panel(ts(
            "Power by pod", "Power of each pod. Click a series for the pod.", "watt",
            target(f"sum by (namespace, pod) (rate({CT_E}[$__rate_interval]))", "{{pod}}"),
            links=[to_pod]))
        .with_panel(bars(
            "Energy per workload over range", "Energy of each workload over the range.",
            "kwatth",
            target(f"sum by (namespace, workload_kind, workload) "
                   f"(increase({WL_E}[$__range])) / {KWH}",
                   "{{workload}} ({{workload_kind}})", instant=True), links=[to_wl]))
        .with_panel(bars(
            "Energy per pod over range", "Energy of each pod over the range (pods still "
            "running or inside the exporter's retention window).", "kwatth",
            target(f"topk(20, sum by (namespace, pod) (increase({CT_E}[$__range]))) / {KWH}",
                   "{{pod}}", instant=True), links=[to_pod]))
        .with_panel(ts(
            "Power by component", "Namespace power by component (cpu, dram, gpu).", "watt",
            target(f"sum by (component) (rate({NS_E}[$__rate_interval]))", "{{component}}"),
            stacked=True))
        .with_panel(ts(
            "Energy, rolling 24h", "Recording rule namespace:kwatt_energy_joules:increase1d: "
            "the namespace's energy in the 24 hours before each point.", "kwatth",
            target(f"sum(namespace:kwatt_energy_joules:increase1d{sel(NS)}) / {KWH}", "kWh"),
            width=6))
        .with_panel(ts(
            "Carbon, rolling 24h", "Recording rule namespace:kwatt_carbon_grams:increase1d: "
            "grams CO2e of the 24 hours before each point, PUE included.", "massg",
            target(f"sum(namespace:kwatt_carbon_grams:increase1d{sel(NS)})", "CO2e"),
            width=6))
        .with_panel(grid(
            "Pods", "Pods of the namespace with workload and QoS class (kwatt_pod_info, from "
            "the Kubernetes API).", "none",
            target(f"kwatt_pod_info{sel(NS)}", instant=True, table_format=True),
            links=[to_pod]))
        .with_panel(grid(
            "GPUs held", "GPUs allocated to the namespace's containers (kubelet "
            "PodResources).", "none",
            target(f"kwatt_gpu_allocation_info{sel(NS)}", instant=True, table_format=True)))
    )
