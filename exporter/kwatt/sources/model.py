"""Estimated node power where RAPL cannot be read (most cloud VMs).

Linear per-vCPU model: P = vcpus * (W_idle + (W_max - W_idle) * utilisation), and optionally
a constant memory term per GB. Coefficients default to the Cloud Carbon Footprint averages
for AWS and are configurable.
"""

from __future__ import annotations

from dataclasses import dataclass

from kwatt.config import ModelConfig

SOURCE = "estimated"


@dataclass(frozen=True)
class EstimatedPower:
    """Estimated average power of one component over an interval, and its static part."""

    component: str
    watts: float
    idle_watts: float


def estimate_node_power(vcpus: int, utilisation: float, memory_bytes: int | None,
                        model: ModelConfig) -> list[EstimatedPower]:
    u = min(max(utilisation, 0.0), 1.0)
    idle = vcpus * model.cpu_watts_idle_per_vcpu
    out = [EstimatedPower("cpu", idle + vcpus * (model.cpu_watts_max_per_vcpu
                                                 - model.cpu_watts_idle_per_vcpu) * u, idle)]
    if model.estimate_dram and memory_bytes is not None:
        # The model has no activity term for memory: all of it is static power.
        dram = memory_bytes / 1e9 * model.dram_watts_per_gb
        out.append(EstimatedPower("dram", dram, dram))
    return out
