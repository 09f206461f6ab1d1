"""Workload and pod: power by container and component, energy, GPU share."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from kwatt_dashboards.common import (
    INTEGRAL_MIN_STEP,
    KWH,
    NS,
    POD,
    UID_GPU,
    UID_NODE,
    UID_WORKLOAD,
    WL,
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
from kwatt_dashboards.namespace import namespace_variable

CT = "kwatt_container_energy_joules_total"
CT_E = f"{CT}{sel(NS, WL, POD)}"
GPU_ONLY = 'component="gpu"'


def build(currency_unit: str) -> dashboard.Dashboard:
    variables = [
        cluster_variable(), namespace_variable(),
        # From the workload counter, which outlives pods: a CronJob between runs is listed.
        query_variable("workload", "Workload", "kwatt_workload_energy_joules_total",
                       ['cluster=~"$cluster"', NS],
                       "Top owner of the pods: Deployment, StatefulSet, DaemonSet, CronJob, "
                       "Job, TrainJob, JobSet, RayJob, LeaderWorkerSet, InferenceService, ... "
                       "or the pod itself; in host mode a systemd unit or container. Listed "
                       "for 25 h after its last pod."),
        query_variable("pod", "Pod", CT, ['cluster=~"$cluster"', NS, WL],
                       "Pods of the workload (running or inside the retention window)."),
    ]
    to_node = drill(UID_NODE, "Node ${__field.labels.node}", node="node")
    to_gpu = drill(UID_GPU, "GPUs of ${__field.labels.node}", node="node")
    carbon = f"pod:kwatt_carbon_grams_per_second:rate5m{sel(NS, WL, POD)}"
    embodied = f"pod:kwatt_embodied_grams_per_second:rate5m{sel(NS, WL, POD)}"
    cost = f"pod:kwatt_cost_per_second:rate5m{sel(NS, WL, POD)}"
    return (
        new_dashboard(UID_WORKLOAD, "One workload or pod: power by container and component, "
                      "energy, carbon, cost and GPU share. Selecting a workload needs "
                      "--metrics.level workload or finer, a pod pod or finer; at coarser "
                      "levels the selectors offer All only.", variables)
        .with_row(row("Totals"))
        .with_panel(single(
            "Power now", "Power of the selected pods now.", "watt",
            target(f"sum(rate({CT_E}[$__rate_interval]))", "power", instant=True)))
        .with_panel(single(
            "Energy over range", "Energy of the selected pods over the range.", "kwatth",
            target(f"sum(increase({CT_E}[$__range])) / {KWH}", "energy", instant=True)))
        .with_panel(single(
            "Carbon over range", "Operational: the integral of power x the node's grid "
            "intensity at each moment x PUE (pod:kwatt_carbon_grams_per_second:rate5m). "
            "Embodied: the share of the nodes' amortised embodied carbon, by energy.",
            "massg",
            target(f"sum({over_range(carbon)})", "operational", instant=True),
            target(f"sum({over_range(embodied)})", "embodied", instant=True),
            min_interval=INTEGRAL_MIN_STEP))
        .with_panel(single(
            "Cost over range", "The integral of power x the price at each moment x PUE "
            "(pod:kwatt_cost_per_second:rate5m).", currency_unit,
            target(f"sum by (currency) ({over_range(cost)})", "{{currency}}", instant=True),
            min_interval=INTEGRAL_MIN_STEP))
        .with_row(row("Containers"))
        .with_panel(ts(
            "Power by container and component", "Each container's power, split into cpu, "
            "dram and gpu.", "watt",
            target(f"sum by (node, pod, container, component) (rate({CT_E}[$__rate_interval]))",
                   "{{pod}}/{{container}} {{component}}"), links=[to_node]))
        .with_panel(ts(
            "Power by component", "The selected pods' power by component.", "watt",
            target(f"sum by (component) (rate({CT_E}[$__rate_interval]))", "{{component}}"),
            stacked=True))
        .with_panel(bars(
            "Energy by container over range", "Energy of each container over the range.",
            "joule",
            target(f"sum by (pod, container) (increase({CT_E}[$__range]))",
                   "{{pod}}/{{container}}", instant=True)))
        .with_panel(ts(
            "Energy, rolling 24h", "Recording rule workload:kwatt_energy_joules:increase1d: "
            "the workload's energy in the 24 hours before each point.", "kwatth",
            target(f"sum by (workload) (workload:kwatt_energy_joules:increase1d{sel(NS, WL)}) "
                   f"/ {KWH}", "{{workload}}")))
        .with_row(row("GPUs"))
        .with_panel(single(
            "GPU share of energy", "Share of the selected pods' energy over the range that "
            "GPUs used.", "percentunit",
            target(f"sum(increase({CT}{sel(NS, WL, POD, GPU_ONLY)}[$__range]))"
                   f"\n/ sum(increase({CT_E}[$__range]))", "GPU share",
                   instant=True)))
        .with_panel(grid(
            "GPUs held", "GPUs the selected pods hold, with model and MIG flag.", "none",
            target(f"kwatt_gpu_allocation_info{sel(NS, POD)}\n* on (cluster, node, uuid) "
                   f"group_left (model, mig) kwatt_gpu_info{sel()}", instant=True,
                   table_format=True), links=[to_gpu]))
        .with_panel(grid(
            "Pods", "The selected pods with workload and QoS class (kwatt_pod_info).", "none",
            target(f"kwatt_pod_info{sel(NS, WL, POD)}", instant=True, table_format=True)))
    )
