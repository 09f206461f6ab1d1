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
from kwatt.gpu_stage import GpuUnavailable
from kwatt.logs import configure_logging
from kwatt.once import run_once
from kwatt.webconfig import WebConfig, build_ssl_context, load_web_config

log = logging.getLogger("kwatt")


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

    try:
        exporter = Exporter(config, web_config, ssl_context)
    except (ConfigError, GpuUnavailable) as exc:
        print(f"kwatt-exporter: {exc}", file=sys.stderr)
        return 2
    exporter.start_watch()
    if config.once:
        return run_once(exporter.sampler, exporter.namer, config.interval_seconds,
                        config.node_name, sys.stdout, time.sleep)

    try:
        server = exporter.serve()
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
    exporter.sampler.run(stop)
    server.shutdown()
    exporter.save_state()
    exporter.stop_watch()
    return 0


if __name__ == "__main__":
    sys.exit(main())
