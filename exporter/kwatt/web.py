"""HTTP endpoints: /metrics (Prometheus), /healthz (sampler liveness), / (landing page).

The server is built for hostile and overloaded clients rather than for features:

- One selector thread holds every connection (a few KiB each, no thread per connection)
  and does the TLS handshakes and request-head reads, all non-blocking.
- A connection must finish its TLS handshake and request head within
  ``head_timeout_seconds`` of connecting (a total deadline, so trickling one header line at
  a time does not extend it); a kept-alive connection must start its next request within
  ``idle_timeout_seconds``; a response must be written within ``write_timeout_seconds``.
- At most ``max_connections`` are open. A new connection over the cap closes the oldest one
  still waiting for its request (handshake, head, or keep-alive idle), so slow clients can
  never lock out a real scrape, which finishes its head in milliseconds.
- Complete requests run the WSGI app on a small pool of worker threads.
- Every connection the server drops is counted by reason
  (``kwatt_http_connections_dropped_total``) and logged as one rate-limited line, never a
  traceback.
"""

from __future__ import annotations

import collections
import gzip
import io
import logging
import os
import queue
import selectors
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.registry import Collector, CollectorRegistry

from kwatt.fdlimit import raise_open_file_limit
from kwatt.logs import RateLimitedLog

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

_LANDING = b"""<!doctype html><html><head><title>kwatt exporter</title></head><body>
<h1>kwatt exporter</h1><p><a href="/metrics">Metrics</a> &middot;
<a href="/healthz">Health</a></p></body></html>
"""

log = logging.getLogger("kwatt.web")

# Reasons a connection is dropped by the server; each is a label value of
# kwatt_http_connections_dropped_total.
DROP_REASONS = ("limit", "handshake_timeout", "head_timeout", "write_timeout",
                "head_too_large", "bad_request", "tls_error", "reset")


@dataclass(frozen=True)
class ServerLimits:
    """What one client may hold. The defaults fit a scrape every few seconds from a few
    Prometheus servers, with room for 1,000 hostile connections in well under 80 MB."""

    max_connections: int = 1024
    # Connect -> TLS handshake done and the whole request head read.
    head_timeout_seconds: float = 10.0
    # A kept-alive connection waiting for its next request.
    idle_timeout_seconds: float = 60.0
    # A response being written to a client that does not read it.
    write_timeout_seconds: float = 30.0
    max_head_bytes: int = 16 * 1024
    max_body_bytes: int = 64 * 1024
    # Basic auth may hold three (one bcrypt, two waiting): the others keep answering.
    workers: int = 6
    # The kernel caps this at net.core.somaxconn.
    backlog: int = 1024


DEFAULT_LIMITS = ServerLimits()


class ServerStats:
    """Counters the selector thread keeps; read by the collector (no I/O at scrape)."""

    def __init__(self) -> None:
        self.open_connections = 0
        self.accepted = 0
        self.dropped: dict[str, int] = dict.fromkeys(DROP_REASONS, 0)


class ServerCollector(Collector):
    def __init__(self, stats: Callable[[], ServerStats | None], node: str) -> None:
        self._stats = stats
        self._node = node

    def collect(self) -> Iterator[Metric]:
        stats = self._stats()
        if stats is None:
            return
        open_now = GaugeMetricFamily(
            "kwatt_http_connections", "HTTP connections open now (all states).",
            labels=("node",))
        open_now.add_metric((self._node,), stats.open_connections)
        yield open_now
        dropped = CounterMetricFamily(
            "kwatt_http_connections_dropped_total",
            "HTTP connections the server closed early, by reason: limit (over the "
            "connection cap), handshake_timeout, head_timeout, write_timeout, "
            "head_too_large, bad_request, tls_error, reset (by the client).",
            labels=("node", "reason"))
        for reason in DROP_REASONS:
            dropped.add_metric((self._node, reason), stats.dropped[reason])
        yield dropped


# Connection phases.
_HANDSHAKE, _HEAD, _BUSY, _WRITE = "handshake", "head", "busy", "write"


class _Connection:
    __slots__ = ("addr", "body_wanted", "buffer", "deadline", "fd", "idle", "keep_alive",
                 "out", "phase", "sock", "tls")

    def __init__(self, sock: socket.socket, addr: Any, tls: bool, deadline: float) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.addr = addr
        self.tls = tls
        self.phase = _HANDSHAKE if tls else _HEAD
        self.deadline = deadline
        self.idle = False  # waiting for a kept-alive connection's next request
        self.buffer = bytearray()
        self.body_wanted = -1
        self.out = memoryview(b"")
        self.keep_alive = False


class _BadRequest(Exception):
    def __init__(self, status: str, reason: str) -> None:
        super().__init__(status)
        self.status = status
        self.reason = reason


def _client(addr: Any) -> str:
    return str(addr[0]) if isinstance(addr, tuple) and addr else str(addr)


def _status_only(status: str) -> bytes:
    body = status.split(" ", 1)[1].encode() + b"\n"
    return (f"HTTP/1.1 {status}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode() + body


class HTTPServer:
    """A selector-driven HTTP/1.1 server that runs a WSGI app on a bounded worker pool."""

    def __init__(self, app: WSGIApp, host: str, port: int,
                 ssl_context: ssl.SSLContext | None = None,
                 limits: ServerLimits = DEFAULT_LIMITS,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.app = app
        # Read once per accepted connection; a swap applies to new connections only.
        self.ssl_context = ssl_context
        self.limits = limits
        self.stats = ServerStats()
        self._clock = clock
        self._listener = _listen(host, port, limits.backlog)
        self.server_address: Any = self._listener.getsockname()
        self._server_name = host or "localhost"
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._conns: dict[int, _Connection] = {}
        # Connections waiting for a client (handshake, head, keep-alive idle), oldest first:
        # the ones a new connection over the cap displaces.
        self._waiting: collections.OrderedDict[int, _Connection] = collections.OrderedDict()
        self._jobs: queue.SimpleQueue[tuple[_Connection, dict[str, Any]] | None] = \
            queue.SimpleQueue()
        self._done: collections.deque[tuple[_Connection, bytes, bool]] = collections.deque()
        self._next_expiry = 0.0
        self._stopping = threading.Event()
        self._stopped = threading.Event()
        self._workers = [threading.Thread(target=self._work, name=f"http-worker-{i}",
                                          daemon=True) for i in range(limits.workers)]
        self._errors = RateLimitedLog(log)
        raise_open_file_limit(limits.max_connections + 64)

    # -- lifecycle -----------------------------------------------------------------------

    def serve_forever(self) -> None:
        for worker in self._workers:
            worker.start()
        self._listener.setblocking(False)
        self._selector.register(self._listener, selectors.EVENT_READ, "listen")
        self._selector.register(self._wake_r, selectors.EVENT_READ, "wake")
        try:
            while not self._stopping.is_set():
                self._loop_once()
        finally:
            for conn in list(self._conns.values()):
                self._close(conn)
            for _ in self._workers:
                self._jobs.put(None)
            self._selector.close()
            self._stopped.set()

    def shutdown(self, timeout: float = 5.0) -> None:
        """Stop serving and close every connection; returns once the loop has stopped."""
        self._stopping.set()
        self._wake()
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        self._listener.close()
        self._wake_r.close()
        self._wake_w.close()

    # -- the selector loop ---------------------------------------------------------------

    def _loop_once(self) -> None:
        events = self._selector.select(timeout=0.25)
        for key, _events in events:
            if key.data == "listen":
                self._accept()
            elif key.data == "wake":
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
            else:
                client: _Connection = key.data
                if self._conns.get(client.fd) is client:
                    self._guarded(client, self._step, client)
        while self._done:
            conn, response, keep_alive = self._done.popleft()
            # Identity, not the fd: a closed connection's fd may already serve another.
            if self._conns.get(conn.fd) is conn:
                self._guarded(conn, self._respond, conn, response, keep_alive)
        now = self._clock()
        if now >= self._next_expiry:
            self._next_expiry = now + 0.25
            self._expire()

    def _guarded(self, conn: _Connection, action: Callable[..., None], *args: Any) -> None:
        """A bug in handling one connection costs that connection, never the server."""
        try:
            action(*args)
        except Exception as exc:
            self._errors.log(logging.ERROR, "bug", "HTTP connection failed",
                             client=_client(conn.addr), error=f"{type(exc).__name__}: {exc}")
            if self._conns.get(conn.fd) is conn:
                self._close(conn)

    def _wake(self) -> None:
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass  # the pipe is full: the loop is going to wake up anyway

    def _accept(self) -> None:
        for _ in range(64):  # bounded so a flood of connects cannot starve the others
            try:
                sock, addr = self._listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: log, keep serving the others
                self._errors.log(logging.WARNING, "accept", "cannot accept a connection",
                                 error=str(exc))
                return
            self.stats.accepted += 1
            if len(self._conns) >= self.limits.max_connections:
                if not self._waiting:
                    self._drop_socket(sock, addr, "limit")
                    continue
                self._drop(next(iter(self._waiting.values())), "limit")
            sock.setblocking(False)
            context = self.ssl_context
            now = self._clock()
            try:
                if context is not None:
                    sock = context.wrap_socket(sock, server_side=True,
                                               do_handshake_on_connect=False)
            except (ssl.SSLError, OSError) as exc:
                self._drop_socket(sock, addr, "tls_error", exc)
                continue
            conn = _Connection(sock, addr, context is not None,
                               now + self.limits.head_timeout_seconds)
            self._conns[conn.fd] = conn
            self._waiting[conn.fd] = conn
            self.stats.open_connections = len(self._conns)
            self._selector.register(sock, selectors.EVENT_READ, conn)

    def _step(self, conn: _Connection) -> None:
        if conn.phase == _HANDSHAKE:
            self._handshake(conn)
        elif conn.phase == _HEAD:
            self._read(conn)
        elif conn.phase == _WRITE:
            self._write(conn)

    def _handshake(self, conn: _Connection) -> None:
        sock = conn.sock
        assert isinstance(sock, ssl.SSLSocket)
        try:
            sock.do_handshake()
        except ssl.SSLWantReadError:
            self._want(conn, selectors.EVENT_READ)
            return
        except ssl.SSLWantWriteError:
            self._want(conn, selectors.EVENT_WRITE)
            return
        except (ConnectionError, TimeoutError) as exc:
            self._drop(conn, "reset", exc)
            return
        except (ssl.SSLError, OSError) as exc:
            self._drop(conn, "tls_error", exc)
            return
        conn.phase = _HEAD
        self._want(conn, selectors.EVENT_READ)
        self._read(conn)  # application data may have come with the last handshake record

    def _want(self, conn: _Connection, events: int) -> None:
        self._selector.modify(conn.sock, events, conn)

    def _read(self, conn: _Connection) -> None:
        limit = self.limits.max_head_bytes + self.limits.max_body_bytes
        while True:
            try:
                data = conn.sock.recv(16384)
            except (ssl.SSLWantReadError, BlockingIOError, InterruptedError):
                break
            except ssl.SSLWantWriteError:
                self._want(conn, selectors.EVENT_WRITE)
                return
            except (ConnectionError, TimeoutError) as exc:
                self._drop(conn, "reset", exc)
                return
            except (ssl.SSLError, OSError) as exc:
                self._drop(conn, "tls_error" if conn.tls else "reset", exc)
                return
            if not data:
                if conn.buffer:
                    self._drop(conn, "reset")
                else:
                    self._close(conn)  # an orderly close between requests
                return
            if conn.idle:  # the next request has begun: its head gets the full deadline
                conn.idle = False
                conn.deadline = self._clock() + self.limits.head_timeout_seconds
            conn.buffer += data
            if len(conn.buffer) > limit:
                break
        self._try_dispatch(conn)

    def _try_dispatch(self, conn: _Connection) -> None:
        try:
            parsed = self._parse(conn)
        except _BadRequest as bad:
            self._reject(conn, bad.status, bad.reason)
            return
        if parsed is None:
            self._want(conn, selectors.EVENT_READ)
            return
        environ, keep_alive = parsed
        conn.phase = _BUSY
        conn.keep_alive = keep_alive
        self._waiting.pop(conn.fd, None)
        self._selector.unregister(conn.sock)
        self._jobs.put((conn, environ))

    def _parse(self, conn: _Connection) -> tuple[dict[str, Any], bool] | None:
        """A complete request's WSGI environ, None while incomplete; _BadRequest if bad."""
        buffer = conn.buffer
        end = buffer.find(b"\r\n\r\n")
        if end < 0:
            if len(buffer) > self.limits.max_head_bytes:
                raise _BadRequest("431 Request Header Fields Too Large", "head_too_large")
            return None
        if end > self.limits.max_head_bytes:
            raise _BadRequest("431 Request Header Fields Too Large", "head_too_large")
        lines = bytes(buffer[:end]).decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or parts[2] not in ("HTTP/1.0", "HTTP/1.1") or not parts[0] \
                or not parts[0].isalpha() or not parts[1].startswith("/"):
            raise _BadRequest("400 Bad Request", "bad_request")
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep or not name or name != name.strip() or " " in name:
                raise _BadRequest("400 Bad Request", "bad_request")
            key = name.lower()
            value = value.strip()
            headers[key] = f"{headers[key]}, {value}" if key in headers else value
        if "transfer-encoding" in headers:
            raise _BadRequest("501 Not Implemented", "bad_request")
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit():
            raise _BadRequest("400 Bad Request", "bad_request")
        length = int(length_text)
        if length > self.limits.max_body_bytes:
            raise _BadRequest("413 Content Too Large", "bad_request")
        start = end + 4
        if len(buffer) < start + length:
            return None
        body = bytes(buffer[start:start + length])
        del buffer[:start + length]
        connection = headers.get("connection", "").lower()
        keep_alive = version == "HTTP/1.1" and "close" not in connection
        path, _, query = target.partition("?")
        environ: dict[str, Any] = {
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": urllib.parse.unquote(path, "latin-1"),
            "QUERY_STRING": query,
            "SERVER_NAME": self._server_name,
            "SERVER_PORT": str(self.server_address[1]),
            "SERVER_PROTOCOL": version,
            "REMOTE_ADDR": _client(conn.addr),
            "CONTENT_LENGTH": str(length) if length else "",
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "https" if conn.tls else "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        }
        if conn.tls:
            environ["HTTPS"] = "on"
        for key, value in headers.items():
            if key == "content-type":
                environ["CONTENT_TYPE"] = value
            elif key != "content-length":
                environ["HTTP_" + key.upper().replace("-", "_")] = value
        return environ, keep_alive

    def _reject(self, conn: _Connection, status: str, reason: str) -> None:
        self._count(conn, reason)
        conn.phase = _BUSY
        self._waiting.pop(conn.fd, None)
        self._selector.unregister(conn.sock)
        self._respond(conn, _status_only(status), keep_alive=False)

    def _respond(self, conn: _Connection, response: bytes, keep_alive: bool) -> None:
        conn.phase = _WRITE
        conn.keep_alive = keep_alive
        conn.out = memoryview(response)
        conn.deadline = self._clock() + self.limits.write_timeout_seconds
        self._selector.register(conn.sock, selectors.EVENT_WRITE, conn)
        self._write(conn)

    def _write(self, conn: _Connection) -> None:
        while conn.out:
            try:
                sent = conn.sock.send(conn.out)
            except (ssl.SSLWantWriteError, BlockingIOError, InterruptedError):
                self._want(conn, selectors.EVENT_WRITE)
                return
            except ssl.SSLWantReadError:
                self._want(conn, selectors.EVENT_READ)
                return
            except (OSError, ssl.SSLError) as exc:
                self._drop(conn, "reset", exc)
                return
            conn.out = conn.out[sent:]
        if not conn.keep_alive:
            self._close(conn)
            return
        conn.phase = _HEAD
        conn.idle = True
        conn.body_wanted = -1
        conn.deadline = self._clock() + self.limits.idle_timeout_seconds
        self._waiting[conn.fd] = conn
        self._want(conn, selectors.EVENT_READ)
        if conn.buffer:  # a pipelined request already here
            conn.idle = False
            conn.deadline = self._clock() + self.limits.head_timeout_seconds
            self._try_dispatch(conn)

    def _expire(self) -> None:
        now = self._clock()
        for conn in list(self._conns.values()):
            if conn.phase == _BUSY or now < conn.deadline:
                continue
            if conn.phase == _HANDSHAKE:
                self._drop(conn, "handshake_timeout")
            elif conn.phase == _WRITE:
                self._drop(conn, "write_timeout")
            elif conn.idle:
                self._close(conn)  # an idle keep-alive connection: normal, not counted
            else:
                self._drop(conn, "head_timeout")

    # -- closing -------------------------------------------------------------------------

    def _count(self, conn: _Connection | None, reason: str, error: BaseException | None = None,
               addr: Any = None) -> None:
        self.stats.dropped[reason] += 1
        fields: dict[str, Any] = {"reason": reason,
                                  "client": _client(conn.addr if conn is not None else addr)}
        if error is not None:
            fields["error"] = f"{type(error).__name__}: {error}"
        self._errors.log(logging.WARNING, reason, "HTTP connection dropped", **fields)

    def _drop(self, conn: _Connection, reason: str, error: BaseException | None = None) -> None:
        self._count(conn, reason, error)
        self._close(conn)

    def _drop_socket(self, sock: socket.socket, addr: Any, reason: str,
                     error: BaseException | None = None) -> None:
        self._count(None, reason, error, addr)
        sock.close()

    def _close(self, conn: _Connection) -> None:
        self._conns.pop(conn.fd, None)
        self._waiting.pop(conn.fd, None)
        self.stats.open_connections = len(self._conns)
        if conn.phase != _BUSY:
            try:
                self._selector.unregister(conn.sock)
            except (KeyError, ValueError):
                pass
        conn.phase = _BUSY  # a worker result for it is discarded
        try:
            conn.sock.close()
        except OSError:
            pass

    # -- workers -------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            conn, environ = job
            response = self._run_app(environ, conn.keep_alive)
            self._done.append((conn, response, conn.keep_alive))
            self._wake()

    def _run_app(self, environ: dict[str, Any], keep_alive: bool) -> bytes:
        started: list[Any] = []
        body: list[bytes] = []

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            if exc_info is not None and started:
                raise exc_info[1].with_traceback(exc_info[2])
            started[:] = [status, headers]
            return body.append

        try:
            result = self.app(environ, start_response)
            try:
                for chunk in result:
                    body.append(chunk)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            if not started:
                raise RuntimeError("the app did not call start_response")
        except Exception as exc:  # a bug in a collector: one line, a 500, keep serving
            self._errors.log(logging.ERROR, "app", "HTTP request failed",
                             path=str(environ.get("PATH_INFO")),
                             error=f"{type(exc).__name__}: {exc}")
            return _status_only("500 Internal Server Error")
        status, headers = started
        payload = b"".join(body)
        lines = [f"HTTP/1.1 {status}"]
        has_length = False
        for name, value in headers:
            lowered = name.lower()
            if lowered in ("connection", "transfer-encoding"):
                continue
            has_length = has_length or lowered == "content-length"
            lines.append(f"{name}: {value}")
        if not has_length:
            lines.append(f"Content-Length: {len(payload)}")
        lines.append("Connection: keep-alive" if keep_alive else "Connection: close")
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
        if environ["REQUEST_METHOD"] == "HEAD":
            return head
        return head + payload


def _listen(host: str, port: int, backlog: int) -> socket.socket:
    """An empty host listens on all interfaces (IPv6 and IPv4 where the kernel allows)."""
    family = socket.AF_INET
    bind_host = host
    dual_stack = False
    if host == "":
        if socket.has_ipv6:
            family, bind_host, dual_stack = socket.AF_INET6, "::", True
        else:
            bind_host = "0.0.0.0"
    elif ":" in host:
        family = socket.AF_INET6
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if dual_stack:
            try:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            except OSError:
                pass
        try:
            sock.bind((bind_host, port))
        except OSError:
            if not dual_stack:
                raise
            # No IPv6 on this host (disabled in the kernel): listen on IPv4 only.
            sock.close()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", port))
        sock.listen(backlog)
    except BaseException:
        sock.close()
        raise
    os.set_inheritable(sock.fileno(), False)
    return sock


class _Flight:
    __slots__ = ("done", "result")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.result: tuple[str, list[tuple[str, str]], bytes] = (
            "500 Internal Server Error", [("Content-Type", "text/plain; charset=utf-8")],
            b"render failed\n")


class SharedRender:
    """Scrapes that arrive while an identical one is being rendered share its result.

    Rendering ~1,000 series costs ~10 ms of CPU under the GIL, so 50 concurrent scrapers
    would otherwise queue 50 renders. A scrape joining a render in flight gets output at
    most one render old, as if it had arrived a few milliseconds earlier; "identical"
    means the same method, query, Accept and Accept-Encoding (the format and compression).
    """

    def __init__(self, app: WSGIApp) -> None:
        self._app = app
        self._lock = threading.Lock()
        self._flights: dict[tuple[str, ...], _Flight] = {}
        self.renders = 0

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        key = tuple(str(environ.get(k, "")) for k in (
            "REQUEST_METHOD", "QUERY_STRING", "HTTP_ACCEPT", "HTTP_ACCEPT_ENCODING"))
        with self._lock:
            flight = self._flights.get(key)
            leader = flight is None
            if flight is None:
                flight = self._flights[key] = _Flight()
        if leader:
            try:
                flight.result = self._render(environ)
            finally:
                with self._lock:
                    del self._flights[key]
                flight.done.set()
        else:
            flight.done.wait()
        status, headers, body = flight.result
        start_response(status, list(headers))
        return [body]

    def _render(self, environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        self.renders += 1
        started: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            started[:] = [status, headers]
            return lambda _: None

        body = b"".join(self._app(environ, start_response))
        return started[0], started[1], body


class CycleExposition(Protocol):
    """What renders the sampler's published cycle once for every scrape of it."""

    def exposition(self, openmetrics: bool, gzipped: bool) -> bytes: ...


def cached_metrics_app(registry: CollectorRegistry, cycle: CycleExposition,
                       live: Collector) -> WSGIApp:
    """/metrics from the published cycle's cached exposition followed by the families that
    change on every scrape (``live``: process, Python, server), rendered then.

    ``registry`` holds both and serves what the fast path does not cover: ``name[]``
    filters and formats other than text and OpenMetrics 1.x. With gzip the two parts are
    two gzip members, which gzip readers (Go's included) concatenate (RFC 1952, 2.2).
    """
    library = make_wsgi_app(registry)

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        query = urllib.parse.parse_qs(str(environ.get("QUERY_STRING", "")))
        encoder, content_type = choose_encoder(str(environ.get("HTTP_ACCEPT", "")))
        openmetrics = content_type.startswith("application/openmetrics-text")
        if "name[]" in query or (openmetrics and "version=1." not in content_type):
            return library(environ, start_response)  # type: ignore[no-any-return]
        gzipped = gzip_accepted(str(environ.get("HTTP_ACCEPT_ENCODING", "")))
        head = cycle.exposition(openmetrics, gzipped)
        tail = encoder(live)
        headers = [("Content-Type", content_type)]
        if gzipped:
            tail = gzip.compress(tail, 1, mtime=0)  # as the cached part (cycle_metrics)
            headers.append(("Content-Encoding", "gzip"))
        start_response("200 OK", headers)
        return [head, tail]

    return app


def build_app(registry: CollectorRegistry, healthy: Callable[[], tuple[bool, str]],
              metrics: WSGIApp | None = None) -> WSGIApp:
    """``metrics``: the /metrics app (cached_metrics_app); default: the registry as
    prometheus_client renders it."""
    metrics_app = SharedRender(metrics if metrics is not None else make_wsgi_app(registry))

    def app(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            return metrics_app(environ, start_response)
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
                 limits: ServerLimits = DEFAULT_LIMITS,
                 ) -> tuple[HTTPServer, threading.Thread]:
    """Serve in a daemon thread; raises OSError when it cannot listen.

    An empty host listens on all interfaces (IPv4 and IPv6). With ``ssl_context`` every
    connection is TLS (see kwatt.webconfig); assign ``server.ssl_context`` to rotate it.
    """
    server = HTTPServer(app, host, port, ssl_context, limits)
    thread = threading.Thread(target=server.serve_forever, name="http", daemon=True)
    thread.start()
    return server, thread
