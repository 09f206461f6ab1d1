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
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import Metric
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from kwatt.certwatch import DEFAULT_PERIOD_SECONDS, CertWatcher
from kwatt.config import Config, split_listen_address
from kwatt.cycle_metrics import CycleCollector, StageRenderer
from kwatt.gpu_stage import build_gpu_stage
from kwatt.metrics import StaticInfo
from kwatt.reload import LIVE_SETTINGS, changed_settings
from kwatt.sampler import EnergyStage, PublishedCycle, Sampler
from kwatt.sources.nvml import NvmlBackend
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
from kwatt.workloads.kubernetes import KubernetesParts, build_kubernetes, kubernetes_enabled
from kwatt.workloads.naming import HostNamer, WorkloadNamer

log = logging.getLogger("kwatt")

UNHEALTHY_AFTER_INTERVALS = 3
# A watch stuck in a hanging API call must not hold up SIGTERM (the pod has 2 s).
WATCH_STOP_JOIN_SECONDS = 0.5


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


def _static_info(config: Config) -> StaticInfo:
    return StaticInfo(
        node=config.node_name, interval_seconds=config.interval_seconds,
        carbon_intensity_grams_per_kwh=config.carbon_intensity_grams_per_kwh,
        energy_price_per_kwh=config.energy_price_per_kwh,
        energy_price_currency=config.energy_price_currency, pue=config.pue)


class Exporter:
    """Builds every part; raises ConfigError or GpuUnavailable before anything starts."""

    def __init__(self, config: Config, web_config: WebConfig | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 gpu_backend_factory: Callable[[], NvmlBackend] | None = None,
                 server_limits: ServerLimits = DEFAULT_LIMITS,
                 tls_reload_period_seconds: float = DEFAULT_PERIOD_SECONDS) -> None:
        self.config = config
        self.web_config = web_config or WebConfig()
        self.ssl_context = ssl_context
        self.server_limits = server_limits
        self.server: HTTPServer | None = None
        self._tls_reload_period = tls_reload_period_seconds
        self._cert_watcher: CertWatcher | None = None
        self._secure: SecureApp | None = None
        self.namer: WorkloadNamer = HostNamer(config.docker_root)
        gpu = build_gpu_stage(config, gpu_backend_factory)
        stages: list[EnergyStage] = [gpu[0]] if gpu else []
        self.kube: KubernetesParts | None = None
        if kubernetes_enabled(config):
            self.kube = build_kubernetes(config)
            self.namer = self.kube.namer
            stages.append(self.kube.stage)
        else:
            log.info("host mode: workloads are systemd units and Docker/Podman containers, "
                     "named from their cgroups", extra={"kubernetes": config.kubernetes})
        # In Kubernetes mode host services and Docker containers stay in the node's
        # system share.
        self.sampler = Sampler(config, self.namer, include_host_units=self.kube is None,
                               stages=stages)
        self.state: StateKeeper | None = None
        if config.state_file and not config.once:
            self.state = StateKeeper(
                StateFile(config.state_file),
                os.path.join(config.procfs, "sys", "kernel", "random", "boot_id"),
                self.sampler, gpu[0] if gpu else None)
            self.state.restore()
            self.sampler.on_cycle = self.state.cycle_done
        self.registry = CollectorRegistry(auto_describe=False)
        # The GPU stage, when there is one, is stage 0; its families are rendered from the
        # same published cycle as the node's.
        self._stage_renderers: dict[int, StageRenderer] = {0: gpu[1]} if gpu else {}
        self._kwatt_collector = _Swappable(CycleCollector(
            self._scraped_cycle, _static_info(config), self._stage_renderers), self.registry)
        self.registry.register(self._kwatt_collector)
        self.registry.register(ServerCollector(
            lambda: self.server.stats if self.server is not None else None,
            config.node_name))
        if self.kube is not None:
            self.registry.register(self.kube.collector)
        ProcessCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        self._started = time.monotonic()

    def _scraped_cycle(self) -> PublishedCycle:
        cycle = self.sampler.published()
        if self.state is not None:
            self.state.served(cycle.ledger)
        return cycle

    def save_state(self) -> None:
        """At shutdown: the counters of the last snapshot a scrape saw, for the next start."""
        if self.state is not None:
            self.state.flush()

    def start_watch(self) -> None:
        if self.kube is not None:
            self.kube.watcher.start()

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
                self._scraped_cycle, _static_info(self.config), self._stage_renderers)
        self.web_config = web_config
        self.ssl_context = ssl_context
        self.app().update(web_config)
        if self.server is not None:
            self.server.ssl_context = ssl_context
            self._watch_certificates()
        return restart

    def stop(self) -> None:
        """Stop serving and watching, each bounded: a hanging dependency cannot delay it."""
        if self._cert_watcher is not None:
            self._cert_watcher.stop()
        if self.server is not None:
            self.server.shutdown(timeout=1.0)
        self.stop_watch()

    def stop_watch(self) -> None:
        if self.kube is not None:
            self.kube.watcher.stop()
            self.kube.watcher.join(WATCH_STOP_JOIN_SECONDS)
