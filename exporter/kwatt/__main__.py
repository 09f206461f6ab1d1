"""kwatt-exporter: command-line entry point."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from prometheus_client import CollectorRegistry
from prometheus_client.gc_collector import GCCollector
from prometheus_client.process_collector import ProcessCollector

from kwatt import __version__
from kwatt.config import Config, ConfigError, load_config, split_listen_address
from kwatt.gpu_stage import GpuUnavailable, build_gpu_stage
from kwatt.logs import configure_logging
from kwatt.metrics import KwattCollector, StaticInfo
from kwatt.once import run_once
from kwatt.sampler import EnergyStage, Sampler
from kwatt.web import build_app, start_server
from kwatt.webconfig import WebConfig, build_ssl_context, load_web_config, secure_app
from kwatt.workloads.kubernetes import build_kubernetes, kubernetes_enabled
from kwatt.workloads.naming import HostNamer, WorkloadNamer

log = logging.getLogger("kwatt")

UNHEALTHY_AFTER_INTERVALS = 3


def _health(sampler: Sampler, config: Config, started: float):  # type: ignore[no-untyped-def]
    def healthy() -> tuple[bool, str]:
        snap = sampler.snapshot()
        limit = UNHEALTHY_AFTER_INTERVALS * config.interval_seconds
        last = snap.last_cycle_monotonic if snap.last_cycle_monotonic is not None else started
        age = time.monotonic() - last
        if age > limit:
            return False, f"no sampler cycle completed in {age:.1f}s (limit {limit:.1f}s)"
        return True, f"ok: {snap.cycles} cycles, last {age:.1f}s ago"
    return healthy


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if "--version" in args:
        print(f"kwatt-exporter {__version__}")
        return 0
    try:
        config = load_config(args)
        web_config = load_web_config(config.web_config_file) \
            if config.web_config_file else WebConfig()
        ssl_context = build_ssl_context(web_config.tls) if web_config.tls else None
    except ConfigError as exc:
        print(f"kwatt-exporter: {exc}", file=sys.stderr)
        return 2
    configure_logging(config.log_level, config.log_format)

    namer: WorkloadNamer = HostNamer(config.docker_root)
    try:
        gpu = build_gpu_stage(config)
    except GpuUnavailable as exc:
        print(f"kwatt-exporter: {exc}", file=sys.stderr)
        return 2
    stages: list[EnergyStage] = [gpu[0]] if gpu else []
    kube = None
    if kubernetes_enabled(config):
        try:
            kube = build_kubernetes(config)
        except ConfigError as exc:
            print(f"kwatt-exporter: {exc}", file=sys.stderr)
            return 2
        namer = kube.namer
        stages.append(kube.stage)
        kube.watcher.start()
    else:
        log.info("host mode: workloads are systemd units and Docker/Podman containers, "
                 "named from their cgroups", extra={"kubernetes": config.kubernetes})
    # In Kubernetes mode host services and Docker containers stay in the node's system share.
    sampler = Sampler(config, namer, include_host_units=kube is None, stages=stages)
    if config.once:
        return run_once(sampler, namer, config.interval_seconds, config.node_name,
                        sys.stdout, time.sleep)

    host, port = split_listen_address(config.listen_address)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(KwattCollector(sampler.snapshot, StaticInfo(
        node=config.node_name, interval_seconds=config.interval_seconds,
        carbon_intensity_grams_per_kwh=config.carbon_intensity_grams_per_kwh,
        energy_price_per_kwh=config.energy_price_per_kwh,
        energy_price_currency=config.energy_price_currency, pue=config.pue)))
    if gpu is not None:
        registry.register(gpu[1])
    if kube is not None:
        registry.register(kube.collector)
    ProcessCollector(registry=registry)
    GCCollector(registry=registry)

    started = time.monotonic()
    app = secure_app(build_app(registry, _health(sampler, config, started)), web_config)
    try:
        server, _ = start_server(app, host, port, ssl_context=ssl_context)
    except OSError as exc:
        print(f"kwatt-exporter: --web.listen-address: cannot listen on "
              f"{config.listen_address}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    bound = server.server_address
    log.info("kwatt exporter started", extra={
        "version": __version__, "node": config.node_name,
        "listen": f"{bound[0]!s}:{bound[1]}", "interval_seconds": config.interval_seconds,
        "tls": web_config.tls is not None, "basic_auth": bool(web_config.basic_auth_users)})

    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        log.info("shutting down", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    sampler.run(stop)
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
