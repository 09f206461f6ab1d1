"""HTTP endpoints: /metrics (Prometheus), /healthz (sampler liveness), / (landing page)."""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import make_wsgi_app
from prometheus_client.registry import CollectorRegistry

from kwatt.logs import RateLimitedLog

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_LANDING = b"""<!doctype html><html><head><title>kwatt exporter</title></head><body>
<h1>kwatt exporter</h1><p><a href="/metrics">Metrics</a> &middot;
<a href="/healthz">Health</a></p></body></html>
"""


# A client that connects and then stalls must not hold a thread (or a TLS handshake) forever.
CONNECTION_TIMEOUT_SECONDS = 30.0

log = logging.getLogger("kwatt.web")
_connection_errors = RateLimitedLog(log)


class _QuietHandler(WSGIRequestHandler):
    timeout = CONNECTION_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        return  # one log line per scrape would drown the useful ones

    def get_environ(self) -> dict[str, Any]:
        environ: dict[str, Any] = super().get_environ()
        if isinstance(self.connection, ssl.SSLSocket):
            environ["HTTPS"] = "on"  # makes wsgiref report wsgi.url_scheme https
        return environ


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    # Set by start_server when TLS is on. The handshake runs in the request's own thread
    # (not in accept()), so one slow or broken client cannot stall the others.
    ssl_context: ssl.SSLContext | None = None

    def finish_request(self, request: Any, client_address: Any) -> None:
        if self.ssl_context is None:
            super().finish_request(request, client_address)
            return
        request.settimeout(CONNECTION_TIMEOUT_SECONDS)
        try:
            tls = self.ssl_context.wrap_socket(request, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            _connection_errors.log(logging.WARNING, "tls-handshake",
                                   "TLS handshake failed", client=str(client_address[0]),
                                   error=str(exc))
            return
        try:
            super().finish_request(tls, client_address)
        finally:
            tls.close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver would print a traceback to stderr; one rate-limited line instead.
        _connection_errors.log(logging.WARNING, "connection", "HTTP connection failed",
                               client=str(client_address[0]))


class _DualStackServer(_ThreadingWSGIServer):
    address_family = socket.AF_INET6

    def server_bind(self) -> None:
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        super().server_bind()


def build_app(registry: CollectorRegistry, healthy: Callable[[], tuple[bool, str]]) -> WSGIApp:
    metrics_app = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            ok, reason = healthy()
            start_response("200 OK" if ok else "503 Service Unavailable",
                           [("Content-Type", "text/plain; charset=utf-8")])
            return [reason.encode() + b"\n"]
        if path == "/":
            start_response("200 OK", [("Content-Type", "text/html; charset=utf-8")])
            return [_LANDING]
        start_response("404 Not Found", [("Content-Type", "text/plain; charset=utf-8")])
        return [b"not found\n"]

    return app


def start_server(app: WSGIApp, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None,
                 ) -> tuple[WSGIServer, threading.Thread]:
    """Serve in a daemon thread. An empty host listens on all interfaces (IPv4 and IPv6).

    With ``ssl_context`` every connection is TLS (see kwatt.webconfig).
    """
    server_class: type[WSGIServer] = _ThreadingWSGIServer
    bind_host = host
    if host == "":
        if socket.has_ipv6:
            server_class, bind_host = _DualStackServer, "::"
        else:
            bind_host = "0.0.0.0"
    elif ":" in host:
        server_class = type("_V6Server", (_ThreadingWSGIServer,),
                            {"address_family": socket.AF_INET6})
    server = make_server(bind_host, port, app, server_class=server_class,
                         handler_class=_QuietHandler)
    if ssl_context is not None:
        server.ssl_context = ssl_context  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server, thread
