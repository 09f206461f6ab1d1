"""kwatt-exporter: command-line entry point."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import time
from collections.abc import Sequence
from types import FrameType

from kwatt import __version__
from kwatt.config import ConfigError, load_config
from kwatt.exporter import Exporter
from kwatt.fdlimit import raise_open_file_limit
from kwatt.gpu_stage import GpuUnavailable
from kwatt.logs import configure_logging
from kwatt.once import run_once
from kwatt.otlp import OtlpUnavailable
from kwatt.webconfig import WebConfig, build_ssl_context, load_web_config

log = logging.getLogger("kwatt")

SAMPLER_JOIN_SECONDS = 0.5


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["report"]:
        # Imported here: the report is a Prometheus client, nothing the exporter loads.
        from kwatt.report import main as report_main
        return report_main(args[1:])
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
    raise_open_file_limit()  # held cgroup files and connections share the descriptors

    try:
        exporter = Exporter(config, web_config, ssl_context)
    except (ConfigError, GpuUnavailable) as exc:
        print(f"kwatt-exporter: {exc}", file=sys.stderr)
        return 2
    exporter.start_watch()
    if config.once:
        return run_once(exporter.sampler, exporter.namer, config.interval_seconds,
                        config.node_name, sys.stdout, time.sleep)

    signals = _Signals()
    signals.install()
    try:
        server = exporter.serve()
    except OSError as exc:
        print(f"kwatt-exporter: --web.listen-address: cannot listen on "
              f"{config.listen_address}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    try:
        exporter.start_otlp()
    except OtlpUnavailable as exc:
        print(f"kwatt-exporter: {exc}", file=sys.stderr)
        exporter.stop()
        return 2
    bound = server.server_address
    log.info("kwatt exporter started", extra={
        "version": __version__, "node": config.node_name,
        "listen": f"{bound[0]!s}:{bound[1]}", "interval_seconds": config.interval_seconds,
        "tls": web_config.tls is not None, "basic_auth": bool(web_config.basic_auth_users)})

    # The sampler runs on its own thread so that the main thread, which handles the
    # signals, is never stuck behind a read that hangs (a FIFO, a hung mount, an API).
    sampler = threading.Thread(target=exporter.sampler.run, args=(signals.stop,),
                               name="kwatt-sampler", daemon=True)
    sampler.start()
    reloader = _Reloader(args, exporter)
    while not signals.stop.is_set():
        signals.wake.wait(1.0)
        signals.wake.clear()
        if signals.stop.is_set():
            break
        if signals.reload.is_set():
            signals.reload.clear()
            reloader.reload()
    log.info("shutting down", extra={"signal": signals.received})
    exporter.stop()
    sampler.join(SAMPLER_JOIN_SECONDS)  # a blocked sampler is a daemon thread: left behind
    exporter.save_state()
    return 0


class _Signals:
    """Handlers only set flags; the main loop acts on them (logging or reloading inside a
    handler could deadlock on a lock the interrupted code holds)."""

    def __init__(self) -> None:
        self.stop = threading.Event()
        self.reload = threading.Event()
        self.wake = threading.Event()
        self.received = ""

    def install(self) -> None:
        signal.signal(signal.SIGTERM, self._on_stop)
        signal.signal(signal.SIGINT, self._on_stop)
        signal.signal(signal.SIGHUP, self._on_hup)

    def _on_stop(self, signum: int, frame: FrameType | None) -> None:
        self.received = signal.Signals(signum).name
        self.stop.set()
        self.wake.set()

    def _on_hup(self, signum: int, frame: FrameType | None) -> None:
        self.reload.set()
        self.wake.set()


class _Reloader:
    """SIGHUP: re-read --config and --web.config.file as Prometheus does. A bad file is
    one log line and the running configuration stays; nothing here may end the process."""

    def __init__(self, args: list[str], exporter: Exporter) -> None:
        self._args = args
        self._exporter = exporter
        self._restart_reported: list[str] = []

    def reload(self) -> None:
        try:
            config = load_config(self._args)
            web_config = load_web_config(config.web_config_file) \
                if config.web_config_file else WebConfig()
            ssl_context = build_ssl_context(web_config.tls) if web_config.tls else None
        except ConfigError as exc:
            log.error("reload failed; still running the previous configuration",
                      extra={"error": str(exc)})
            return
        except Exception as exc:  # a bug in a reader must not take the exporter down
            log.error("reload failed; still running the previous configuration",
                      extra={"error": f"{type(exc).__name__}: {exc}"})
            return
        before = self._exporter.config
        restart = self._exporter.reload(config, web_config, ssl_context)
        if (config.log_level, config.log_format) != (before.log_level, before.log_format):
            configure_logging(config.log_level, config.log_format)
        log.info("configuration reloaded", extra={
            "tls": web_config.tls is not None,
            "basic_auth": bool(web_config.basic_auth_users)})
        if restart and restart != self._restart_reported:
            log.warning("changed settings need a restart to take effect; they keep their "
                        "running values", extra={"keys": ",".join(restart)})
        self._restart_reported = restart


if __name__ == "__main__":
    sys.exit(main())
