"""Configuration: YAML file, environment and flags folded into one frozen Config.

Precedence, highest first: command-line flags > ``KWATT_*`` environment > YAML file >
defaults. Every problem is reported as a ``ConfigError`` whose message names the key and
what is wrong; ``__main__`` prints it on one line and exits with status 2.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import socket
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import yaml

from kwatt.ledger import MAX_WORKLOADS, METRIC_LEVELS, WORKLOAD_RETENTION_SECONDS
from kwatt.workloads.owners import DEFAULT_OWNER_LOOKUPS

DEFAULT_PORT = 9877
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"
DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEFAULT_SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
# AMD: amd.com/gpu, and amd.com/<compute>_<memory> for partitioned MI300 (cpx_nps1, ...).
DEFAULT_GPU_RESOURCE_NAMES = ("nvidia.com/gpu", "nvidia.com/mig-*", "amd.com/gpu",
                              "amd.com/?px_nps*")
# DRA drivers whose devices are GPUs: NVIDIA's k8s-dra-driver-gpu registers gpu.nvidia.com
# for whole GPUs and MIG devices alike.
DEFAULT_GPU_DRA_DRIVERS = ("gpu.nvidia.com",)
ON_OFF = ("on", "off")

IDLE_POLICIES = ("unattributed", "even", "cpu-request")
TRISTATE = ("auto", "on", "off")
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("logfmt", "json")


class ConfigError(Exception):
    """A configuration problem, phrased for one line of output."""


@dataclass(frozen=True)
class EmbodiedRule:
    """Embodied carbon of the nodes whose labels all equal ``match`` (a node type)."""

    match: tuple[tuple[str, str], ...]
    kg_co2e: float
    lifetime_years: float | None = None  # None: embodied.lifetime_years

    def matches(self, labels: Mapping[str, str]) -> bool:
        return all(labels.get(key) == value for key, value in self.match)


@dataclass(frozen=True)
class ModelConfig:
    """Coefficients of the estimation model used where RAPL cannot be read.

    Defaults follow the Cloud Carbon Footprint methodology (AWS averages).
    """

    cpu_watts_idle_per_vcpu: float = 0.74
    cpu_watts_max_per_vcpu: float = 3.5
    dram_watts_per_gb: float = 0.392
    estimate_dram: bool = False
    # Choose the per-vCPU watts from the CPU or instance type (kwatt.sources.model); off
    # as soon as either cpu_watts_* key is set explicitly.
    auto_coefficients: bool = True


@dataclass(frozen=True)
class AttributionConfig:
    # How idle (static) power is charged: left unattributed, spread evenly over the
    # containers present, or split by CPU request (needs Kubernetes metadata).
    idle_policy: str = "unattributed"
    # Known idle power per component in watts; None means learn it.
    idle_watts_cpu: float | None = None
    idle_watts_dram: float | None = None
    idle_watts_other: float | None = None
    # Window over which the lowest low-utilisation power is remembered as the baseline.
    idle_learn_window_seconds: float = 3600.0
    # Utilisation under which a sample may teach the idle baseline.
    idle_learn_max_utilisation: float = 0.10


CARBON_KINDS = ("static", "electricitymaps", "ukgrid", "file")
PRICE_KINDS = ("static", "http", "file")


@dataclass(frozen=True)
class SignalConfig:
    """Where one grid signal (carbon intensity or energy price) comes from."""

    source: str = "static"
    url: str = ""  # may contain {zone}
    file: str = ""
    zone: str = ""
    zone_by_node: tuple[str, ...] = ()  # "node=zone" entries; win over zone and the label
    zone_node_label: str = ""  # e.g. topology.kubernetes.io/region (Kubernetes mode)
    period_seconds: float = 300.0
    grace_seconds: float = 900.0
    timeout_seconds: float = 10.0
    token_file: str = ""
    ca_file: str = ""

    def zone_for(self, node: str) -> str | None:
        """The configured zone of ``node``; None when it comes from the node's label."""
        for entry in self.zone_by_node:
            name, _, zone = entry.partition("=")
            if name == node:
                return zone
        return None if self.zone_node_label else self.zone


@dataclass(frozen=True)
class PlatformConfig:
    """Whole-node meters (kwatt.sources.hwmon) and the `other` component."""

    # Find ACPI power_meter, NVIDIA Grace and amd_energy hwmon devices without configuration.
    hwmon_auto_detect: bool = True
    # Further hwmon channels, "<chip name>/powerN" or "<chip name>/energyN"; each must exist.
    hwmon_sensors: tuple[str, ...] = ()
    # Highest power a platform meter may honestly show; a step implying more is implausible.
    ceiling_watts: float = 30000.0


@dataclass(frozen=True)
class Config:
    listen_address: str = DEFAULT_LISTEN_ADDRESS
    web_config_file: str | None = None
    procfs: str = "/proc"
    sysfs: str = "/sys"
    interval_seconds: float = 5.0
    kubernetes: str = "auto"
    kubeconfig: str | None = None
    # KUBECONFIG from the environment, as kubectl reads it (one path or several joined by
    # ':'); used when no kubeconfig is configured, before the in-cluster service account.
    kubeconfig_env: str | None = None
    service_account_dir: str = DEFAULT_SERVICE_ACCOUNT_DIR
    node_name: str = ""
    pod_resources_socket: str = DEFAULT_POD_RESOURCES_SOCKET
    gpu: str = "auto"
    gpu_resource_names: tuple[str, ...] = DEFAULT_GPU_RESOURCE_NAMES
    gpu_dra_drivers: tuple[str, ...] = DEFAULT_GPU_DRA_DRIVERS
    gpu_mig_refresh_seconds: float = 60.0
    gpu_dcgm_exporter_url: str = ""  # empty: MIG instances weighted on/off
    gpu_dcgm_exporter_interval_seconds: float = 30.0
    gpu_dcgm_exporter_timeout_seconds: float = 2.0
    log_level: str = "info"
    log_format: str = "logfmt"
    retention_seconds: float = 300.0
    max_retained_containers: int = 10000
    pod_label_allowlist: tuple[str, ...] = ()
    # Owner kinds read to find a pod's top workload, as RBAC names them (resource.group).
    owner_lookups: tuple[str, ...] = DEFAULT_OWNER_LOOKUPS
    # kwatt_workload_energy_joules_total: kept this long after a workload's last container,
    # at most this many per node (ledger.py).
    workload_retention_seconds: float = WORKLOAD_RETENTION_SECONDS
    max_workloads: int = MAX_WORKLOADS
    docker_root: str = "/var/lib/docker"
    carbon_intensity_grams_per_kwh: float | None = None
    energy_price_per_kwh: float | None = None
    energy_price_currency: str = "USD"
    pue: float = 1.0
    clock_ticks_per_second: int = 100
    state_file: str = ""  # restart state; empty: off
    otlp_endpoint: str = ""  # OTLP/HTTP metrics URL; empty: no push
    otlp_interval_seconds: float = 60.0
    gpu_dra: str = "on"  # read ResourceSlices for DRA-allocated GPUs
    metrics_level: str = "container"  # one of kwatt.ledger.METRIC_LEVELS
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    carbon_source: SignalConfig = field(default_factory=SignalConfig)
    price_source: SignalConfig = field(default_factory=SignalConfig)
    platform: PlatformConfig = field(default_factory=PlatformConfig)
    once: bool = False
    # Redfish BMC meter (docs/redfish.md); off while no URL names this node's BMC.
    redfish_url: str = ""  # https://... with {node} replaced by node_name
    redfish_urls: tuple[tuple[str, str], ...] = ()  # node name -> URL, before redfish_url
    redfish_username_file: str = ""
    redfish_password_file: str = ""
    redfish_ca_file: str = ""
    redfish_insecure_skip_verify: bool = False
    redfish_interval_seconds: float = 30.0
    redfish_timeout_seconds: float = 10.0
    redfish_backoff_max_seconds: float = 300.0
    redfish_chassis: tuple[str, ...] = ()
    # GET this node's object once at start (its instance-type label picks the estimation
    # model's coefficients); needs RBAC get on nodes, so off unless the chart grants it.
    kubernetes_read_node: bool = False
    # IPMI DCMI power reading in band (kwatt.sources.ipmi); empty: off.
    ipmi_device: str = ""
    ipmi_interval_seconds: float = 10.0
    # Embodied carbon of this node's hardware (SCI's M), amortised over its lifetime.
    embodied_kg_co2e: float | None = None
    embodied_lifetime_years: float = 4.0
    # Per node type, matched against this node's labels (one GET at start); the first
    # matching entry wins, embodied_kg_co2e is the fallback.
    embodied_by_node_labels: tuple[EmbodiedRule, ...] = ()


# --------------------------------------------------------------------------- parsing values

_DURATION_RE = re.compile(r"^(?:(\d+(?:\.\d+)?)(ms|s|m|h))+$")
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|s|m|h)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(key: str, value: object) -> float:
    """Parse '500ms', '5s', '1m30s' or a bare number of seconds into seconds."""
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a duration like 5s or 500ms, got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and _DURATION_RE.match(value.strip()):
        seconds = sum(
            float(n) * _UNIT_SECONDS[u] for n, u in _DURATION_PART.findall(value.strip())
        )
    else:
        raise ConfigError(f"{key}: expected a duration like 5s or 500ms, got {value!r}")
    if not math.isfinite(seconds) or seconds <= 0:
        raise ConfigError(f"{key}: must be a positive duration, got {value!r}")
    return seconds


def _float(key: str, value: object, *, minimum: float | None = None,
           maximum: float | None = None) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise ConfigError(f"{key}: expected a finite number, got {value!r}")
    if minimum is not None and number < minimum:
        raise ConfigError(f"{key}: must be >= {minimum:g}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ConfigError(f"{key}: must be <= {maximum:g}, got {value!r}")
    return number


def _int(key: str, value: object, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(f"{key}: must be >= {minimum}, got {value!r}")
    return number


def _bool(key: str, value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
        return False
    raise ConfigError(f"{key}: expected true or false, got {value!r}")


def _choice(key: str, value: object, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"{key}: must be one of {', '.join(choices)}, got {value!r}")
    return value


def _on_off(key: str, value: object) -> str:
    """on or off; YAML 1.1 reads a bare on/off/true/false as a boolean, which means the same."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return _choice(key, value, ON_OFF)


def _string(key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key}: expected a non-empty string, got {value!r}")
    return value


def _string_list(key: str, value: object) -> tuple[str, ...]:
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, list) and all(isinstance(v, str) and v for v in value):
        items = list(value)
    else:
        raise ConfigError(f"{key}: expected a list of strings, got {value!r}")
    return tuple(items)


_RBAC_RESOURCE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def _owner_lookups(key: str, value: object) -> tuple[str, ...]:
    """``resource.group`` entries (``replicasets.apps``), as RBAC rules name them."""
    items = _string_list(key, value)
    for item in items:
        if not _RBAC_RESOURCE.match(item):
            raise ConfigError(f"{key}: expected resource.group like replicasets.apps, "
                              f"got {item!r}")
    return items


def _listen_address(key: str, value: object) -> str:
    text = _string(key, value)
    try:
        split_listen_address(text)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    return text


def split_listen_address(address: str) -> tuple[str, int]:
    """'[host]:port' -> (host, port); an empty host means all interfaces."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not port_text.isdigit():
        raise ValueError(f"expected [host]:port, got {address!r}")
    port = int(port_text)
    if port > 65535:
        raise ValueError(f"port out of range in {address!r}")
    return host.strip("[]"), port


# --------------------------------------------------------------------------- the key table

@dataclass(frozen=True)
class Setting:
    """One configurable key: its flag, YAML path, env name and parser."""

    flag: str
    yaml_path: str
    dest: str
    parse: Callable[[str, object], Any]
    help: str
    metavar: str = "VALUE"

    @property
    def env(self) -> str:
        return "KWATT_" + re.sub(r"[^A-Z0-9]", "_", self.flag.lstrip("-").upper())


def _otlp_endpoint(key: str, value: object) -> str:
    text = value if isinstance(value, str) else _string(key, value)
    if text and not re.match(r"^https?://[^/\s]+", text):
        raise ConfigError(f"{key}: {text!r} is not an http:// or https:// URL")
    return text


def _positive_duration(key: str, value: object) -> float:
    return parse_duration(key, value)


def _redfish_url(key: str, value: object) -> str:
    text = _string(key, value)
    if not text.startswith("https://") or len(text) <= len("https://"):
        raise ConfigError(f"{key}: expected an https:// URL of the BMC, got {text!r}")
    return text


def _redfish_interval(key: str, value: object) -> float:
    seconds = parse_duration(key, value)
    if seconds < 1.0:
        raise ConfigError(f"{key}: must be at least 1s (BMCs answer in seconds), got "
                          f"{value!r}")
    return seconds


# Shorter periods buy nothing and cost accuracy: a cycle reads every cgroup (4 ms of CPU
# at 330 containers, benchmarks/bench_node.py; far more on a full node), so the sampler
# would fall behind and charge its own CPU to the node; RAPL counters move in ~1 ms steps
# and the CPU-time shares they are split by are noisiest over the shortest windows.
MIN_INTERVAL_SECONDS = 0.1


def _interval(key: str, value: object) -> float:
    seconds = parse_duration(key, value)
    if seconds < MIN_INTERVAL_SECONDS:
        raise ConfigError(f"{key}: must be at least 100ms, got {value!r}")
    return seconds


def _optional_string(key: str, value: object) -> str:
    return value if isinstance(value, str) else _string(key, value)


def _zone_map(key: str, value: object) -> tuple[str, ...]:
    entries = _string_list(key, value)
    for entry in entries:
        name, sep, zone = entry.partition("=")
        if not sep or not name or not zone:
            raise ConfigError(f"{key}: expected node=zone entries, got {entry!r}")
    return entries


_EMBODIED_RULE_KEYS = frozenset({"match", "kg_co2e", "lifetime_years"})


def _embodied_rules(key: str, value: object) -> tuple[EmbodiedRule, ...]:
    """``[{match: {label: value, ...}, kg_co2e: N, lifetime_years: N}, ...]``; from the
    environment, the same list in YAML or JSON."""
    if isinstance(value, str):
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError:
            raise ConfigError(f"{key}: expected a YAML list of {{match, kg_co2e, "
                              f"lifetime_years}} entries") from None
    if not isinstance(value, list):
        raise ConfigError(f"{key}: expected a list of {{match, kg_co2e, lifetime_years}} "
                          f"entries, got {value!r}")
    rules = []
    for index, entry in enumerate(value):
        at = f"{key}[{index}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{at}: expected a mapping with match and kg_co2e, got {entry!r}")
        unknown = sorted(str(k) for k in entry if k not in _EMBODIED_RULE_KEYS)
        if unknown:
            raise ConfigError(f"{at}: unknown key {unknown[0]!r} (expected match, kg_co2e, "
                              "lifetime_years)")
        match = entry.get("match")
        if not isinstance(match, dict) or not match or not all(
                isinstance(k, str) and k and isinstance(v, str) for k, v in match.items()):
            raise ConfigError(f"{at}.match: expected a non-empty mapping of node label to "
                              f"value, got {match!r}")
        if "kg_co2e" not in entry:
            raise ConfigError(f"{at}.kg_co2e: required")
        kg = _float(f"{at}.kg_co2e", entry["kg_co2e"], minimum=0)
        lifetime = None if entry.get("lifetime_years") is None else _float(
            f"{at}.lifetime_years", entry["lifetime_years"], minimum=0.1, maximum=50)
        rules.append(EmbodiedRule(tuple(sorted(match.items())), kg, lifetime))
    return tuple(rules)


def _signal_settings(prefix: str, dest: str, what: str,
                     kinds: Sequence[str]) -> tuple[Setting, ...]:
    """The same keys for each grid signal: --carbon.* and --cost.*."""
    def flag(name: str) -> str:
        return f"--{prefix}.{name.replace('_', '-')}"

    return (
        Setting(flag("source"), f"{prefix}.source", f"{dest}.source",
                lambda k, v: _choice(k, v, kinds),
                f"where the {what} comes from: {', '.join(kinds)} (default static)", "KIND"),
        Setting(flag("url"), f"{prefix}.url", f"{dest}.url", _optional_string,
                f"URL of the {what} API; {{zone}} is replaced by the zone", "URL"),
        Setting(flag("file"), f"{prefix}.file", f"{dest}.file", _optional_string,
                f"YAML/JSON file with the {what}, re-read every period (source file)",
                "FILE"),
        Setting(flag("zone"), f"{prefix}.zone", f"{dest}.zone", _optional_string,
                f"grid zone or region of this node for the {what}", "ZONE"),
        Setting(flag("zone_by_node"), f"{prefix}.zone_by_node", f"{dest}.zone_by_node",
                _zone_map, "per-node zones, node=zone entries; win over the others",
                "NODE=ZONE,..."),
        Setting(flag("zone_node_label"), f"{prefix}.zone_node_label",
                f"{dest}.zone_node_label", _optional_string,
                "take the zone from this label of the node object, e.g. "
                "topology.kubernetes.io/region (Kubernetes mode; needs get on nodes)",
                "LABEL"),
        Setting(flag("period"), f"{prefix}.period", f"{dest}.period_seconds",
                _positive_duration, f"how often the {what} is fetched (default 5m)",
                "DURATION"),
        Setting(flag("grace"), f"{prefix}.grace", f"{dest}.grace_seconds",
                _positive_duration, f"how long the last {what} is shown while fetches fail; "
                "at least period + timeout (default 15m)", "DURATION"),
        Setting(flag("timeout"), f"{prefix}.timeout", f"{dest}.timeout_seconds",
                _positive_duration, "per-request timeout (default 10s)", "DURATION"),
        Setting(flag("token_file"), f"{prefix}.token_file", f"{dest}.token_file",
                _optional_string, "file holding the API token (a mounted Secret)", "FILE"),
        Setting(flag("ca_file"), f"{prefix}.ca_file", f"{dest}.ca_file", _optional_string,
                "CA bundle that verifies the API's TLS certificate (default: system CAs)",
                "FILE"),
    )


def _http_url(key: str, value: object) -> str:
    text = _string(key, value).strip()
    if text and not re.match(r"^https?://[^/\s]+", text):
        raise ConfigError(f"{key}: expected an http:// or https:// URL, got {value!r}")
    return text


SETTINGS: tuple[Setting, ...] = (
    Setting("--web.listen-address", "web.listen_address", "listen_address", _listen_address,
            f"address for /metrics and /healthz (default {DEFAULT_LISTEN_ADDRESS})",
            "[HOST]:PORT"),
    Setting("--web.config.file", "web.config_file", "web_config_file", _string,
            "exporter-toolkit web config (TLS, basic auth) for /metrics", "FILE"),
    Setting("--path.procfs", "path.procfs", "procfs", _string,
            "procfs root (default /proc)", "DIR"),
    Setting("--path.sysfs", "path.sysfs", "sysfs", _string,
            "sysfs root; powercap and cgroupfs are found under it (default /sys)", "DIR"),
    Setting("--interval", "interval", "interval_seconds", _interval,
            "sampling period, e.g. 500ms, 5s, 1m (default 5s, at least 100ms)", "DURATION"),
    Setting("--kubernetes", "kubernetes.mode", "kubernetes",
            lambda k, v: _choice(k, v, TRISTATE),
            "auto (in-cluster when the service-account token exists), on, off", "MODE"),
    Setting("--kubeconfig", "kubernetes.kubeconfig", "kubeconfig", _string,
            "kubeconfig to use; else $KUBECONFIG, else the in-cluster service account",
            "FILE"),
    Setting("--node-name", "node_name", "node_name", _string,
            "the node this exporter runs on (default: env NODE_NAME, else the hostname)",
            "NAME"),
    Setting("--kubelet.pod-resources-socket", "kubelet.pod_resources_socket",
            "pod_resources_socket", _string,
            f"kubelet PodResources v1 socket (default {DEFAULT_POD_RESOURCES_SOCKET})", "PATH"),
    Setting("--gpu", "gpu.mode", "gpu", lambda k, v: _choice(k, v, TRISTATE),
            "auto (use NVML if the library loads), on (fail if it cannot), off", "MODE"),
    Setting("--log.level", "log.level", "log_level", lambda k, v: _choice(k, v, LOG_LEVELS),
            "debug, info, warn, error (default info)", "LEVEL"),
    Setting("--log.format", "log.format", "log_format",
            lambda k, v: _choice(k, v, LOG_FORMATS), "logfmt or json (default logfmt)",
            "FORMAT"),
    Setting("--retention", "retention", "retention_seconds", _positive_duration,
            "how long a finished container's series stays exposed (default 5m)", "DURATION"),
    Setting("--state.file", "state.file", "state_file",
            lambda k, v: v if isinstance(v, str) else _string(k, v),
            "file keeping the last counters across restarts, so a restart loses no energy; "
            "empty: off (default off)", "FILE"),
    Setting("--otlp.endpoint", "otlp.endpoint", "otlp_endpoint", _otlp_endpoint,
            "also push the metrics over OTLP/HTTP to this URL, e.g. "
            "http://otel-collector:4318/v1/metrics (needs kwatt[otlp]; default off)", "URL"),
    Setting("--otlp.interval", "otlp.interval", "otlp_interval_seconds", _positive_duration,
            "how often to push over OTLP (default 60s)", "DURATION"),
    Setting("--redfish.url", "redfish.url", "redfish_url", _redfish_url,
            "https URL of this node's BMC; {node} is replaced by the node name (default: "
            "off)", "URL"),
    Setting("--redfish.username-file", "redfish.username_file", "redfish_username_file",
            _string, "file holding the BMC user name", "FILE"),
    Setting("--redfish.password-file", "redfish.password_file", "redfish_password_file",
            _string, "file holding the BMC password", "FILE"),
    Setting("--redfish.ca-file", "redfish.ca_file", "redfish_ca_file", _string,
            "CA bundle that signs the BMC's certificate (default: the system store)", "FILE"),
    Setting("--redfish.interval", "redfish.interval", "redfish_interval_seconds",
            _redfish_interval, "how often the BMC is read (default 30s, at least 1s)",
            "DURATION"),
    Setting("--redfish.timeout", "redfish.timeout", "redfish_timeout_seconds",
            _positive_duration, "per-request timeout for the BMC (default 10s)", "DURATION"),
    Setting("--ipmi.device", "ipmi.device", "ipmi_device", _string,
            "IPMI device for DCMI power readings, e.g. /dev/ipmi0 (needs python-ipmi; "
            "default: off)", "PATH"),
    Setting("--ipmi.interval", "ipmi.interval", "ipmi_interval_seconds", _redfish_interval,
            "how often the IPMI power reading is taken (default 10s, at least 1s)",
            "DURATION"),
    *_signal_settings("carbon", "carbon_source", "carbon intensity", CARBON_KINDS),
    *_signal_settings("cost", "price_source", "energy price", PRICE_KINDS),
    Setting("--gpu.dra", "gpu.dra", "gpu_dra", _on_off,
            "on: map DRA-allocated GPUs to UUIDs through this node's ResourceSlices "
            "(list+watch resource.k8s.io/v1 resourceslices); off: do not read them "
            "(default on)", "MODE"),
    Setting("--gpu.mig-refresh", "gpu.mig_refresh", "gpu_mig_refresh_seconds",
            _positive_duration,
            "how often cached MIG layouts are enumerated again without a sign of "
            "reconfiguration (default 1m)", "DURATION"),
    Setting("--gpu.dcgm-exporter-url", "gpu.dcgm_exporter_url", "gpu_dcgm_exporter_url",
            _http_url,
            "node-local dcgm-exporter /metrics whose DCGM_FI_PROF_GR_ENGINE_ACTIVE weighs MIG "
            "instances (default off: on/off by running processes)", "URL"),
    Setting("--gpu.dcgm-exporter-interval", "gpu.dcgm_exporter_interval",
            "gpu_dcgm_exporter_interval_seconds", _positive_duration,
            "how often dcgm-exporter is read (default 30s, its own collection period)",
            "DURATION"),
    Setting("--gpu.dcgm-exporter-timeout", "gpu.dcgm_exporter_timeout",
            "gpu_dcgm_exporter_timeout_seconds", _positive_duration,
            "per-request timeout for dcgm-exporter (default 2s)", "DURATION"),
    Setting("--metrics.level", "metrics.level", "metrics_level",
            lambda k, v: _choice(k, v, METRIC_LEVELS),
            "finest series: container (default), pod, workload or namespace; finer labels "
            "are empty (docs/metrics.md, series per level)", "LEVEL"),
)

# Keys only the YAML file (or env) sets: nested and rarely changed.
FILE_ONLY: dict[str, tuple[str, Callable[[str, object], Any]]] = {
    "gpu.resource_names": ("gpu_resource_names", _string_list),
    "gpu.dra_drivers": ("gpu_dra_drivers", _string_list),
    "kubernetes.pod_label_allowlist": ("pod_label_allowlist", _string_list),
    "kubernetes.service_account_dir": ("service_account_dir", _string),
    "kubernetes.read_node": ("kubernetes_read_node", _bool),
    "kubernetes.owner_lookups": ("owner_lookups", _owner_lookups),
    "workloads.retention": ("workload_retention_seconds", _positive_duration),
    "workloads.max": ("max_workloads", lambda k, v: _int(k, v, minimum=1)),
    "host.docker_root": ("docker_root", _string),
    "retention_max_containers": (
        "max_retained_containers", lambda k, v: _int(k, v, minimum=1)),
    "carbon.intensity_grams_per_kwh": (
        "carbon_intensity_grams_per_kwh", lambda k, v: _float(k, v, minimum=0)),
    "cost.price_per_kwh": ("energy_price_per_kwh", lambda k, v: _float(k, v, minimum=0)),
    "cost.currency": ("energy_price_currency", _string),
    "pue": ("pue", lambda k, v: _float(k, v, minimum=1.0, maximum=3.0)),
    "embodied.kg_co2e": ("embodied_kg_co2e", lambda k, v: _float(k, v, minimum=0)),
    "embodied.lifetime_years": (
        "embodied_lifetime_years", lambda k, v: _float(k, v, minimum=0.1, maximum=50)),
    "embodied.by_node_labels": ("embodied_by_node_labels", _embodied_rules),
    "attribution.idle_policy": (
        "attribution.idle_policy", lambda k, v: _choice(k, v, IDLE_POLICIES)),
    "attribution.idle_watts.cpu": (
        "attribution.idle_watts_cpu", lambda k, v: _float(k, v, minimum=0)),
    "attribution.idle_watts.dram": (
        "attribution.idle_watts_dram", lambda k, v: _float(k, v, minimum=0)),
    "attribution.idle_watts.other": (
        "attribution.idle_watts_other", lambda k, v: _float(k, v, minimum=0)),
    "attribution.idle_learn_window": (
        "attribution.idle_learn_window_seconds", _positive_duration),
    "attribution.idle_learn_max_utilisation": (
        "attribution.idle_learn_max_utilisation",
        lambda k, v: _float(k, v, minimum=0, maximum=1)),
    "model.cpu_watts_idle_per_vcpu": (
        "model.cpu_watts_idle_per_vcpu", lambda k, v: _float(k, v, minimum=0)),
    "model.cpu_watts_max_per_vcpu": (
        "model.cpu_watts_max_per_vcpu", lambda k, v: _float(k, v, minimum=0)),
    "model.dram_watts_per_gb": ("model.dram_watts_per_gb", lambda k, v: _float(k, v, minimum=0)),
    "model.estimate_dram": ("model.estimate_dram", _bool),
    "model.auto_coefficients": ("model.auto_coefficients", _bool),
    "redfish.insecure_skip_verify": ("redfish_insecure_skip_verify", _bool),
    "redfish.backoff_max": ("redfish_backoff_max_seconds", _positive_duration),
    "redfish.chassis": ("redfish_chassis", _string_list),
    "platform.hwmon.auto_detect": ("platform.hwmon_auto_detect", _bool),
    "platform.hwmon.sensors": ("platform.hwmon_sensors", _string_list),
    "platform.ceiling_watts": (
        "platform.ceiling_watts", lambda k, v: _float(k, v, minimum=1)),
}
# YAML mappings kept whole: node name -> value (a node name may contain dots).
FILE_ONLY_MAPS: dict[str, tuple[str, Callable[[str, object], Any]]] = {
    "redfish.urls": ("redfish_urls", _redfish_url),
}


def _file_env_name(yaml_path: str) -> str:
    return "KWATT_" + re.sub(r"[^A-Z0-9]", "_", yaml_path.upper())


class _ErrorRaisingParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of printing usage and exiting."""

    def error(self, message: str) -> Any:
        raise ConfigError(f"command line: {message}")


def build_arg_parser() -> argparse.ArgumentParser:
    """The exporter's real argument parser; the Helm chart's tests parse its args with it."""
    parser = _ErrorRaisingParser(
        prog="kwatt-exporter",
        description="Attribute node CPU, DRAM and GPU energy to workloads; serve Prometheus "
        "metrics.",
        allow_abbrev=False,
    )
    general = parser.add_argument_group("general")
    general.add_argument("--config", metavar="FILE", help="YAML config file")
    general.add_argument("--once", action="store_true",
                         help="take two samples one interval apart, print a table, exit")
    general.add_argument("--version", action="store_true", help="print the version and exit")
    # One section per flag prefix, as node_exporter's --help reads (web., path., log., ...):
    # a new setting lands in its section by its YAML path alone.
    groups: dict[str, argparse._ArgumentGroup] = {}
    for setting in SETTINGS:
        prefix, dot, _ = setting.yaml_path.partition(".")
        title = HELP_SECTIONS.get(prefix, prefix if dot else "sampling")
        if title not in groups:
            groups[title] = parser.add_argument_group(title)
        groups[title].add_argument(setting.flag, dest=setting.dest, metavar=setting.metavar,
                                   help=f"{setting.help} [env {setting.env}]")
    return parser


# --help sections by the first part of a setting's YAML path (a new prefix gets its own
# section under its own name); top-level keys are "sampling".
HELP_SECTIONS = {"web": "web server", "path": "paths", "kubernetes": "kubernetes",
                 "kubelet": "kubernetes", "node_name": "kubernetes", "gpu": "gpus",
                 "log": "logging", "state": "restart state"}


def _flatten(prefix: str, node: Mapping[str, Any], out: dict[str, Any]) -> None:
    for key, value in node.items():
        if not isinstance(key, str):
            raise ConfigError(f"{prefix or 'config'}: keys must be strings, got {key!r}")
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, Mapping):
            _flatten(path, value, out)
        else:
            out[path] = value


# Bounds on every YAML file kwatt reads (--config, --web.config.file). Real files are a few
# KiB; the bounds keep a hostile or mistaken file (50 MB, a billion laughs, 5,000 levels of
# brackets) from hanging or crashing the start: the pure-Python parser needs about 0.2 s for
# 256 KiB of the slowest input, and composing stops at the first node past a bound.
MAX_YAML_BYTES = 256 * 1024
MAX_YAML_DEPTH = 32
MAX_YAML_NODES = 10_000


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that bounds nesting depth and nodes (each alias counts as the nodes it
    stands for), and rejects recursive aliases and duplicate keys."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0
        self._subtree_nodes: dict[int, int] = {}

    def _add_nodes(self, count: int, mark: Any) -> None:
        self._nodes += count
        if self._nodes > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"more than {MAX_YAML_NODES} values, counting what each alias "
                "stands for", mark)

    def compose_node(self, parent: yaml.Node | None, index: int) -> yaml.Node | None:
        event: Any = self.peek_event()  # type: ignore[no-untyped-call]
        mark: Any = event.start_mark
        if isinstance(event, yaml.AliasEvent):
            node = super().compose_node(parent, index)
            size = self._subtree_nodes.get(id(node))
            if size is None:
                raise yaml.composer.ComposerError(
                    None, None, f"alias *{event.anchor} refers to a collection that "
                    "contains it", mark)
            self._add_nodes(size, mark)
            return node
        if self._depth >= MAX_YAML_DEPTH:
            raise yaml.composer.ComposerError(
                None, None, f"nested deeper than {MAX_YAML_DEPTH} levels", mark)
        self._depth += 1
        before = self._nodes
        try:
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        self._add_nodes(1, mark)
        self._subtree_nodes[id(node)] = self._nodes - before
        return node

    def construct_mapping(self, node: yaml.MappingNode,
                          deep: bool = False) -> dict[object, object]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # keys merged in with << may be overridden, as YAML intends
            key = self.construct_object(key_node, deep=True)
            try:
                duplicate = key in seen
            except TypeError:
                continue  # unhashable: SafeConstructor reports it
            if duplicate:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {_short(key)}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_yaml_file(path: str, flag: str) -> Any:
    """Parse one YAML file within the bounds above; an unreadable, oversized, non-UTF-8 or
    invalid file is a ConfigError naming the flag that gave it, or the line where the
    YAML breaks."""
    try:
        with open(path, "rb") as handle:
            raw = handle.read(MAX_YAML_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{flag}: cannot read {path}: {exc.strerror}") from None
    if len(raw) > MAX_YAML_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_YAML_BYTES // 1024} KiB, the most "
                          f"{flag} reads")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}: line {line}: not valid UTF-8 (byte "
                          f"0x{raw[exc.start]:02x} at offset {exc.start})") from None
    loader: _BoundedLoader | None = None
    try:
        loader = _BoundedLoader(text)  # checks for unprintable characters
        return loader.get_single_data()
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise ConfigError(f"{path}: line {line}: character 0x{exc.character:02x} is not "
                          "allowed in YAML") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{path}:{where}: {problem}") from None
    finally:
        if loader is not None:
            loader.dispose()


def load_yaml(path: str) -> dict[str, Any]:
    data = read_yaml_file(path, "--config")
    if data is None:
        return {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    flat: dict[str, Any] = {}
    _flatten("", data, flat)
    return flat


def _set(values: dict[str, Any], dest: str, value: Any) -> None:
    values[dest] = value


def load_config(argv: Sequence[str], env: Mapping[str, str] | None = None,
                hostname: Callable[[], str] = socket.gethostname,
                path_exists: Callable[[str], bool] = os.path.exists) -> Config:
    """Build the Config from argv, env and the YAML file; raise ConfigError on any problem."""
    environ = os.environ if env is None else env
    args = build_arg_parser().parse_args(list(argv))

    values: dict[str, Any] = {}
    yaml_keys = {s.yaml_path: s for s in SETTINGS}
    if args.config:
        maps: dict[str, dict[str, Any]] = {}
        for path, raw in load_yaml(args.config).items():
            map_key = next((m for m in FILE_ONLY_MAPS if path.startswith(m + ".")), None)
            if path in yaml_keys:
                setting = yaml_keys[path]
                _set(values, setting.dest, setting.parse(path, raw))
            elif path in FILE_ONLY:
                dest, parse = FILE_ONLY[path]
                _set(values, dest, parse(path, raw))
            elif map_key is not None:
                maps.setdefault(map_key, {})[path[len(map_key) + 1:]] = (
                    FILE_ONLY_MAPS[map_key][1](path, raw))
            else:
                raise ConfigError(f"{args.config}: unknown key {path!r}")
        for map_key, entries in maps.items():
            _set(values, FILE_ONLY_MAPS[map_key][0], tuple(sorted(entries.items())))

    for path, (dest, parse) in FILE_ONLY.items():
        env_name = _file_env_name(path)
        if env_name in environ:
            _set(values, dest, parse(env_name, environ[env_name]))
    for setting in SETTINGS:
        if setting.env in environ:
            _set(values, setting.dest, setting.parse(setting.env, environ[setting.env]))
        flag_value = getattr(args, setting.dest)
        if flag_value is not None:
            _set(values, setting.dest, setting.parse(setting.flag, flag_value))

    if "node_name" not in values and environ.get("NODE_NAME"):
        values["node_name"] = environ["NODE_NAME"]
    if environ.get("KUBECONFIG"):
        values["kubeconfig_env"] = environ["KUBECONFIG"]

    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {"attribution": {}, "model": {}, "carbon_source": {},
                                         "price_source": {}, "platform": {}}
    for dest, value in values.items():
        group, _, name = dest.partition(".")
        if name:
            nested[group][name] = value
        else:
            top[dest] = value
    attribution = AttributionConfig(**nested["attribution"])
    if {"cpu_watts_idle_per_vcpu", "cpu_watts_max_per_vcpu"} & nested["model"].keys():
        nested["model"].setdefault("auto_coefficients", False)
    model = ModelConfig(**nested["model"])
    if model.cpu_watts_max_per_vcpu < model.cpu_watts_idle_per_vcpu:
        raise ConfigError(
            "model.cpu_watts_max_per_vcpu: must be >= model.cpu_watts_idle_per_vcpu "
            f"({model.cpu_watts_max_per_vcpu:g} < {model.cpu_watts_idle_per_vcpu:g})")
    if (top.get("redfish_url") or top.get("redfish_urls")) and not (
            top.get("redfish_username_file") and top.get("redfish_password_file")):
        raise ConfigError("--redfish.username-file: --redfish.username-file and "
                          "--redfish.password-file are required with a Redfish URL")
    if "node_name" not in top:
        mode = top.get("kubernetes", "auto")
        token = os.path.join(top.get("service_account_dir", DEFAULT_SERVICE_ACCOUNT_DIR),
                             "token")
        # In a pod the hostname is the pod's name, not the node's: never guess it.
        if mode == "on" or (mode == "auto" and path_exists(token)):
            raise ConfigError(
                f"--node-name: required when --kubernetes={mode}"
                + ("" if mode == "on" else f" and {token} exists")
                + " (set it or env NODE_NAME from the downward API spec.nodeName)")
        top["node_name"] = hostname()
    carbon = SignalConfig(**nested["carbon_source"])
    price = SignalConfig(**nested["price_source"])
    _check_signal("carbon", carbon, "carbon.intensity_grams_per_kwh",
                  top.get("carbon_intensity_grams_per_kwh"), "electricitymaps")
    _check_signal("cost", price, "cost.price_per_kwh", top.get("energy_price_per_kwh"), "")
    clock_ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return Config(attribution=attribution, model=model,
                  platform=PlatformConfig(**nested["platform"]), once=bool(args.once),
                  clock_ticks_per_second=int(clock_ticks), carbon_source=carbon,
                  price_source=price, **top)


def _check_signal(prefix: str, signal: SignalConfig, static_key: str,
                  static_value: float | None, needs_token: str) -> None:
    if signal.source == "static":
        return
    if static_value is not None:
        raise ConfigError(f"{static_key}: only used with {prefix}.source static "
                          f"({prefix}.source is {signal.source})")
    if signal.source == "file" and not signal.file:
        raise ConfigError(f"{prefix}.file: required with {prefix}.source file")
    if signal.source == "http" and not signal.url:
        raise ConfigError(f"{prefix}.url: required with {prefix}.source http")
    if signal.source == needs_token and not signal.token_file:
        raise ConfigError(f"{prefix}.token_file: required with {prefix}.source "
                          f"{signal.source} (the API's auth-token)")
    if signal.source == "electricitymaps" and not (
            signal.zone or signal.zone_by_node or signal.zone_node_label):
        raise ConfigError(f"{prefix}.zone: required with {prefix}.source electricitymaps "
                          f"(or {prefix}.zone_by_node or {prefix}.zone_node_label)")
    if signal.source == "ukgrid" and not signal.url:
        zones = [signal.zone] + [e.partition("=")[2] for e in signal.zone_by_node]
        for zone in zones:
            if zone and not (zone.isdigit() and 1 <= int(zone) <= 17):
                raise ConfigError(f"{prefix}.zone: the UK API's zones are region ids 1 to "
                                  f"17, got {zone!r}")
    least = signal.period_seconds + signal.timeout_seconds
    if signal.grace_seconds < least:
        raise ConfigError(f"{prefix}.grace: must be at least {prefix}.period + "
                          f"{prefix}.timeout ({least:g}s), got {signal.grace_seconds:g}s")
