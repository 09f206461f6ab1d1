"""GPUs: power and utilisation, who holds each GPU, allocated-but-idle waste, MIG/sharing."""

from __future__ import annotations

from grafana_foundation_sdk.builders import dashboard

from kwatt_dashboards.common import (
    KWH,
    NODE,
    UID_GPU,
    UID_NAMESPACE,
    UID_WORKLOAD,
    bars,
    cluster_variable,
    drill,
    grid,
    new_dashboard,
    query_variable,
    row,
    sel,
    single,
    target,
    ts,
)

G = sel(NODE)
GPU_ENERGY = sel(NODE, 'component="gpu"')
UNALLOCATED = sel(NODE, 'component="gpu"', 'reason="unallocated"')
MIG = sel(NODE, 'mig!~"|false"')
ALLOC = f"kwatt_gpu_allocation_info{G}"
IDLE_GPUS = (f"(max by (cluster, node, uuid) (max_over_time(kwatt_gpu_utilization_ratio{G}"
             f"[$__range])) < $idle_utilization)")


def idle_variable() -> dashboard.TextBoxVariable:
    return (dashboard.TextBoxVariable("idle_utilization").label("Idle below")
            .description("A GPU counts as idle when its peak utilisation over the range "
                         "stays under this ratio (the alert KwattGpuAllocatedIdle uses 0.05).")
            .default_value("0.05"))


def build() -> dashboard.Dashboard:
    variables = [
        cluster_variable(),
        query_variable("node", "Node", "kwatt_gpu_info", ['cluster=~"$cluster"'],
                       "Nodes with GPUs kwatt can read (NVML)."),
        idle_variable(),
    ]
    to_pod = drill(UID_WORKLOAD, "Pod ${__field.labels.pod}", namespace="namespace",
                   pod="pod")
    to_ns = drill(UID_NAMESPACE, "Namespace ${__field.labels.namespace}",
                  namespace="namespace")
    return (
        new_dashboard(UID_GPU, "Per-GPU power and utilisation, who holds each GPU, GPUs "
                      "allocated but idle and the energy they burn, MIG and shared GPUs.",
                      variables)
        .with_row(row("Power and utilisation"))
        .with_panel(ts(
            "Power per GPU", "Board power of each GPU (NVML).", "watt",
            target(f"kwatt_gpu_power_watts{G}", "{{node}} GPU {{gpu}}")))
        .with_panel(ts(
            "Utilisation per GPU", "SM activity of each GPU over the last sample interval.",
            "percentunit",
            target(f"kwatt_gpu_utilization_ratio{G}", "{{node}} GPU {{gpu}}")))
        .with_panel(ts(
            "GPUs answering NVML", "kwatt_gpu_up: 1 while the GPU answers NVML; while 0 its "
            "energy is not counted (GPU lost, Xid error, driver reload).", "short",
            target(f"kwatt_gpu_up{G}", "{{node}} GPU {{gpu}}")))
        .with_panel(bars(
            "GPU energy by namespace over range", "GPU energy charged to each namespace; "
            "an exclusively held GPU charges its holder for idle power too.", "kwatth",
            target(f"sum by (namespace) (increase(kwatt_namespace_energy_joules_total"
                   f"{GPU_ENERGY}[$__range])) "
                   f"/ {KWH}", "{{namespace}}", instant=True), links=[to_ns]))
        .with_panel(single(
            "Unallocated GPU energy over range", "Energy of GPUs nobody held (unattributed, "
            "reason unallocated).", "kwatth",
            target(f"sum(increase(kwatt_unattributed_energy_joules_total"
                   f"{UNALLOCATED}"
                   f"[$__range])) / {KWH}", "unallocated", instant=True)))
        .with_panel(single(
            "Energy of allocated but idle GPUs", "Energy over the range of GPUs that were "
            "allocated and whose peak utilisation stayed under the idle threshold.",
            "kwatth",
            target(f"sum(\n  sum by (cluster, node, uuid) (increase(kwatt_gpu_energy_joules_total"
                   f"{G}[$__range]))\n  and on (cluster, node, uuid) {IDLE_GPUS}\n"
                   f"  and on (cluster, node, uuid) count by (cluster, node, uuid) ({ALLOC})\n"
                   f") / {KWH}", "idle but allocated", instant=True)))
        .with_row(row("Who holds the GPUs"))
        .with_panel(grid(
            "Who holds each GPU", "Allocations from the kubelet PodResources API: GPU, "
            "namespace, pod, container and the resource name requested.", "none",
            target(ALLOC, instant=True, table_format=True), links=[to_pod]))
        .with_panel(grid(
            "Allocated but idle GPUs", "Allocated GPUs whose peak utilisation over the range "
            "stayed under the idle threshold; value = that peak.", "percentunit",
            target(f"max by (cluster, node, uuid, gpu, namespace, pod, container) ({ALLOC})\n"
                   f"* on (cluster, node, uuid) group_left () {IDLE_GPUS}", instant=True,
                   table_format=True), links=[to_pod]))
        .with_panel(grid(
            "MIG instances", "GPUs partitioned with MIG (kwatt_gpu_info mig label).", "none",
            target(f"kwatt_gpu_info{MIG}",
                   instant=True, table_format=True)))
        .with_panel(grid(
            "Shared GPUs", "GPUs held by more than one container (time-slicing or MPS); "
            "value = number of holders.", "none",
            target(f"count by (cluster, node, gpu, uuid) ({ALLOC}) > 1", instant=True,
                   table_format=True)))
        .with_panel(grid(
            "GPU inventory", "Every GPU with model, driver and MIG mode.", "none",
            target(f"kwatt_gpu_info{G}", instant=True, table_format=True)))
    )
