"""The assembled exporter: sources, sampler, collectors and HTTP app, wired once.

``__main__`` builds one from the command line; tests build one around fakes (an NVML
backend, a kubelet socket, a fake API server) and get exactly the wiring users run.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import ssl
import threading
import time
from collections.abc import Callable, Iterable, Mapping

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from kwatt.certwatch import DEFAULT_PERIOD_SECONDS, CertWatcher
from kwatt.config import Config, split_listen_address
from kwatt.cycle_metrics import CycleCollector, StageRenderer
from kwatt.faults import Fault
from kwatt.gpu_stage import build_gpu_stage
from kwatt.metrics import StaticInfo
from kwatt.model_info import EstimationModelCollector
from kwatt.otlp import OtlpPusher
from kwatt.reload import LIVE_SETTINGS, changed_settings
from kwatt.sampler import EnergyStage, PublishedCycle, Sampler
from kwatt.signals.families import carbon_family, price_family, renderer
from kwatt.signals.nodezone import NodeLabelZone
from kwatt.signals.stage import SignalStage, build_signal_stage, static_zone
from kwatt.sources.gpu import GpuBackend
from kwatt.sources.hwmon import build_hwmon_cpu_meter, build_hwmon_meters
from kwatt.sources.ipmi import build_ipmi_meter
from kwatt.sources.meter import PlatformMeter
from kwatt.sources.model import Coefficients, choose_coefficients
from kwatt.sources.redfish import build_redfish_meter
from kwatt.stages.platform import PlatformStage
from kwatt.state import StateFile
from kwatt.statekeeper import StateKeeper
from kwatt.web import (
    DEFAULT_LIMITS,
    HTTPServer,
    ServerCollector,
    ServerLimits,
    build_app,
    cached_metrics_app,
    start_server,
)
from kwatt.webconfig import SecureApp, WebConfig, secure_app
from kwatt.workloads.kubernetes import (
    KubernetesParts,
    api_client_for,
    build_kubernetes,
    kubernetes_enabled,
)
from kwatt.workloads.naming import HostNamer, WorkloadNamer
from kwatt.workloads.node import instance_type_of, read_node_labels
from kwatt.workloads.resourceslices import SliceStore

log = logging.getLogger("kwatt")

UNHEALTHY_AFTER_INTERVALS = 3
# A watch stuck in a hanging API call must not hold up SIGTERM (the pod has 2 s).
WATCH_STOP_JOIN_SECONDS = 0.5
SIGNAL_STOP_JOIN_SECONDS = 0.2  # a poller waits on an event; only a stuck fetch is left


class _Swappable(Collector):
    """Delegates to a collector that a reload may replace in one assignment.

    ``everything_else`` is the registry without this collector: the families that change
    on every scrape (process, Python, HTTP server, Kubernetes watch, and any collector
    registered later), rendered per scrape after the cycle's cached exposition."""

    def __init__(self, inner: Collector, registry: CollectorRegistry) -> None:
        self.inner = inner
        self._registry = registry
        self._skipping = threading.local()  # set while everything_else renders

    def collect(self) -> Iterable[Metric]:
        if getattr(self._skipping, "on", False):
            return []
        return self.inner.collect()

    def everything_else(self) -> Collector:
        swappable = self

        class _Rest(Collector):
            def collect(self) -> Iterable[Metric]:
                swappable._skipping.on = True
                try:
                    return list(swappable._registry.collect())
                finally:
                    swappable._skipping.on = False

        return _Rest()

    def exposition(self, openmetrics: bool, gzipped: bool) -> bytes:
        inner = self.inner
        assert isinstance(inner, CycleCollector)
        return inner.exposition(openmetrics, gzipped)


def _static_info(config: Config, node_labels: Mapping[str, str] | None) -> StaticInfo:
    return StaticInfo(
        node=config.node_name, interval_seconds=config.interval_seconds,
        carbon_intensity_grams_per_kwh=config.carbon_intensity_grams_per_kwh,
        energy_price_per_kwh=config.energy_price_per_kwh,
        energy_price_currency=config.energy_price_currency, pue=config.pue,
        carbon_zone=static_zone(config, "carbon"), price_zone=static_zone(config, "cost"),
        embodied_grams_per_second=embodied_grams_per_second(config, node_labels))


def _estimation_coefficients(config: Config,
                             node_labels: Mapping[str, str] | None) -> Coefficients:
    """The estimation model's per-vCPU watts for this node, from /proc/cpuinfo and, when
    allowed, the node's instance-type label (read at start); logged once."""
    cpuinfo: str | None = None
    try:
        with open(os.path.join(config.procfs, "cpuinfo"), encoding="utf-8",
                  errors="replace") as handle:
            cpuinfo = handle.read(1 << 20)
    except OSError as exc:
        log.info("cannot read cpuinfo for the estimation model",
                 extra={"error": exc.strerror, "procfs": config.procfs})
    instance_type: str | None = None
    if node_labels is not None and config.kubernetes_read_node:
        instance_type = instance_type_of(node_labels)
    chosen = choose_coefficients(config.model, cpuinfo, instance_type)
    log.info("estimation model coefficients", extra={
        "basis": chosen.basis, "microarchitecture": chosen.microarchitecture,
        "instance_type": chosen.instance_type,
        "idle_watts_per_vcpu": chosen.idle_watts_per_vcpu,
        "max_watts_per_vcpu": chosen.max_watts_per_vcpu})
    return chosen


def _with_coefficients(config: Config, chosen: Coefficients) -> Config:
    return dataclasses.replace(config, model=dataclasses.replace(
        config.model, cpu_watts_idle_per_vcpu=chosen.idle_watts_per_vcpu,
        cpu_watts_max_per_vcpu=chosen.max_watts_per_vcpu))


SECONDS_PER_YEAR = 365.25 * 86400


def embodied_grams_per_second(config: Config,
                              node_labels: Mapping[str, str] | None = None) -> float | None:
    """SCI's M per second: the hardware's embodied kg CO2e spread evenly over its
    expected lifetime (linear amortisation, as SCI's time share does). The first entry of
    embodied.by_node_labels that this node's labels match wins; embodied.kg_co2e is the
    fallback (also when the labels could not be read)."""
    kg, years = config.embodied_kg_co2e, config.embodied_lifetime_years
    for rule in config.embodied_by_node_labels:
        if node_labels is not None and rule.matches(node_labels):
            kg = rule.kg_co2e
            years = rule.lifetime_years if rule.lifetime_years is not None else years
            break
    if kg is None:
        return None
    return kg * 1000.0 / (years * SECONDS_PER_YEAR)


def _read_node_labels(config: Config, kubernetes: bool
                      ) -> tuple[dict[str, str] | None, Fault | None]:
    """This node's labels, read once at start when something uses them: the instance
    type (kubernetes.read_node), the embodied carbon per node type, the zone label of the
    carbon and price sources. One GET for all; only the zone's lookup retries a failure
    (on its poller's thread)."""
    wanted = (config.kubernetes_read_node and config.model.auto_coefficients) or \
        bool(config.embodied_by_node_labels) or bool(
            config.carbon_source.zone_node_label or config.price_source.zone_node_label)
    if not kubernetes or not wanted:
        if config.embodied_by_node_labels and not kubernetes:
            log.warning("embodied.by_node_labels needs Kubernetes mode; embodied.kg_co2e "
                        "applies")
        return None, None
    labels, fault = read_node_labels(api_client_for(config), config.node_name)
    if fault is not None:
        log.warning("cannot read this node's labels at start; the estimation model uses "
                    "/proc/cpuinfo alone, embodied carbon its fallback embodied.kg_co2e, a "
                    "zone label is retried by its source",
                    extra={"reason": fault.reason, "detail": fault.detail})
    return labels, fault


class Exporter:
    """Builds every part; raises ConfigError or GpuUnavailable before anything starts."""

    def __init__(self, config: Config, web_config: WebConfig | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 gpu_backend_factory: Callable[[], GpuBackend] | None = None,
                 server_limits: ServerLimits = DEFAULT_LIMITS,
                 tls_reload_period_seconds: float = DEFAULT_PERIOD_SECONDS,
                 clock: Callable[[], float] = time.monotonic,
                 gpu_read_wait_seconds: float | None = None,
                 amd_backend_factory: Callable[[], GpuBackend] | None = None) -> None:
        self.config = config
        self.web_config = web_config or WebConfig()
        self.ssl_context = ssl_context
        self.server_limits = server_limits
        self.server: HTTPServer | None = None
        self._tls_reload_period = tls_reload_period_seconds
        self._cert_watcher: CertWatcher | None = None
        self._secure: SecureApp | None = None
        self.namer: WorkloadNamer = HostNamer(config.docker_root)
        # Platform meters (hwmon here; out-of-band meters join this list) -> `other`.
        # First, so that a configured sensor that is missing stops the start before
        # anything else is built or logged.
        self.meters: list[PlatformMeter] = list(build_hwmon_meters(config))
        for remote in (build_redfish_meter(config), build_ipmi_meter(config)):
            if remote is not None:  # polled on their own threads: never delay a cycle
                self.meters.append(remote)
        self.platform = PlatformStage(self.meters, config) if self.meters else None
        hwmon_cpu, cpu_driver = build_hwmon_cpu_meter(config)
        kubernetes = kubernetes_enabled(config)
        # DRA devices become GPU UUIDs through the node's ResourceSlices: watched only on a
        # GPU node in Kubernetes mode with --gpu.dra on.
        slices = SliceStore() if kubernetes and config.gpu_dra == "on" else None
        gpu = build_gpu_stage(config, gpu_backend_factory, slices=slices,
                              read_wait_seconds=gpu_read_wait_seconds,
                              amd_backend_factory=amd_backend_factory)
        self._gpu_stage = gpu[0] if gpu else None
        stages: list[EnergyStage] = [gpu[0]] if gpu else []
        self.kube: KubernetesParts | None = None
        if kubernetes:
            self.kube = build_kubernetes(config, slices=slices if gpu else None)
            self.namer = self.kube.namer
            stages.append(self.kube.stage)
        else:
            log.info("host mode: workloads are systemd units and Docker/Podman containers, "
                     "named from their cgroups", extra={"kubernetes": config.kubernetes})
        if self.meters:
            log.info("platform meters: the node's `other` component is the meter minus cpu, "
                     "dram and gpu", extra={"meters": ",".join(m.source for m in self.meters)})
        if hwmon_cpu is not None:
            log.info("CPU-socket hwmon meter found; used for cpu when RAPL is not readable",
                     extra={"driver": cpu_driver})
        self.node_labels, node_fault = _read_node_labels(config, self.kube is not None)
        self.coefficients = _estimation_coefficients(config, self.node_labels)
        # Fetched carbon intensity and price: stages without energy, polled on their own
        # threads (kwatt.signals); rendered from the same published cycle as the rest.
        signal_renderers: dict[int, StageRenderer] = {}
        self.signal_stages: list[SignalStage] = []
        for prefix, family in (("carbon", carbon_family), ("cost", price_family)):
            signal_stage = build_signal_stage(config, prefix, self._zone_lookup(prefix))
            if signal_stage is not None:
                signal_renderers[len(stages)] = renderer(config.node_name, family)
                stages.append(signal_stage)
                self.signal_stages.append(signal_stage)
        # In Kubernetes mode host services and Docker containers stay in the node's
        # system share. The sampler gets the coefficients chosen for this node; self.config
        # stays as loaded, so a reload compares like with like.
        self.sampler = Sampler(_with_coefficients(config, self.coefficients), self.namer,
                               clock=clock, include_host_units=self.kube is None,
                               stages=stages, platform=self.platform, hwmon_cpu=hwmon_cpu)
        self.state: StateKeeper | None = None
        if config.state_file and not config.once:
            self.state = StateKeeper(
                StateFile(config.state_file),
                os.path.join(config.procfs, "sys", "kernel", "random", "boot_id"),
                self.sampler, gpu[0] if gpu else None)
            self.state.restore()
            self.sampler.on_cycle = self.state.cycle_done
        if node_fault is not None:  # once: the labels are read at start only
            self.sampler.ledger.count_error(node_fault.source, node_fault.reason)
        self.otlp: OtlpPusher | None = None
        self.registry = CollectorRegistry(auto_describe=False)
        # The GPU stage, when there is one, is stage 0; its families are rendered from the
        # same published cycle as the node's.
        self._stage_renderers: dict[int, StageRenderer] = {0: gpu[1]} if gpu else {}
        self._stage_renderers.update(signal_renderers)
        self._kwatt_collector = _Swappable(CycleCollector(
            self._scraped_cycle, _static_info(config, self.node_labels),
            self._stage_renderers), self.registry)
        self.registry.register(self._kwatt_collector)
        self.registry.register(ServerCollector(
            lambda: self.server.stats if self.server is not None else None,
            config.node_name))
        if self.kube is not None:
            self.registry.register(self.kube.collector)
        self.registry.register(EstimationModelCollector(self.coefficients, config.node_name))
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._started = time.monotonic()

    def _zone_lookup(self, prefix: str) -> NodeLabelZone | None:
        signal = self.config.carbon_source if prefix == "carbon" else \
            self.config.price_source
        if not signal.zone_node_label or self.kube is None:
            return None
        return NodeLabelZone(self.kube.api_client, self.config.node_name,
                             signal.zone_node_label, signal.timeout_seconds,
                             known_labels=self.node_labels)

    def _scraped_cycle(self) -> PublishedCycle:
        cycle = self.sampler.published()
        if self.state is not None:
            self.state.served(cycle.ledger)
        return cycle

    def save_state(self) -> None:
        """At shutdown: the counters of the last snapshot a scrape saw, for the next start."""
        if self.state is not None:
            self.state.flush()

    def start_otlp(self) -> None:
        """Start pushing over OTLP (--otlp.endpoint); raises OtlpUnavailable without the
        optional packages."""
        if not self.config.otlp_endpoint:
            return
        self.otlp = OtlpPusher(self.registry.collect, self.config.otlp_endpoint,
                               self.config.node_name, self.config.otlp_interval_seconds)
        self.otlp.start()

    def start_watch(self) -> None:
        if self.kube is not None:
            self.kube.watcher.start()
            if self.kube.slices is not None:
                self.kube.slices.start()
        if not self.config.once:
            for signal_stage in self.signal_stages:
                signal_stage.poller.start()

    def healthy(self) -> tuple[bool, str]:
        snap = self.sampler.snapshot()
        limit = UNHEALTHY_AFTER_INTERVALS * self.config.interval_seconds
        last = snap.last_cycle_monotonic if snap.last_cycle_monotonic is not None \
            else self._started
        age = time.monotonic() - last
        if age > limit:
            return False, f"no sampler cycle completed in {age:.1f}s (limit {limit:.1f}s)"
        return True, f"ok: {snap.cycles} cycles, last {age:.1f}s ago"

    def app(self) -> SecureApp:
        if self._secure is None:
            self._secure = secure_app(build_app(
                self.registry, self.healthy, cached_metrics_app(
                    self.registry, self._kwatt_collector,
                    self._kwatt_collector.everything_else())), self.web_config)
        return self._secure

    def serve(self) -> HTTPServer:
        """Start the HTTP server in a thread; raises OSError when it cannot listen."""
        host, port = split_listen_address(self.config.listen_address)
        self.server, _ = start_server(self.app(), host, port, ssl_context=self.ssl_context,
                                      limits=self.server_limits)
        self._watch_certificates()
        return self.server

    def _watch_certificates(self) -> None:
        if self._cert_watcher is not None:
            self._cert_watcher.stop()
            self._cert_watcher = None
        if self.server is None or self.web_config.tls is None:
            return
        server = self.server

        def use(context: ssl.SSLContext) -> None:
            self.ssl_context = context
            server.ssl_context = context

        self._cert_watcher = CertWatcher(self.web_config.tls, use, self._tls_reload_period)
        self._cert_watcher.start()

    def reload(self, config: Config, web_config: WebConfig,
               ssl_context: ssl.SSLContext | None) -> list[str]:
        """Apply a re-read configuration (SIGHUP): the web config (users, headers, TLS) and
        the settings in LIVE_SETTINGS take effect now; returns the names of changed
        settings that need a restart, which keep their running values."""
        live, restart = changed_settings(self.config, config)
        kept = {dest: getattr(self.config, dest) for dest in (
            f.name for f in dataclasses.fields(Config)) if dest not in LIVE_SETTINGS}
        self.config = dataclasses.replace(config, **kept)
        if live:
            self._kwatt_collector.inner = CycleCollector(
                self._scraped_cycle, _static_info(self.config, self.node_labels),
                self._stage_renderers)
        self.web_config = web_config
        self.ssl_context = ssl_context
        self.app().update(web_config)
        if self.server is not None:
            self.server.ssl_context = ssl_context
            self._watch_certificates()
        return restart

    def stop(self) -> None:
        """Stop serving and watching, each bounded: a hanging dependency cannot delay it."""
        if self.otlp is not None:
            self.otlp.stop()
        if self._cert_watcher is not None:
            self._cert_watcher.stop()
        if self.server is not None:
            self.server.shutdown(timeout=1.0)
        self.stop_watch()
        if self._gpu_stage is not None:
            self._gpu_stage.stop()
        self.close_meters()

    def close_meters(self) -> None:
        """Stop the meters' polling threads (slow meters); bounded by each meter."""
        for meter in self.meters:
            meter.close()

    def stop_watch(self) -> None:
        for signal_stage in self.signal_stages:
            signal_stage.poller.stop(SIGNAL_STOP_JOIN_SECONDS)
        if self.kube is not None:
            self.kube.watcher.stop()
            if self.kube.slices is not None:
                self.kube.slices.stop()
            self.kube.watcher.join(WATCH_STOP_JOIN_SECONDS)
            if self.kube.slices is not None:
                self.kube.slices.join(WATCH_STOP_JOIN_SECONDS)
