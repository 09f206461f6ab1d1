"""The kwatt_gpu_* metric families, rendered from the GPU stage's snapshot of a cycle.

Like ``KwattCollector``: no I/O on scrape, families built fresh from an immutable value.
The exporter renders them through ``render_gpu`` from the sampler's published cycle, so
GPU and node counters in one scrape always come from the same cycle.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


@dataclass(frozen=True)
class GpuRow:
    index: int
    uuid: str
    model: str
    mig: bool
    up: bool
    energy_joules: float  # accumulated while kwatt runs; never decreases
    power_watts: float | None  # average over the last interval
    utilisation: float | None  # 0..1 over the last interval; None in MIG mode
    vendor: str = "nvidia"
    driver_version: str = ""


@dataclass(frozen=True)
class AllocationRow:
    gpu: int
    uuid: str
    namespace: str
    pod: str
    container: str
    resource: str


@dataclass(frozen=True)
class GpuSnapshot:
    driver_version: str = ""
    gpus: tuple[GpuRow, ...] = ()
    allocations: tuple[AllocationRow, ...] = ()
    read_seconds: float | None = None  # how long the last reading of every GPU took
    read_overruns: int = 0  # readings still running when the next was due


class GpuCollector(Collector):
    def __init__(self, snapshot: Callable[[], GpuSnapshot], node: str) -> None:
        self._snapshot = snapshot
        self._node = node

    def collect(self) -> Iterator[Metric]:
        snap = self._snapshot()
        node = self._node
        energy = CounterMetricFamily(
            "kwatt_gpu_energy_joules_total",
            "Energy used by one physical GPU since kwatt started (NVML energy counter, or "
            "integrated power where the GPU has none).", labels=("node", "gpu", "uuid"))
        power = GaugeMetricFamily(
            "kwatt_gpu_power_watts", "Average power of one physical GPU over the last "
            "sample interval.", labels=("node", "gpu", "uuid"))
        utilisation = GaugeMetricFamily(
            "kwatt_gpu_utilization_ratio", "Fraction of the last interval in which the GPU "
            "ran kernels (NVML utilisation; absent in MIG mode).",
            labels=("node", "gpu", "uuid"))
        info = GaugeMetricFamily(
            "kwatt_gpu_info", "GPU vendor, model, driver and MIG mode (AMD: compute "
            "partitions); always 1.",
            labels=("node", "gpu", "uuid", "model", "driver_version", "mig", "vendor"))
        up = GaugeMetricFamily(
            "kwatt_gpu_up", "1 when the GPU answered NVML in the last sample, 0 while it is "
            "lost or failing (its energy is then not counted).",
            labels=("node", "gpu", "uuid"))
        for gpu in snap.gpus:
            labels = (node, str(gpu.index), gpu.uuid)
            energy.add_metric(labels, gpu.energy_joules)
            up.add_metric(labels, 1.0 if gpu.up else 0.0)
            if gpu.up and gpu.power_watts is not None:
                power.add_metric(labels, gpu.power_watts)
            if gpu.up and gpu.utilisation is not None:
                utilisation.add_metric(labels, gpu.utilisation)
            info.add_metric((*labels, gpu.model, gpu.driver_version or snap.driver_version,
                             "true" if gpu.mig else "false", gpu.vendor), 1.0)
        allocation = GaugeMetricFamily(
            "kwatt_gpu_allocation_info", "Which container holds which GPU, from the kubelet "
            "PodResources API; always 1.",
            labels=("node", "gpu", "uuid", "namespace", "pod", "container", "resource"))
        for row in snap.allocations:
            allocation.add_metric((node, str(row.gpu), row.uuid, row.namespace, row.pod,
                                   row.container, row.resource), 1.0)
        duration = GaugeMetricFamily(
            "kwatt_gpu_read_duration_seconds", "How long the last reading of every GPU "
            "took on the GPU thread (its NVML calls).",
            labels=("node",))
        if snap.read_seconds is not None:
            duration.add_metric((node,), snap.read_seconds)
        overruns = CounterMetricFamily(
            "kwatt_gpu_read_overruns_total", "GPU readings still running when the next was "
            "due (slow or hung driver); their energy is booked when they complete.",
            labels=("node",))
        overruns.add_metric((node,), float(snap.read_overruns))
        yield from (energy, power, utilisation, info, up, allocation, duration, overruns)


def render_gpu(node: str) -> Callable[[object | None], Iterable[Metric]]:
    """Renders a published GPU stage snapshot (None before the first cycle: no GPU rows)."""
    def render(snapshot: object | None) -> Iterable[Metric]:
        snap = snapshot if isinstance(snapshot, GpuSnapshot) else GpuSnapshot()
        return GpuCollector(lambda: snap, node).collect()
    return render
