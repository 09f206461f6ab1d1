"""The assembled exporter: sources, sampler, collectors and HTTP app, wired once.

``__main__`` builds one from the command line; tests build one around fakes (an NVML
backend, a kubelet socket, a fake API server) and get exactly the wiring users run.
"""

from __future__ import annotations

import logging
import os
import ssl
import time
from collections.abc import Callable
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from kwatt.config import Config, split_listen_address
from kwatt.cycle_metrics import CycleCollector, StageRenderer
from kwatt.gpu_stage import build_gpu_stage
from kwatt.metrics import StaticInfo
from kwatt.sampler import EnergyStage, PublishedCycle, Sampler
from kwatt.sources.nvml import NvmlBackend
from kwatt.state import StateFile
from kwatt.statekeeper import StateKeeper
from kwatt.web import WSGIApp, build_app, start_server
from kwatt.webconfig import WebConfig, secure_app
from kwatt.workloads.kubernetes import KubernetesParts, build_kubernetes, kubernetes_enabled
from kwatt.workloads.naming import HostNamer, WorkloadNamer

log = logging.getLogger("kwatt")

UNHEALTHY_AFTER_INTERVALS = 3


class Exporter:
    """Builds every part; raises ConfigError or GpuUnavailable before anything starts."""

    def __init__(self, config: Config, web_config: WebConfig | None = None,
                 ssl_context: ssl.SSLContext | None = None,
                 gpu_backend_factory: Callable[[], NvmlBackend] | None = None) -> None:
        self.config = config
        self.web_config = web_config or WebConfig()
        self.ssl_context = ssl_context
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
        stage_renderers: dict[int, StageRenderer] = {0: gpu[1]} if gpu else {}
        self.registry.register(CycleCollector(self._scraped_cycle, StaticInfo(
            node=config.node_name, interval_seconds=config.interval_seconds,
            carbon_intensity_grams_per_kwh=config.carbon_intensity_grams_per_kwh,
            energy_price_per_kwh=config.energy_price_per_kwh,
            energy_price_currency=config.energy_price_currency, pue=config.pue),
            stage_renderers))
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

    def app(self) -> WSGIApp:
        return secure_app(build_app(self.registry, self.healthy), self.web_config)

    def serve(self) -> WSGIServer:
        """Start the HTTP server in a thread; raises OSError when it cannot listen."""
        host, port = split_listen_address(self.config.listen_address)
        server, _ = start_server(self.app(), host, port, ssl_context=self.ssl_context)
        return server

    def stop_watch(self) -> None:
        if self.kube is not None:
            self.kube.watcher.stop()
            self.kube.watcher.join(5)
