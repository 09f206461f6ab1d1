"""TLS and basic auth for the HTTP endpoints, from an exporter-toolkit web config file.

The file format is the one Prometheus exporters share (``--web.config.file``)::

    tls_server_config:
      cert_file: /etc/kwatt/tls/tls.crt
      key_file: /etc/kwatt/tls/tls.key
      client_ca_file: /etc/kwatt/tls/ca.crt          # optional, for client certificates
      client_auth_type: RequireAndVerifyClientCert   # optional
      min_version: TLS12                             # optional
    http_server_config:
      headers: {X-Content-Type-Options: nosniff}     # optional
    basic_auth_users:
      prometheus: $2y$10$...                         # bcrypt hashes

A problem at startup is a startup error (``ConfigError``, exit 2) rather than a scrape
that fails later; on SIGHUP the file is read again and a bad one is logged while the running
settings stay (kwatt.__main__). Changed certificate files are picked up without a signal
(kwatt.certwatch). Keys kwatt does not implement are rejected by name instead of being
silently ignored.

``/healthz`` stays reachable without credentials so kubelet probes (which cannot send
basic auth) keep working; it reveals only whether the sampler is cycling.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import re
import ssl
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import bcrypt

from kwatt.config import ConfigError, read_yaml_file

StartResponse = Callable[..., Any]
WSGIApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]

UNAUTHENTICATED_PATHS = frozenset({"/healthz"})

_TLS_VERSIONS = {
    "TLS10": ssl.TLSVersion.TLSv1,
    "TLS11": ssl.TLSVersion.TLSv1_1,
    "TLS12": ssl.TLSVersion.TLSv1_2,
    "TLS13": ssl.TLSVersion.TLSv1_3,
}
_CLIENT_AUTH = {
    "NoClientCert": ssl.CERT_NONE,
    "VerifyClientCertIfGiven": ssl.CERT_OPTIONAL,
    "RequireAndVerifyClientCert": ssl.CERT_REQUIRED,
}
# Toolkit keys kwatt knows but does not implement, with the reason given to the user.
_UNSUPPORTED = {
    "tls_server_config.cert": "inline certificates are not supported; use cert_file",
    "tls_server_config.key": "inline keys are not supported; use key_file",
    "tls_server_config.client_ca": "inline CAs are not supported; use client_ca_file",
    "tls_server_config.client_allowed_sans": "not supported by kwatt",
    "tls_server_config.cipher_suites": "not supported by kwatt (Python's defaults are used)",
    "tls_server_config.curve_preferences": "not supported by kwatt",
    "tls_server_config.prefer_server_cipher_suites": "not supported by kwatt",
    "rate_limit": "not supported by kwatt",
}
_KNOWN = {
    "": {"tls_server_config", "http_server_config", "basic_auth_users"},
    "tls_server_config": {"cert_file", "key_file", "client_ca_file", "client_auth_type",
                          "min_version", "max_version"},
    # http2 is accepted for compatibility; kwatt serves HTTP/1.1, which every client speaks.
    "http_server_config": {"http2", "headers"},
}
_ALLOWED_HEADERS = ("Content-Security-Policy", "X-Frame-Options", "X-Content-Type-Options",
                    "X-XSS-Protection", "Strict-Transport-Security")
# $2a$/$2b$/$2y$, two-digit cost, 22 characters of salt and 31 of hash.
_BCRYPT_RE = re.compile(r"^\$2[aby]\$(\d\d)\$[./A-Za-z0-9]{53}$")
# Each step doubles the work: 10 takes ~60 ms, 14 about a second, 31 would take days
# (and is checked once at start). htpasswd -B writes 5 to 17; 10 to 12 is the usual choice.
BCRYPT_MIN_COST = 4
BCRYPT_MAX_COST = 14


@dataclass(frozen=True)
class TLSSettings:
    cert_file: str
    key_file: str
    client_ca_file: str | None = None
    client_auth_type: str = "NoClientCert"
    min_version: str = "TLS12"
    max_version: str = "TLS13"


@dataclass(frozen=True)
class WebConfig:
    tls: TLSSettings | None = None
    basic_auth_users: Mapping[str, str] = field(default_factory=dict)
    headers: tuple[tuple[str, str], ...] = ()


def _where(path: str, section: str, key: str = "") -> str:
    dotted = ".".join(p for p in (section, key) if p)
    return f"{path}: {dotted}" if dotted else path


def _check_keys(path: str, section: str, node: Mapping[Any, Any]) -> None:
    for key in node:
        dotted = f"{section}.{key}" if section else str(key)
        if dotted in _UNSUPPORTED:
            raise ConfigError(f"{path}: {dotted}: {_UNSUPPORTED[dotted]}")
        if key not in _KNOWN[section]:
            raise ConfigError(f"{path}: unknown key {dotted!r}")


def _mapping(path: str, section: str, value: object) -> Mapping[Any, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{_where(path, section)}: expected a mapping, got {value!r}")
    return value


def _readable_file(path: str, section: str, key: str, value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{_where(path, section, key)}: expected a file name, got {value!r}")
    if not os.path.isfile(value):
        raise ConfigError(f"{_where(path, section, key)}: no such file {value}")
    if not os.access(value, os.R_OK):
        raise ConfigError(f"{_where(path, section, key)}: cannot read {value}")
    return value


def _choice(path: str, section: str, key: str, value: object, choices: Iterable[str],
            default: str) -> str:
    if value is None:
        return default
    options = list(choices)
    if not isinstance(value, str) or value not in options:
        raise ConfigError(f"{_where(path, section, key)}: must be one of "
                          f"{', '.join(options)}, got {value!r}")
    return value


def _parse_tls(path: str, node: Mapping[Any, Any]) -> TLSSettings:
    section = "tls_server_config"
    _check_keys(path, section, node)
    for required in ("cert_file", "key_file"):
        if node.get(required) is None:
            raise ConfigError(f"{_where(path, section, required)}: required when "
                              f"{section} is set")
    cert = _readable_file(path, section, "cert_file", node["cert_file"])
    key = _readable_file(path, section, "key_file", node["key_file"])
    ca = node.get("client_ca_file")
    ca_file = _readable_file(path, section, "client_ca_file", ca) if ca is not None else None
    auth_default = "RequireAndVerifyClientCert" if ca_file else "NoClientCert"
    raw_auth = node.get("client_auth_type")
    if raw_auth in ("RequestClientCert", "RequireAnyClientCert"):
        raise ConfigError(f"{_where(path, section, 'client_auth_type')}: {raw_auth} accepts "
                          "unverified certificates and is not supported; use "
                          "RequireAndVerifyClientCert")
    auth = _choice(path, section, "client_auth_type", raw_auth, _CLIENT_AUTH, auth_default)
    if auth != "NoClientCert" and ca_file is None:
        raise ConfigError(f"{_where(path, section, 'client_ca_file')}: required when "
                          f"client_auth_type is {auth}")
    if auth == "NoClientCert" and ca_file is not None:
        raise ConfigError(f"{_where(path, section, 'client_auth_type')}: NoClientCert "
                          "ignores client_ca_file; use RequireAndVerifyClientCert")
    min_version = _choice(path, section, "min_version", node.get("min_version"),
                          _TLS_VERSIONS, "TLS12")
    max_version = _choice(path, section, "max_version", node.get("max_version"),
                          _TLS_VERSIONS, "TLS13")
    if _TLS_VERSIONS[min_version] > _TLS_VERSIONS[max_version]:
        raise ConfigError(f"{_where(path, section, 'min_version')}: {min_version} is above "
                          f"max_version {max_version}")
    return TLSSettings(cert, key, ca_file, auth, min_version, max_version)


def _parse_users(path: str, node: Mapping[Any, Any]) -> dict[str, str]:
    users: dict[str, str] = {}
    for user, hashed in node.items():
        where = _where(path, "basic_auth_users", str(user))
        if not isinstance(user, str) or not user or ":" in user:
            raise ConfigError(f"{where}: user names must be non-empty strings without ':'")
        match = _BCRYPT_RE.match(hashed) if isinstance(hashed, str) else None
        if match is None:
            raise ConfigError(f"{where}: not a bcrypt hash (expected $2y$<cost>$..., "
                              "e.g. from htpasswd -nBC 10)")
        cost = int(match.group(1))
        if cost > BCRYPT_MAX_COST:
            raise ConfigError(f"{where}: bcrypt cost {cost} is above the maximum of "
                              f"{BCRYPT_MAX_COST}; use 10 to 12")
        if cost < BCRYPT_MIN_COST:
            raise ConfigError(f"{where}: bcrypt cost {cost} is below the minimum of "
                              f"{BCRYPT_MIN_COST}")
        assert isinstance(hashed, str)
        try:
            # One check now rejects hashes the regex lets through (e.g. a cost of 99).
            bcrypt.checkpw(b"", hashed.encode())
        except ValueError as exc:
            raise ConfigError(f"{where}: invalid bcrypt hash ({exc})") from None
        users[user] = hashed
    return users


def _parse_headers(path: str, node: Mapping[Any, Any]) -> tuple[tuple[str, str], ...]:
    section = "http_server_config"
    _check_keys(path, section, node)
    http2 = node.get("http2")
    if http2 is not None and not isinstance(http2, bool):
        raise ConfigError(f"{_where(path, section, 'http2')}: expected true or false")
    headers = _mapping(path, f"{section}.headers", node.get("headers"))
    out: list[tuple[str, str]] = []
    for name, value in headers.items():
        if name not in _ALLOWED_HEADERS:
            raise ConfigError(f"{path}: {section}.headers: unknown header {name!r} (allowed: "
                              f"{', '.join(_ALLOWED_HEADERS)})")
        if not isinstance(value, str) or "\n" in value or "\r" in value:
            raise ConfigError(f"{path}: {section}.headers.{name}: expected a one-line string")
        if value:
            out.append((name, value))
    return tuple(out)


def load_web_config(path: str) -> WebConfig:
    """Read and validate a web config file; every problem is a ConfigError naming the key."""
    data = read_yaml_file(path, "--web.config.file")
    root = _mapping(path, "", data)
    _check_keys(path, "", root)
    tls_node = root.get("tls_server_config")
    tls = _parse_tls(path, _mapping(path, "tls_server_config", tls_node)) \
        if tls_node is not None else None
    users = _parse_users(path, _mapping(path, "basic_auth_users", root.get("basic_auth_users")))
    headers = _parse_headers(path, _mapping(path, "http_server_config",
                                            root.get("http_server_config")))
    if tls is not None:
        build_ssl_context(tls, path)  # a bad key or certificate is reported with the file
    return WebConfig(tls=tls, basic_auth_users=users, headers=headers)


def build_ssl_context(tls: TLSSettings, source: str = "--web.config.file") -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _TLS_VERSIONS[tls.min_version]
    context.maximum_version = _TLS_VERSIONS[tls.max_version]
    try:
        context.load_cert_chain(tls.cert_file, tls.key_file)
    except (ssl.SSLError, OSError) as exc:
        raise ConfigError(f"{source}: tls_server_config: cannot load cert_file "
                          f"{tls.cert_file} with key_file {tls.key_file}: {exc}") from None
    context.verify_mode = _CLIENT_AUTH[tls.client_auth_type]
    if tls.client_ca_file is not None:
        try:
            context.load_verify_locations(cafile=tls.client_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"{source}: tls_server_config.client_ca_file: cannot load "
                              f"{tls.client_ca_file}: {exc}") from None
    return context


def bcrypt_cost(hashed: bytes) -> int:
    return int(hashed.split(b"$")[2])


class BasicAuthChecker:
    """Checks basic-auth credentials against bcrypt hashes, as exporter-toolkit does but
    with failures bounded.

    - A bcrypt check costs tens of milliseconds by design; Prometheus sends the same
      credentials every scrape, so verified credentials are cached under a SHA-256 of
      user and password (the password itself is never kept), in their own bounded cache
      that failed guesses cannot evict. Recent failures are cached too (a scraper with a
      stale password costs one check, not one per scrape).
    - An unknown user is checked against a decoy hash of the highest configured cost, so
      it takes as long as a wrong password for a known user and timing does not tell
      which user names exist.
    - Credentials not in the cache run one bcrypt at a time, and a failed check is
      followed by a pause as long as the check (no CPU), so failures use at most half a
      core. While ``max_waiting`` more wait, further ones are refused without a check.
      Brute force therefore costs a bounded share of one core and a few worker threads,
      and verified scrapes, answered from the cache, never wait behind it.
    """

    def __init__(self, users: Mapping[str, str], cache_size: int = 64,
                 checkpw: Callable[[bytes, bytes], bool] = bcrypt.checkpw,
                 max_waiting: int = 2,
                 pause: Callable[[float], None] = time.sleep,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._users = {user.encode(): hashed.encode() for user, hashed in users.items()}
        self._verified: OrderedDict[bytes, None] = OrderedDict()
        self._failed: OrderedDict[bytes, None] = OrderedDict()
        self._cache_size = cache_size
        self._checkpw = checkpw
        self._lock = threading.Lock()
        self._unverified = threading.Lock()
        self._waiting = 0
        self._max_waiting = max_waiting
        self.refused = 0  # checks refused because max_waiting were already queued
        self._pause = pause
        self._clock = clock
        cost = max((bcrypt_cost(h) for h in self._users.values()), default=10)
        self._decoy = bcrypt.hashpw(b"kwatt-decoy", bcrypt.gensalt(rounds=cost))

    def _cached(self, key: bytes) -> bool | None:
        with self._lock:
            if key in self._verified:
                self._verified.move_to_end(key)
                return True
            if key in self._failed:
                return False
            return None

    def check(self, user: bytes, password: bytes) -> bool:
        key = hashlib.sha256(user + b"\x00" + password).digest()
        cached = self._cached(key)
        if cached is not None:
            return cached
        with self._lock:
            if self._waiting > self._max_waiting:
                self.refused += 1
                return False
            self._waiting += 1
        try:
            with self._unverified:
                cached = self._cached(key)  # the same credentials may just have been checked
                if cached is not None:
                    return cached
                started = self._clock()
                verdict = self._bcrypt(user, password)
                if not verdict:  # halves the CPU a stream of wrong guesses can take
                    self._pause(self._clock() - started)
        finally:
            with self._lock:
                self._waiting -= 1
        with self._lock:
            cache = self._verified if verdict else self._failed
            cache[key] = None
            while len(cache) > self._cache_size:
                cache.popitem(last=False)
        return verdict

    def _bcrypt(self, user: bytes, password: bytes) -> bool:
        hashed = self._decoy
        known = False
        for name, candidate in self._users.items():
            if hmac.compare_digest(name, user):
                hashed, known = candidate, True
        try:
            return self._checkpw(password, hashed) and known
        except ValueError:  # bcrypt refuses passwords over 72 bytes
            return False


def _credentials(header: str) -> tuple[bytes, bytes] | None:
    scheme, _, encoded = header.strip().partition(" ")
    if scheme.lower() != "basic" or not encoded:
        return None
    try:
        decoded = base64.b64decode(encoded.strip(), validate=True)
    except (binascii.Error, ValueError):
        return None
    user, sep, password = decoded.partition(b":")
    return (user, password) if sep else None


class SecureApp:
    """Wraps an app with basic auth (all paths but /healthz) and the configured headers.

    ``update`` swaps the users and headers in one assignment, so a reload (SIGHUP) applies
    to the next request without a restart and a request never sees half of each.
    """

    def __init__(self, app: WSGIApp, config: WebConfig,
                 checker: BasicAuthChecker | None = None) -> None:
        self._app = app
        self._settings = self._build(config, checker)

    @staticmethod
    def _build(config: WebConfig, checker: BasicAuthChecker | None
               ) -> tuple[BasicAuthChecker | None, list[tuple[str, str]]]:
        if checker is None and config.basic_auth_users:
            checker = BasicAuthChecker(config.basic_auth_users)
        return checker, list(config.headers)

    def update(self, config: WebConfig) -> None:
        self._settings = self._build(config, None)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse
                 ) -> Iterable[bytes]:
        users_checker, extra_headers = self._settings

        def respond(status: str, headers: list[tuple[str, str]],
                    exc_info: Any = None) -> Any:
            return start_response(status, headers + extra_headers, exc_info)

        if users_checker is not None and environ.get("PATH_INFO") not in UNAUTHENTICATED_PATHS:
            creds = _credentials(environ.get("HTTP_AUTHORIZATION", ""))
            if creds is None or not users_checker.check(*creds):
                respond("401 Unauthorized", [
                    ("Content-Type", "text/plain; charset=utf-8"),
                    ("WWW-Authenticate", 'Basic realm="kwatt", charset="UTF-8"')])
                return [b"Unauthorized\n"]
        return self._app(environ, respond)


def secure_app(app: WSGIApp, config: WebConfig,
               checker: BasicAuthChecker | None = None) -> SecureApp:
    """Wrap ``app`` with basic auth (all paths but /healthz) and the configured headers."""
    return SecureApp(app, config, checker)
