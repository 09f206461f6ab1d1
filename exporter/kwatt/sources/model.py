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


# --------------------------------------------------------------- choosing the coefficients
#
# Per-vCPU min/max watts per CPU microarchitecture, from Cloud Carbon Footprint's
# coefficients (cloud-carbon-footprint/cloud-carbon-footprint,
# packages/core/src/compute/ComputeProcessorTypes.ts: min_watts_avg, max_watts_avg), which
# CCF derives from SPECpower_ssj2008 results (cloud-carbon-footprint/ccf-coefficients).
# Values are whole-server wall watts divided by hardware threads, at 0 % and 100 % load.
# A recognised microarchitecture that CCF gives no numbers for (Ice Lake, Sapphire Rapids,
# EPYC 4th gen, Neoverse V1/V2) uses the configured (default: CCF's AWS average) numbers.

CCF_WATTS_PER_VCPU: dict[str, tuple[float, float]] = {
    "Sandy Bridge": (2.17, 8.58),
    "Ivy Bridge": (3.04, 8.25),
    "Haswell": (1.00, 4.74),
    "Broadwell": (0.71, 3.69),
    "Skylake": (0.65, 4.26),
    "Cascade Lake": (0.64, 3.97),
    "Coffee Lake": (1.14, 5.42),
    "AMD EPYC 1st Gen": (0.82, 2.55),
    "AMD EPYC 2nd Gen": (0.47, 1.69),
    "AMD EPYC 3rd Gen": (0.45, 2.02),
    # CCF gives both Graviton generations the EPYC 2nd Gen numbers (no SPECpower results).
    "AWS Graviton": (0.47, 1.69),
    "AWS Graviton2": (0.47, 1.69),
}

# Intel family 6 model numbers (Linux arch/x86/include/asm/intel-family.h).
_INTEL_FAMILY6: dict[int, str] = {
    0x2A: "Sandy Bridge", 0x2D: "Sandy Bridge",
    0x3A: "Ivy Bridge", 0x3E: "Ivy Bridge",
    0x3C: "Haswell", 0x3F: "Haswell", 0x45: "Haswell", 0x46: "Haswell",
    0x3D: "Broadwell", 0x47: "Broadwell", 0x4F: "Broadwell", 0x56: "Broadwell",
    0x4E: "Skylake", 0x5E: "Skylake", 0x55: "Skylake",
    0x8E: "Coffee Lake", 0x9E: "Coffee Lake",
    0x6A: "Ice Lake", 0x6C: "Ice Lake",
    0x8F: "Sapphire Rapids", 0xCF: "Emerald Rapids",
}
# Model 0x55 is Skylake-SP at steppings 0-4, Cascade Lake at 5-7, Cooper Lake at 10-11.
_CASCADE_LAKE_STEPPINGS = range(5, 8)

# Arm: (implementer, part) from /proc/cpuinfo (Arm's CPU part numbers).
_ARM_PARTS: dict[tuple[int, int], str] = {
    (0x41, 0xD08): "AWS Graviton",  # Cortex-A72
    (0x41, 0xD0C): "AWS Graviton2",  # Neoverse N1 (also Ampere Altra)
    (0x41, 0xD40): "Neoverse V1",  # Graviton3
    (0x41, 0xD4F): "Neoverse V2",  # Graviton4, NVIDIA Grace
}

# AWS instance families -> the microarchitectures CCF maps them to
# (packages/aws/src/lib/AWSInstanceTypes.ts); several: CCF averages them.
AWS_INSTANCE_FAMILIES: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("a1",), ("AWS Graviton",)),
    **dict.fromkeys(("c4", "d2", "x1", "x1e"), ("Haswell",)),
    **dict.fromkeys(("m4",), ("Broadwell", "Haswell")),
    **dict.fromkeys(("r4", "h1", "f1", "p2", "p3", "g3", "g3s"), ("Broadwell",)),
    **dict.fromkeys(("c5", "c5d", "c5n", "m5", "m5d", "r5", "r5d", "i3en"),
                    ("Cascade Lake", "Skylake")),
    **dict.fromkeys(("m5n", "m5dn", "m5zn", "r5n", "r5dn", "r5b", "z1d", "p4d", "g4dn",
                     "x2iezn", "dl1", "vt1"), ("Cascade Lake",)),
    **dict.fromkeys(("p3dn",), ("Skylake",)),
    **dict.fromkeys(("g2",), ("Ivy Bridge",)),
    **dict.fromkeys(("m5a", "m5ad", "r5a", "r5ad"), ("AMD EPYC 1st Gen",)),
    **dict.fromkeys(("c5a", "c5ad", "g4ad", "g5"), ("AMD EPYC 2nd Gen",)),
    **dict.fromkeys(("m6a", "c6a", "hpc6a"), ("AMD EPYC 3rd Gen",)),
    **dict.fromkeys(("m6g", "m6gd", "c6g", "c6gd", "c6gn", "r6g", "r6gd", "x2gd", "g5g",
                     "im4gn", "is4gen"), ("AWS Graviton2",)),
    **dict.fromkeys(("m6i", "c6i", "r6i", "i4i", "x2idn", "x2iedn"), ("Ice Lake",)),
}


@dataclass(frozen=True)
class Coefficients:
    """The per-vCPU watts the model uses, and why (exposed as kwatt_estimation_model_info).

    ``basis``: ``cpuinfo`` (the microarchitecture read from /proc/cpuinfo), ``instance-type``
    (the node's node.kubernetes.io/instance-type label), ``configured`` (model.* set in
    config) or ``default`` (nothing recognised: the configured defaults, CCF's AWS average).
    ``microarchitecture``: what was recognised, even when CCF has no numbers for it.
    """

    idle_watts_per_vcpu: float
    max_watts_per_vcpu: float
    basis: str
    microarchitecture: str = ""
    instance_type: str = ""


def _cpuinfo_fields(text: str) -> dict[str, str]:
    """The first processor block's fields (every block describes the same CPU model)."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, sep, value = line.partition(":")
        if sep:
            fields.setdefault(key.strip().lower(), value.strip())
    return fields


def _int_field(fields: dict[str, str], key: str) -> int | None:
    try:
        return int(fields[key], 0)
    except (KeyError, ValueError):
        return None


def microarchitecture_from_cpuinfo(text: str) -> str | None:
    """The CPU microarchitecture named by /proc/cpuinfo, or None if not recognised."""
    fields = _cpuinfo_fields(text)
    vendor = fields.get("vendor_id", "")
    family = _int_field(fields, "cpu family")
    model = _int_field(fields, "model")
    if vendor == "GenuineIntel" and family == 6 and model is not None:
        name = _INTEL_FAMILY6.get(model)
        if model == 0x55 and _int_field(fields, "stepping") in _CASCADE_LAKE_STEPPINGS:
            return "Cascade Lake"
        return name
    if vendor == "AuthenticAMD" and family is not None and model is not None:
        if family == 0x17 and model < 0x10:
            return "AMD EPYC 1st Gen"
        if family == 0x17 and 0x30 <= model < 0x40:
            return "AMD EPYC 2nd Gen"
        if family == 0x19 and model < 0x10:
            return "AMD EPYC 3rd Gen"
        if family == 0x19 and 0x10 <= model < 0x20:
            return "AMD EPYC 4th Gen"
        return None
    implementer = _int_field(fields, "cpu implementer")
    part = _int_field(fields, "cpu part")
    if implementer is not None and part is not None:
        return _ARM_PARTS.get((implementer, part))
    return None


def instance_family(instance_type: str) -> str:
    """'m5.large' -> 'm5' (AWS names; lower case)."""
    return instance_type.split(".", 1)[0].strip().lower()


def _average(names: tuple[str, ...]) -> tuple[float, float] | None:
    known = [CCF_WATTS_PER_VCPU[n] for n in names if n in CCF_WATTS_PER_VCPU]
    if not known:
        return None
    return (sum(k[0] for k in known) / len(known), sum(k[1] for k in known) / len(known))


def choose_coefficients(model: ModelConfig, cpuinfo: str | None,
                        instance_type: str | None) -> Coefficients:
    """Coefficients for this node: configured ones win; then the microarchitecture in
    /proc/cpuinfo (the silicon itself); then the instance type label; else the configured
    defaults. A name is kept even when no numbers exist for it, so the info metric says
    what was recognised."""
    configured = Coefficients(model.cpu_watts_idle_per_vcpu, model.cpu_watts_max_per_vcpu,
                              "configured" if not model.auto_coefficients else "default",
                              instance_type=instance_type or "")
    if not model.auto_coefficients:
        return configured
    recognised = ""
    arch = microarchitecture_from_cpuinfo(cpuinfo) if cpuinfo else None
    if arch is not None:
        recognised = arch
        numbers = CCF_WATTS_PER_VCPU.get(arch)
        if numbers is not None:
            return Coefficients(numbers[0], numbers[1], "cpuinfo", arch, instance_type or "")
    if instance_type:
        names = AWS_INSTANCE_FAMILIES.get(instance_family(instance_type), ())
        averaged = _average(names)
        if averaged is not None:
            return Coefficients(round(averaged[0], 4), round(averaged[1], 4),
                                "instance-type", " + ".join(names), instance_type)
        recognised = recognised or " + ".join(names)
    return Coefficients(configured.idle_watts_per_vcpu, configured.max_watts_per_vcpu,
                        "default", recognised, instance_type or "")
