"""Node: RAPL zones, idle baseline, power sources and their health."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from kwatt_dashboards.common import (
    NODE,
    UID_EXPORTER,
    UID_NODE,
    UID_WORKLOAD,
    bars,
    cluster_variable,
    drill,
    new_dashboard,
    query_variable,
    row,
    sel,
    single,
    target,
    ts,
)

N = sel(NODE)
NODE_E = f"kwatt_node_energy_joules_total{N}"
UN_E = f"kwatt_unattributed_energy_joules_total{N}"
IDLE_E = "kwatt_unattributed_energy_joules_total" + sel(NODE, 'reason="idle"')
CT_E = f"kwatt_container_energy_joules_total{N}"
PLATFORM_E = f"kwatt_platform_energy_joules_total{N}"
INSIDE_E = "kwatt_node_energy_joules_total" + sel(NODE, 'component=~"cpu|dram|gpu"')


def node_variable() -> dashboard.QueryVariable:
    return query_variable("node", "Node", "kwatt_build_info", ['cluster=~"$cluster"'],
                          "Nodes running the kwatt exporter.")


def build() -> dashboard.Dashboard:
    to_wl = drill(UID_WORKLOAD, "Workload ${__field.labels.workload}",
                  namespace="namespace", workload="workload")
    to_health = drill(UID_EXPORTER, "Exporter on ${__field.labels.node}", node="node")
    return (
        new_dashboard(UID_NODE, "One node: power by component and source, raw RAPL zones, "
                      "the idle baseline, and whether each source reads fine.",
                      [cluster_variable(), node_variable()])
        .with_row(row("Power"))
        .with_panel(ts(
            "Node power by component and source", "Non-overlapping components (cpu, dram, "
            "gpu, other) and where the number comes from (rapl, nvml, hwmon, estimated). "
            "On a node with a platform meter the stack adds up to the meter: other is the "
            "meter minus cpu, dram and gpu.", "watt",
            target(f"sum by (node, component, source) (rate({NODE_E}[$__rate_interval]))",
                   "{{node}} {{component}} ({{source}})"), stacked=True))
        .with_panel(ts(
            "Platform meter against RAPL and GPUs", "The whole-node meter (each platform "
            "sensor, by source) against the sum of what kwatt measures inside it (cpu, dram, "
            "gpu). The gap is the other component: PSU losses, fans, NICs, storage, the "
            "board. Empty on nodes without a meter.", "watt",
            target(f"sum by (node, source, sensor) (rate({PLATFORM_E}[$__rate_interval]))",
                   "{{node}} meter {{source}} {{sensor}}"),
            target(f"sum by (node) (rate({INSIDE_E}[$__rate_interval]))",
                   "{{node}} cpu + dram + gpu")))
        .with_panel(ts(
            "RAPL zones", "Raw RAPL zones, wrap-corrected. Zones overlap (core and uncore "
            "are inside package; psys covers the platform): compare, never add.", "watt",
            target(f"sum by (node, zone, index) (rate(kwatt_rapl_zone_energy_joules_total{N}"
                   f"[$__rate_interval]))", "{{node}} {{zone}}-{{index}}")))
        .with_panel(ts(
            "Idle baseline", "Static power not charged to workloads (unattributed, reason "
            "idle): the learned or configured idle baseline, or the idle share of energy "
            "while none is known.", "watt",
            target(f"sum by (node, component) (rate({IDLE_E}[$__rate_interval]))",
                   "{{node}} {{component}} idle")))
        .with_panel(ts(
            "Attributed and unattributed power", "Power charged to containers against power "
            "charged to no one, by reason. They add up to node power.", "watt",
            target(f"sum by (node) (rate({CT_E}[$__rate_interval]))", "{{node}} containers"),
            target(f"sum by (node, reason) (rate({UN_E}[$__rate_interval]))",
                   "{{node}} {{reason}}"), stacked=True))
        .with_panel(ts(
            "Power gauge from the exporter", "kwatt_node_power_watts: average power over the "
            "last sample interval, as the exporter computed it.", "watt",
            target(f"kwatt_node_power_watts{N}", "{{node}} {{component}} ({{source}})")))
        .with_panel(bars(
            "Top containers on the node", "Containers with most energy on this node over "
            "the range.", "joule",
            target(f"topk(10, sum by (namespace, workload, pod, container) "
                   f"(increase({CT_E}[$__range])))", "{{pod}}/{{container}}", instant=True),
            links=[to_wl]))
        .with_row(row("Sources"))
        .with_panel(single(
            "Sources up", "1 when the source (rapl, hwmon, model, procfs, cgroup, "
            "kubernetes, podresources, nvml) read without fault in the last sample.", "bool_yes_no",
            target(f"kwatt_source_up{N}", "{{node}} {{source}}", instant=True), width=12))
        .with_panel(ts(
            "Source errors", "Failed reads per second by source and reason (permission, "
            "absent, parse, timeout, api, implausible, negative_remainder: a platform meter "
            "read less than cpu+dram+gpu).", "short",
            target(f"sum by (node, source, reason) (rate(kwatt_source_errors_total{N}"
                   f"[$__rate_interval]))", "{{node}} {{source}} {{reason}}"),
            links=[to_health]))
    )
