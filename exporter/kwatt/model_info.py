"""Which estimation-model coefficients this node uses (fixed at start), as metrics."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kwatt.sources.model import Coefficients


class EstimationModelCollector(Collector):
    """kwatt_estimation_model_info and kwatt_estimation_model_cpu_watts_per_vcpu.

    Always exposed: they say what the model would use; whether it is used shows in
    kwatt_node_energy_joules_total{source="estimated"}.
    """

    def __init__(self, coefficients: Coefficients, node: str) -> None:
        self._coefficients = coefficients
        self._node = node

    def collect(self) -> Iterator[Metric]:
        c = self._coefficients
        info = GaugeMetricFamily(
            "kwatt_estimation_model_info",
            "Coefficients of the per-vCPU estimation model on this node and why they were "
            "chosen (basis: cpuinfo, instance-type, configured, default); 1",
            labels=("node", "basis", "microarchitecture", "instance_type"))
        info.add_metric((self._node, c.basis, c.microarchitecture, c.instance_type), 1.0)
        yield info
        watts = GaugeMetricFamily(
            "kwatt_estimation_model_cpu_watts_per_vcpu",
            "Estimation model: watts per vCPU at idle and at full load",
            labels=("node", "bound"))
        watts.add_metric((self._node, "idle"), c.idle_watts_per_vcpu)
        watts.add_metric((self._node, "max"), c.max_watts_per_vcpu)
        yield watts
