"""One list+watch of this node's pods, on its own thread, feeding the pod index.

Protocol (the same as client-go's reflector, kept small):

* list ``/api/v1/pods?fieldSelector=spec.nodeName=<node>`` (first from the API server's
  watch cache with ``resourceVersion=0``; after 410 Gone a consistent list), paginated with
  ``limit``/``continue``;
* watch from the list's resourceVersion with ``allowWatchBookmarks=true`` and a server-side
  ``timeoutSeconds`` drawn at random from a range, so a fleet of nodes does not reconnect in
  step; each event (and each bookmark) advances the resourceVersion, so a reconnect resumes
  without a relist;
* 410 Gone (an ERROR event or an HTTP status) means the resourceVersion is too old: relist;
* other errors: exponential backoff with jitter; whatever happens, requests pass a token
  bucket: a burst of at most ``max_attempts_per_window``, then one per
  ``attempt_window_seconds / max_attempts_per_window`` (5 s by default), so a burst of
  reconnects delays the next watch by seconds, not by a whole window;
* every request carries a client-side timeout: a connect timeout and a read timeout that is
  the longest silence accepted on a watch (the API server sends a bookmark about every
  minute), so a hung connection is noticed, counted as a ``timeout`` fault and replaced.

* the API server is trusted to apply the fieldSelector but not relied on: pods of other
  nodes (a proxy or aggregator that drops the selector) are dropped and logged.

While the API is unreachable the index keeps the last mapping. Health is read by the sampler
each cycle through ``KubernetesHealthStage`` (kubernetes.py): up while a watch is open, or
within ``no_watch_grace_seconds`` of the last answer; down at once when a request fails.
"""

from __future__ import annotations

import collections
import json
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import quote

import urllib3

from kwatt.faults import Fault
from kwatt.logs import RateLimitedLog
from kwatt.text import is_clean
from kwatt.workloads.owners import (
    DEFAULT_OWNER_LOOKUPS,
    GONE,
    TOP,
    UNKNOWN,
    Lookup,
    ObjectRef,
    OwnerLookups,
    controller_ref,
)
from kwatt.workloads.podindex import OwnerResolver, PodRecord, PodStore, pod_record

log = logging.getLogger("kwatt.kubernetes")

SOURCE = "kubernetes"


@dataclass(frozen=True)
class WatchSettings:
    list_page_size: int = 500
    watch_timeout_min_seconds: int = 300
    watch_timeout_max_seconds: int = 600
    connect_timeout_seconds: float = 10.0
    read_timeout_seconds: float = 150.0  # longest silence accepted on a watch stream
    list_timeout_seconds: float = 60.0
    owner_timeout_seconds: float = 5.0
    backoff_initial_seconds: float = 0.5
    backoff_max_seconds: float = 30.0
    max_attempts_per_window: int = 12
    attempt_window_seconds: float = 60.0
    owner_cache_size: int = 4096
    # An owner's controller is read again after this long (ownerReferences rarely change).
    owner_cache_ttl_seconds: float = 600.0
    owner_forbidden_retry_seconds: float = 600.0
    owner_error_retry_seconds: float = 60.0  # after a 5xx or timeout: name rules meanwhile
    # A watch that stayed up this long resets the backoff.
    healthy_after_seconds: float = 10.0
    # With no watch open this long after the last answer (a reconnect that waits for the
    # request gate, or a request that hangs before its headers), the source is down.
    no_watch_grace_seconds: float = 10.0


DEFAULT_WATCH_SETTINGS = WatchSettings()


class GoneError(Exception):
    """410: the resourceVersion is older than the API server's history."""


class ApiRequests:
    """GET requests through the official client's ``ApiClient`` (kubeconfig or in-cluster
    auth, TLS, projected-token refresh) without the generated API classes: instantiating
    CoreV1Api, AppsV1Api and BatchV1Api costs about 27 MB of resident memory."""

    def __init__(self, api_client: Any) -> None:
        self._client = api_client

    def get(self, path: str, query: Mapping[str, object], timeout: tuple[float, float],
            accept: str = "application/json") -> Any:
        """The urllib3 response, body not read; raises ApiException on a non-2xx status."""
        from kubernetes.client.exceptions import ApiException

        params = self._client.param_serialize(
            method="GET", resource_path=path,
            query_params=[(k, v) for k, v in query.items() if v is not None],
            header_params={"Accept": accept}, auth_settings=["BearerToken"])
        response = self._client.call_api(*params, _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response


# Metadata only; plain JSON from a server that cannot (its metadata is read the same way).
PARTIAL_OBJECT_METADATA = \
    "application/json;as=PartialObjectMetadata;g=meta.k8s.io;v=v1,application/json"


@dataclass
class _CachedOwner:
    uid: str
    parent: ObjectRef | None
    fetched_at: float
    gone: bool = False


class ApiOwnerResolver(OwnerResolver):
    """Walks a pod's controlling owners through the API: one metadata-only ``get`` per
    owner (PartialObjectMetadata: no spec, no status, whatever the kind), never a list.

    RBAC: ``get`` on the kinds in ``lookups`` (``resource.group``, the chart's
    ``rbac.ownerKinds``); other kinds are not read. On 403 the lookups of that kind stop
    for ``owner_forbidden_retry_seconds`` (said once per kind in the log, counted each
    time) and labels and name rules answer; other failures pause that kind for
    ``owner_error_retry_seconds``.

    Cache (bounded LRU, ``owner_cache_size``) per object name: an entry is used for
    ``owner_cache_ttl_seconds``, and only for references carrying the same uid. A 404, or
    the name now held by another uid, marks the entry gone: references with its uid keep
    its last known owner (a run whose TrainJob was deleted keeps the TrainJob's name while
    its pods wind down), references with another uid read afresh.
    """

    def __init__(self, api_client: Any, settings: WatchSettings,
                 clock: Callable[[], float], report: Callable[[Fault], None],
                 lookups: tuple[str, ...] = DEFAULT_OWNER_LOOKUPS) -> None:
        self._api = ApiRequests(api_client)
        self._settings = settings
        self._clock = clock
        self._report = report
        self._lookups = OwnerLookups.parse(lookups)
        self._cache: collections.OrderedDict[tuple[str, str, str, str], _CachedOwner] = \
            collections.OrderedDict()
        self._forbidden_until: dict[str, float] = {}
        self._forbidden_logged: set[str] = set()
        self._log = RateLimitedLog(log, every=600.0)
        self.requests = 0

    def cycle(self, namespace: str, ref: ObjectRef) -> None:
        self._log.log(logging.WARNING, f"cycle {namespace}/{ref.kind}/{ref.name}",
                      "ownerReferences form a cycle; naming the workload where it closes",
                      source=SOURCE, namespace=namespace, owner_kind=ref.kind,
                      owner_name=ref.name)

    def parent(self, namespace: str, ref: ObjectRef) -> Lookup:
        from kubernetes.client.exceptions import ApiException

        resource = self._lookups.resource(ref)
        if resource is None or not ref.name or not is_clean(ref.name + namespace):
            return UNKNOWN  # a name with lone surrogates ("\\ud800") cannot be a URL
        key = (ref.group, ref.kind, namespace, ref.name)
        now = self._clock()
        cached = self._cache.get(key)
        if cached is not None:
            self._cache.move_to_end(key)
            same = not ref.uid or not cached.uid or cached.uid == ref.uid
            if same and (cached.gone or
                         now - cached.fetched_at < self._settings.owner_cache_ttl_seconds):
                return self._answer(cached)
        if self._forbidden_until.get(ref.kind, 0.0) > now:
            return UNKNOWN
        timeout = (self._settings.connect_timeout_seconds, self._settings.owner_timeout_seconds)
        prefix = f"/apis/{ref.api_version}" if ref.group else "/api/v1"
        path = f"{prefix}/namespaces/{quote(namespace, safe='')}/{resource}/" \
            f"{quote(ref.name, safe='')}"
        self.requests += 1
        try:
            body = json.loads(self._api.get(path, {}, timeout,
                                            accept=PARTIAL_OBJECT_METADATA).data)
        except ApiException as exc:
            if exc.status == 403:
                self._forbidden_until[ref.kind] = \
                    now + self._settings.owner_forbidden_retry_seconds
                self._report(Fault(SOURCE, "permission", f"get {ref.kind}",
                                   "forbidden; using labels and name rules for workload names"))
                if ref.kind not in self._forbidden_logged:
                    self._forbidden_logged.add(ref.kind)
                    log.warning("RBAC does not allow get %s.%s; naming their pods' workloads "
                                "by labels and name rules", resource, ref.group,
                                extra={"source": SOURCE, "kind": ref.kind})
                return UNKNOWN
            if exc.status == 404:
                return self._gone(key, ref, cached, now)
            self._pause(ref.kind)
            self._report(Fault(SOURCE, "api", f"get {ref.kind}", f"HTTP {exc.status}"))
            return UNKNOWN
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            self._pause(ref.kind)
            self._report(Fault(SOURCE, "timeout" if _is_timeout(exc) else "api",
                               f"get {ref.kind}", str(exc)[:200]))
            return UNKNOWN
        metadata = (body.get("metadata") or {}) if isinstance(body, Mapping) else {}
        if not isinstance(metadata, Mapping):
            metadata = {}
        uid = str(metadata.get("uid", ""))
        found = _CachedOwner(uid, controller_ref(metadata), now)
        if ref.uid and uid and uid != ref.uid:
            # The name belongs to a new object now; the one referenced is gone.
            answer = self._gone(key, ref, cached, now)
            self._remember(key, found)
            return answer
        self._remember(key, found)
        return self._answer(found)

    @staticmethod
    def _answer(entry: _CachedOwner) -> Lookup:
        if entry.parent is not None:
            return Lookup("parent", entry.parent)
        return GONE if entry.gone else TOP

    def _gone(self, key: tuple[str, str, str, str], ref: ObjectRef,
              cached: _CachedOwner | None, now: float) -> Lookup:
        """The referenced object is gone: keep what was known of it for its uid."""
        known = cached if cached is not None and (
            not ref.uid or not cached.uid or cached.uid == ref.uid) else None
        entry = _CachedOwner(ref.uid, known.parent if known else None, now, gone=True)
        self._remember(key, entry)
        return self._answer(entry)

    def _pause(self, kind: str) -> None:
        """One failed lookup pauses that kind, so a relist of 110 pods during API trouble
        costs one failed request, not 110."""
        self._forbidden_until[kind] = self._clock() + self._settings.owner_error_retry_seconds

    def _remember(self, key: tuple[str, str, str, str], entry: _CachedOwner) -> None:
        self._cache[key] = entry
        self._cache.move_to_end(key)
        while len(self._cache) > self._settings.owner_cache_size:
            self._cache.popitem(last=False)


def _is_timeout(exc: BaseException) -> bool:
    if isinstance(exc, urllib3.exceptions.MaxRetryError) and exc.reason is not None:
        return _is_timeout(exc.reason)
    if isinstance(exc, urllib3.exceptions.NewConnectionError):
        # Refused, unreachable or unresolvable: urllib3 makes it a ConnectTimeoutError
        # subclass for compatibility only; nothing timed out.
        return False
    return isinstance(exc, urllib3.exceptions.TimeoutError | TimeoutError)


class WatchHealth:
    """What the watcher thread tells the sampler thread: up or down, and faults since the
    last ``drain``.

    Up means the pod index is being kept current: a watch is open, or the API answered
    within ``grace_seconds`` (a list, or the moments between one watch and the next). A
    failed request makes it down at once; so does no watch for longer than the grace,
    whatever the reason (the request gate, a request that hangs before its headers).
    """

    def __init__(self, grace_seconds: float = DEFAULT_WATCH_SETTINGS.no_watch_grace_seconds,
                 clock: Callable[[], float] = time.monotonic, source: str = SOURCE) -> None:
        self._source = source
        self._grace = grace_seconds
        self._clock = clock
        self._lock = threading.Lock()
        self._faults: list[Fault] = []
        self._failing = False
        self._watch_open = False
        self._last_answer: float | None = None  # an answer, or the end of a watch
        self._reported_up = False

    def report(self, fault: Fault) -> None:
        with self._lock:
            if len(self._faults) < 1000:  # bounded if nobody drains (no sampler yet)
                self._faults.append(fault)

    def answered(self) -> None:
        """A list page or a watch request was answered."""
        with self._lock:
            self._failing = False
            self._last_answer = self._clock()

    def watch_opened(self) -> None:
        with self._lock:
            self._failing = False
            self._watch_open = True
            self._last_answer = self._clock()

    def watch_closed(self) -> None:
        with self._lock:
            if self._watch_open:
                self._last_answer = self._clock()
            self._watch_open = False

    def failed(self) -> None:
        with self._lock:
            self._failing = True

    def _evaluate(self) -> bool:
        up = not self._failing and (self._watch_open or (
            self._last_answer is not None
            and self._clock() - self._last_answer <= self._grace))
        if up != self._reported_up:
            self._reported_up = up
            log.info("kubernetes API %s", "reachable" if up else "unreachable",
                     extra={"source": self._source, "watch_open": self._watch_open})
        return up

    @property
    def up(self) -> bool:
        with self._lock:
            return self._evaluate()

    def drain(self) -> tuple[bool, list[Fault]]:
        """(source up, faults since the last call)."""
        with self._lock:
            faults, self._faults = self._faults, []
            return self._evaluate(), faults


class ListWatcher:
    """A node-scoped list+watch loop (the protocol above). Subclasses name the collection
    (``path``, ``source``, ``what``) and keep what they read (``_replace``, ``_apply_one``).
    ``run`` blocks; start it on a daemon thread with ``start``."""

    path = "/api/v1/pods"
    source = SOURCE
    what = "pods"

    def __init__(self, api_client: Any, node_name: str,
                 settings: WatchSettings = DEFAULT_WATCH_SETTINGS,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 health: WatchHealth | None = None) -> None:
        self._api = ApiRequests(api_client)
        self._node = node_name
        self._selector = f"spec.nodeName={node_name}"
        self._settings = settings
        self._clock = clock
        self._rng = rng or random.Random()
        self.health = health or WatchHealth(settings.no_watch_grace_seconds)
        self._faultlog = RateLimitedLog(log, every=60.0)
        self._foreignlog = RateLimitedLog(log, every=600.0)
        self._stop = threading.Event()
        self._tokens = float(settings.max_attempts_per_window)
        self._tokens_at = time.monotonic()
        self._active_watch: Any = None
        self._thread: threading.Thread | None = None
        self.resource_version: str | None = None
        self.lists = 0
        self.watches = 0
        self.events = 0
        self.foreign_pods_dropped = 0  # objects of other nodes the API sent anyway

    # -- what a subclass keeps ------------------------------------------------------------

    def _replace(self, items: list[Mapping[str, Any]]) -> None:
        """A full list of this node's objects."""
        raise NotImplementedError

    def _apply_one(self, kind: str, obj: Mapping[str, Any]) -> None:
        """One ADDED, MODIFIED or DELETED object of this node."""
        raise NotImplementedError

    def report(self, fault: Fault) -> None:
        self.health.report(fault)

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> threading.Thread:
        self._thread = threading.Thread(target=self.run, name=f"kwatt-{self.what}-watch",
                                        daemon=True)
        self._thread.start()
        return self._thread

    def stop(self) -> None:
        self._stop.set()
        active = self._active_watch
        if active is not None:
            active.stop()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop -------------------------------------------------------------------------

    def _gate(self) -> bool:
        """Wait for a request token; False when stopping. A token bucket, not a window:
        after a burst the next request waits one refill (5 s by default), where a full
        window would keep the watch closed for most of a minute."""
        settings = self._settings
        capacity = float(settings.max_attempts_per_window)
        per_second = capacity / settings.attempt_window_seconds
        while not self._stop.is_set():
            now = time.monotonic()
            self._tokens = min(capacity, self._tokens + (now - self._tokens_at) * per_second)
            self._tokens_at = now
            if self._tokens >= 1.0:
                self._tokens -= 1.0
                return True
            self._stop.wait((1.0 - self._tokens) / per_second)
        return False

    def run(self) -> None:
        settings = self._settings
        failures = 0
        while self._gate():
            started = time.monotonic()
            try:
                if self.resource_version is None:
                    self.resource_version = self._list(consistent=self.lists > 0)
                self._watch()
                if time.monotonic() - started >= settings.healthy_after_seconds:
                    failures = 0
                continue  # a watch that ended normally: resume from the resourceVersion
            except GoneError:
                log.info(f"{self.what} watch resourceVersion expired; listing again",
                         extra={"source": self.source,
                                "resource_version": self.resource_version})
                self.resource_version = None
                continue
            except Exception as exc:  # every failure is counted and retried, never fatal
                if self._stop.is_set():
                    break
                fault = _fault_for(exc, self.source, self.what)
                self.report(fault)
                self.health.failed()
                self._faultlog.log(logging.WARNING, fault.reason,
                                   f"{self.what} list/watch failed", source=self.source,
                                   reason=fault.reason, detail=fault.detail)
            failures += 1
            delay = min(settings.backoff_max_seconds,
                        settings.backoff_initial_seconds * 2 ** min(failures - 1, 30))
            self._stop.wait(delay * self._rng.uniform(0.5, 1.0))
        self.health.failed()

    def _list(self, consistent: bool) -> str:
        """Full list of this node's objects; returns the list's resourceVersion."""
        from kubernetes.client.exceptions import ApiException

        settings = self._settings
        items: list[Mapping[str, Any]] = []
        token: str | None = None
        resource_version = ""
        while True:
            query: dict[str, object] = {"fieldSelector": self._selector}
            if token:
                query["continue"] = token
            elif not consistent:
                query["resourceVersion"] = "0"  # served from the API server's cache
            if token or consistent:
                query["limit"] = settings.list_page_size
            try:
                response = self._api.get(
                    self.path, query,
                    (settings.connect_timeout_seconds, settings.list_timeout_seconds))
            except ApiException as exc:
                if exc.status == 410:
                    raise GoneError from exc
                raise
            body = json.loads(response.data)
            self.health.answered()
            items.extend(item for item in body.get("items") or []
                         if isinstance(item, Mapping) and self._on_this_node(item))
            metadata = body.get("metadata") or {}
            resource_version = str(metadata.get("resourceVersion") or resource_version)
            token = metadata.get("continue") or None
            if not token:
                break
            if self._stop.is_set() or not self._gate():
                raise InterruptedError("stopping")
        self._replace(items)
        self.lists += 1
        log.info(f"listed {self.what}", extra={"source": self.source, self.what: len(items),
                                               "resource_version": resource_version})
        return resource_version

    def _connect(self, *, watch: bool, _preload_content: bool,
                 _request_timeout: tuple[float, float], resource_version: str | None,
                 timeout_seconds: int) -> Any:
        """The watch request, called by ``Watch.stream``; an answer means the API is up."""
        response = self._api.get(self.path, {
            "fieldSelector": self._selector, "watch": "true", "allowWatchBookmarks": "true",
            "resourceVersion": resource_version, "timeoutSeconds": timeout_seconds,
        }, _request_timeout)
        self.health.watch_opened()
        return response

    def _watch(self) -> None:
        from kubernetes import watch
        from kubernetes.client.exceptions import ApiException

        settings = self._settings
        timeout = self._rng.randint(settings.watch_timeout_min_seconds,
                                    settings.watch_timeout_max_seconds)
        # return_type "object" keeps events as plain dicts (no model classes). Not
        # deserialize=False: kubernetes 37.0.2 then fails on ERROR events (KeyError
        # 'raw_object'), which is how a 410 Gone arrives.
        stream: Any = cast(Any, watch).Watch(return_type="object")
        self._active_watch = stream
        self.watches += 1
        try:
            events: Iterator[Mapping[str, Any]] = stream.stream(
                self._connect, resource_version=self.resource_version,
                timeout_seconds=timeout,
                _request_timeout=(settings.connect_timeout_seconds,
                                  settings.read_timeout_seconds))
            for event in events:
                self._apply(event)
                if self._stop.is_set():
                    stream.stop()
        except ApiException as exc:
            if exc.status == 410:
                raise GoneError from exc
            raise
        finally:
            self._active_watch = None
            self.health.watch_closed()

    def _on_this_node(self, pod: Mapping[str, Any]) -> bool:
        """The fieldSelector, applied again: an API or proxy that ignores it would make
        every pod of the cluster a kwatt_pod_info series on every node."""
        spec = pod.get("spec")
        if isinstance(spec, Mapping) and spec.get("nodeName") == self._node:
            return True
        self.foreign_pods_dropped += 1
        self._foreignlog.log(
            logging.WARNING, "foreign", f"the API sent {self.what} of other nodes despite "
            f"fieldSelector={self._selector}; dropping them", source=self.source,
            node=self._node, dropped_total=self.foreign_pods_dropped)
        return False

    def _apply(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        obj = event.get("object")
        if not isinstance(obj, Mapping):
            return
        metadata = obj.get("metadata") or {}
        version = metadata.get("resourceVersion") if isinstance(metadata, Mapping) else None
        if kind in ("ADDED", "MODIFIED", "DELETED") and self._on_this_node(obj):
            self._apply_one(str(kind), obj)
            self.events += 1
        if isinstance(version, str) and version:
            self.resource_version = version  # BOOKMARK: just this


def _fault_for(exc: BaseException, source: str = SOURCE, what: str = "pods") -> Fault:
    from kubernetes.client.exceptions import ApiException

    if isinstance(exc, ApiException):
        reason = "permission" if exc.status in (401, 403) else "api"
        return Fault(source, reason, what, f"HTTP {exc.status} {exc.reason or ''}".strip())
    if _is_timeout(exc):
        return Fault(source, "timeout", what, str(exc)[:200])
    if isinstance(exc, ValueError):
        return Fault(source, "parse", what, str(exc)[:200])
    return Fault(source, "api", what, f"{type(exc).__name__}: {str(exc)[:200]}")


class PodWatcher(ListWatcher):
    """This node's pods, kept in a ``PodStore``."""

    def __init__(self, api_client: Any, node_name: str, store: PodStore,
                 owners: OwnerResolver, label_allowlist: tuple[str, ...],
                 settings: WatchSettings = DEFAULT_WATCH_SETTINGS,
                 clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None,
                 health: WatchHealth | None = None) -> None:
        super().__init__(api_client, node_name, settings, clock, rng, health)
        self._store = store
        self._owners = owners
        self._allowlist = label_allowlist

    def _replace(self, items: list[Mapping[str, Any]]) -> None:
        records: list[PodRecord] = []
        for item in items:
            record = pod_record(item, self._owners, self._allowlist)
            if record is not None:
                records.append(record)
        self._store.replace_all(records)

    def _apply_one(self, kind: str, obj: Mapping[str, Any]) -> None:
        record = pod_record(obj, self._owners, self._allowlist)
        if record is None:
            return
        if kind == "DELETED":
            self._store.delete(record)
        else:
            self._store.upsert(record)
