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
from kwatt.workloads.podindex import Owner, OwnerResolver, PodRecord, PodStore, pod_record

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

    def get(self, path: str, query: Mapping[str, object], timeout: tuple[float, float]) -> Any:
        """The urllib3 response, body not read; raises ApiException on a non-2xx status."""
        from kubernetes.client.exceptions import ApiException

        params = self._client.param_serialize(
            method="GET", resource_path=path,
            query_params=[(k, v) for k, v in query.items() if v is not None],
            header_params={"Accept": "application/json"}, auth_settings=["BearerToken"])
        response = self._client.call_api(*params, _request_timeout=timeout)
        if not 200 <= response.status <= 299:
            response.read()
            raise ApiException.from_response(http_resp=response, body=None, data=None)
        return response.response


class ApiOwnerResolver(OwnerResolver):
    """Reads a ReplicaSet's or Job's own ownerReferences to find its Deployment or CronJob.

    RBAC: ``get`` on ``apps/replicasets`` and ``batch/jobs``. On 403 the lookups for that
    kind stop for ``owner_forbidden_retry_seconds`` (other failures: for
    ``owner_error_retry_seconds``) and the name rule answers instead.
    Results are cached (bounded LRU); never a list, only single ``get`` requests.
    """

    def __init__(self, api_client: Any, settings: WatchSettings,
                 clock: Callable[[], float], report: Callable[[Fault], None]) -> None:
        self._api = ApiRequests(api_client)
        self._settings = settings
        self._clock = clock
        self._report = report
        self._cache: collections.OrderedDict[tuple[str, str, str], Owner | None] = \
            collections.OrderedDict()
        self._forbidden_until: dict[str, float] = {}
        self.requests = 0

    def replicaset_owner(self, namespace: str, name: str) -> Owner | None:
        return self._lookup("ReplicaSet", namespace, name, {"Deployment"})

    def job_owner(self, namespace: str, name: str) -> Owner | None:
        return self._lookup("Job", namespace, name, {"CronJob"})

    def _lookup(self, kind: str, namespace: str, name: str, parents: set[str]) -> Owner | None:
        from kubernetes.client.exceptions import ApiException

        key = (kind, namespace, name)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        if self._forbidden_until.get(kind, 0.0) > self._clock():
            return None
        timeout = (self._settings.connect_timeout_seconds, self._settings.owner_timeout_seconds)
        self.requests += 1
        try:
            group = "apps/v1/namespaces/{}/replicasets/{}" if kind == "ReplicaSet" \
                else "batch/v1/namespaces/{}/jobs/{}"
            path = "/apis/" + group.format(quote(namespace, safe=""), quote(name, safe=""))
            body = json.loads(self._api.get(path, {}, timeout).data)
        except ApiException as exc:
            if exc.status == 403:
                self._forbidden_until[kind] = \
                    self._clock() + self._settings.owner_forbidden_retry_seconds
                self._report(Fault(SOURCE, "permission", f"get {kind}",
                                   "forbidden; using the name rule for workload names"))
            elif exc.status == 404:
                self._remember(key, None)  # gone already: the name rule it is
            else:
                self._pause(kind)
                self._report(Fault(SOURCE, "api", f"get {kind}", f"HTTP {exc.status}"))
            return None
        except (urllib3.exceptions.HTTPError, OSError, ValueError) as exc:
            self._pause(kind)
            self._report(Fault(SOURCE, "timeout" if _is_timeout(exc) else "api",
                               f"get {kind}", str(exc)[:200]))
            return None
        refs = ((body.get("metadata") or {}).get("ownerReferences") or []) \
            if isinstance(body, Mapping) else []
        owner: Owner | None = Owner(name, kind)
        for ref in refs:
            if isinstance(ref, Mapping) and ref.get("controller") \
                    and ref.get("kind") in parents:
                owner = Owner(str(ref.get("name", "")), str(ref["kind"]))
        self._remember(key, owner)
        return owner

    def _pause(self, kind: str) -> None:
        """One failed lookup pauses that kind, so a relist of 110 pods during API trouble
        costs one failed request, not 110."""
        self._forbidden_until[kind] = self._clock() + self._settings.owner_error_retry_seconds

    def _remember(self, key: tuple[str, str, str], owner: Owner | None) -> None:
        self._cache[key] = owner
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
