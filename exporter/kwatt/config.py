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

from kwatt.ledger import METRIC_LEVELS

DEFAULT_PORT = 9877
DEFAULT_LISTEN_ADDRESS = f":{DEFAULT_PORT}"
DEFAULT_POD_RESOURCES_SOCKET = "/var/lib/kubelet/pod-resources/kubelet.sock"
DEFAULT_SERVICE_ACCOUNT_DIR = "/var/run/secrets/kubernetes.io/serviceaccount"
DEFAULT_GPU_RESOURCE_NAMES = ("nvidia.com/gpu", "nvidia.com/mig-*")

IDLE_POLICIES = ("unattributed", "even", "cpu-request")
TRISTATE = ("auto", "on", "off")
LOG_LEVELS = ("debug", "info", "warn", "error")
LOG_FORMATS = ("logfmt", "json")


class ConfigError(Exception):
    """A configuration problem, phrased for one line of output."""


@dataclass(frozen=True)
class ModelConfig:
    """Coefficients of the estimation model used where RAPL cannot be read.

    Defaults follow the Cloud Carbon Footprint methodology (AWS averages).
    """

    cpu_watts_idle_per_vcpu: float = 0.74
    cpu_watts_max_per_vcpu: float = 3.5
    dram_watts_per_gb: float = 0.392
    estimate_dram: bool = False


@dataclass(frozen=True)
class AttributionConfig:
    # How idle (static) power is charged: left unattributed, spread evenly over the
    # containers present, or split by CPU request (needs Kubernetes metadata).
    idle_policy: str = "unattributed"
    # Known idle power per component in watts; None means learn it.
    idle_watts_cpu: float | None = None
    idle_watts_dram: float | None = None
    # Window over which the lowest low-utilisation power is remembered as the baseline.
    idle_learn_window_seconds: float = 3600.0
    # Utilisation under which a sample may teach the idle baseline.
    idle_learn_max_utilisation: float = 0.10


@dataclass(frozen=True)
class Config:
    listen_address: str = DEFAULT_LISTEN_ADDRESS
    web_config_file: str | None = None
    procfs: str = "/proc"
    sysfs: str = "/sys"
    interval_seconds: float = 5.0
    kubernetes: str = "auto"
    kubeconfig: str | None = None
    service_account_dir: str = DEFAULT_SERVICE_ACCOUNT_DIR
    node_name: str = ""
    pod_resources_socket: str = DEFAULT_POD_RESOURCES_SOCKET
    gpu: str = "auto"
    gpu_resource_names: tuple[str, ...] = DEFAULT_GPU_RESOURCE_NAMES
    log_level: str = "info"
    log_format: str = "logfmt"
    retention_seconds: float = 300.0
    max_retained_containers: int = 10000
    pod_label_allowlist: tuple[str, ...] = ()
    docker_root: str = "/var/lib/docker"
    carbon_intensity_grams_per_kwh: float | None = None
    energy_price_per_kwh: float | None = None
    energy_price_currency: str = "USD"
    pue: float = 1.0
    clock_ticks_per_second: int = 100
    state_file: str = ""  # restart state; empty: off
    metrics_level: str = "container"  # one of kwatt.ledger.METRIC_LEVELS
    attribution: AttributionConfig = field(default_factory=AttributionConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    once: bool = False


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


def _positive_duration(key: str, value: object) -> float:
    return parse_duration(key, value)


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
            "kubeconfig to use instead of the in-cluster service account", "FILE"),
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
    Setting("--metrics.level", "metrics.level", "metrics_level",
            lambda k, v: _choice(k, v, METRIC_LEVELS),
            "finest series: container (default), pod, workload or namespace; finer labels "
            "are empty (docs/metrics.md, series per level)", "LEVEL"),
)

# Keys only the YAML file (or env) sets: nested and rarely changed.
FILE_ONLY: dict[str, tuple[str, Callable[[str, object], Any]]] = {
    "gpu.resource_names": ("gpu_resource_names", _string_list),
    "kubernetes.pod_label_allowlist": ("pod_label_allowlist", _string_list),
    "kubernetes.service_account_dir": ("service_account_dir", _string),
    "host.docker_root": ("docker_root", _string),
    "retention_max_containers": (
        "max_retained_containers", lambda k, v: _int(k, v, minimum=1)),
    "carbon.intensity_grams_per_kwh": (
        "carbon_intensity_grams_per_kwh", lambda k, v: _float(k, v, minimum=0)),
    "cost.price_per_kwh": ("energy_price_per_kwh", lambda k, v: _float(k, v, minimum=0)),
    "cost.currency": ("energy_price_currency", _string),
    "pue": ("pue", lambda k, v: _float(k, v, minimum=1.0, maximum=3.0)),
    "attribution.idle_policy": (
        "attribution.idle_policy", lambda k, v: _choice(k, v, IDLE_POLICIES)),
    "attribution.idle_watts.cpu": (
        "attribution.idle_watts_cpu", lambda k, v: _float(k, v, minimum=0)),
    "attribution.idle_watts.dram": (
        "attribution.idle_watts_dram", lambda k, v: _float(k, v, minimum=0)),
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
    parser.add_argument("--config", metavar="FILE", help="YAML config file")
    for setting in SETTINGS:
        parser.add_argument(setting.flag, dest=setting.dest, metavar=setting.metavar,
                            help=f"{setting.help} [env {setting.env}]")
    parser.add_argument("--once", action="store_true",
                        help="take two samples one interval apart, print a table, exit")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    return parser


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
        for path, raw in load_yaml(args.config).items():
            if path in yaml_keys:
                setting = yaml_keys[path]
                _set(values, setting.dest, setting.parse(path, raw))
            elif path in FILE_ONLY:
                dest, parse = FILE_ONLY[path]
                _set(values, dest, parse(path, raw))
            else:
                raise ConfigError(f"{args.config}: unknown key {path!r}")

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

    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {"attribution": {}, "model": {}}
    for dest, value in values.items():
        group, _, name = dest.partition(".")
        if name:
            nested[group][name] = value
        else:
            top[dest] = value
    attribution = AttributionConfig(**nested["attribution"])
    model = ModelConfig(**nested["model"])
    if model.cpu_watts_max_per_vcpu < model.cpu_watts_idle_per_vcpu:
        raise ConfigError(
            "model.cpu_watts_max_per_vcpu: must be >= model.cpu_watts_idle_per_vcpu "
            f"({model.cpu_watts_max_per_vcpu:g} < {model.cpu_watts_idle_per_vcpu:g})")
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
    clock_ticks = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return Config(attribution=attribution, model=model, once=bool(args.once),
                  clock_ticks_per_second=int(clock_ticks), **top)
