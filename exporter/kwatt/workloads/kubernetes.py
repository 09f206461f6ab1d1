"""Kubernetes mode: pod metadata for container names, its health, and ``kwatt_pod_info``.

``build_kubernetes(config)`` returns the pieces ``__main__`` wires in:

* ``namer``: a ``KubernetesNamer`` over the pod index (podindex.py);
* ``stage``: an ``EnergyStage`` with no energy of its own that reports
  ``kwatt_source_up{source="kubernetes"}`` and the watcher's faults each sampler cycle;
* ``collector``: renders ``kwatt_pod_info`` from the index (no I/O on scrape);
* ``watcher``: the list+watch thread (podwatch.py); call ``start()``;
* ``slices``: with GPUs and ``--gpu.dra on``, the ResourceSlice list+watch thread
  (resourceslices.py) whose store maps DRA devices to GPU UUIDs; call ``start()`` too.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from kwatt.attribution import ComponentSplit
from kwatt.config import Config, ConfigError
from kwatt.ledger import WorkloadLabels
from kwatt.sampler import StageResult
from kwatt.workloads import resourceslices
from kwatt.workloads.cgroups import CgroupIdentity
from kwatt.workloads.podindex import KubernetesNamer, PodIndex, PodStore
from kwatt.workloads.podwatch import (
    DEFAULT_WATCH_SETTINGS,
    SOURCE,
    ApiOwnerResolver,
    PodWatcher,
    WatchHealth,
    WatchSettings,
)
from kwatt.workloads.resourceslices import ResourceSliceWatcher, SliceStore

log = logging.getLogger("kwatt.kubernetes")

_INVALID_LABEL_CHARS = re.compile(r"[^a-zA-Z0-9_]")


def kubernetes_enabled(config: Config, exists: Callable[[str], bool] = os.path.exists) -> bool:
    """``on``; ``off``; ``auto``: on with a configured kubeconfig or when the service-account
    token exists. $KUBECONFIG alone does not switch ``auto`` on, so a workstation that has
    one set keeps host mode; it is still the config used when Kubernetes is on."""
    if config.kubernetes == "on":
        return True
    if config.kubernetes == "off":
        return False
    return config.kubeconfig is not None or exists(
        os.path.join(config.service_account_dir, "token"))


def sanitize_label_name(name: str) -> str:
    """kube-state-metrics style: ``app.kubernetes.io/name`` -> ``label_app_kubernetes_io_name``."""
    return "label_" + _INVALID_LABEL_CHARS.sub("_", name)


def pod_info_labels(allowlist: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """(pod label, metric label) pairs; the first of two names that sanitise alike wins."""
    seen: dict[str, str] = {}
    for name in allowlist:
        metric_label = sanitize_label_name(name)
        if metric_label in seen:
            log.warning("pod label allowlist entries collide after sanitising; keeping the "
                        "first", extra={"kept": seen[metric_label], "dropped": name,
                                        "label": metric_label})
            continue
        seen[metric_label] = name
    return tuple((pod_label, metric_label) for metric_label, pod_label in seen.items())


class PodInfoCollector(Collector):
    """``kwatt_pod_info``: one series per pod in the index, tombstones included, so energy
    series of finished pods can still be joined for as long as they are retained."""

    def __init__(self, index: Callable[[], PodIndex], node: str,
                 allowlist: Sequence[str]) -> None:
        self._index = index
        self._node = node
        self._labels = pod_info_labels(allowlist)

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "kwatt_pod_info",
            "Pods on this node with their workload (the top owner), their own controller "
            "(owner_kind, owner_name), QoS class and allowlisted pod labels; always 1. "
            "Join on namespace and pod.",
            labels=("node", "namespace", "pod", "uid", "workload", "workload_kind",
                    "owner_kind", "owner_name", "qos_class",
                    *(metric for _, metric in self._labels)))
        for record in self._index().pods.values():
            present = dict(record.labels)
            family.add_metric(
                (self._node, record.namespace, record.name, record.uid, record.workload,
                 record.workload_kind, record.owner_kind, record.owner_name,
                 record.qos_class,
                 *(present.get(pod_label, "") for pod_label, _ in self._labels)), 1.0)
        yield family


class KubernetesHealthStage:
    """An ``EnergyStage`` that books no energy: it folds the watcher's health into the
    sampler cycle (``kwatt_source_up{source="kubernetes"}``, ``kwatt_source_errors_total``),
    and prunes expired tombstones from the index."""

    def __init__(self, watcher: PodWatcher, store: PodStore,
                 slices: ResourceSliceWatcher | None = None) -> None:
        self._watcher = watcher
        self._store = store
        self._slices = slices

    def sample(self, now: float,
               workloads: Mapping[CgroupIdentity, WorkloadLabels | None]) -> StageResult:
        up, faults = self._watcher.health.drain()
        source_up = {SOURCE: up}
        if self._slices is not None:
            slices_up, slice_faults = self._slices.health.drain()
            # An API server without ResourceSlices has no DRA: nothing to read is not down.
            source_up[resourceslices.SOURCE] = slices_up or not self._slices.served
            faults = [*faults, *slice_faults]
        self._store.prune()
        splits: tuple[ComponentSplit[Hashable], ...] = ()
        return StageResult(splits=splits, faults=tuple(faults), source_up=source_up)


@dataclass(frozen=True)
class KubernetesParts:
    namer: KubernetesNamer
    stage: KubernetesHealthStage
    collector: PodInfoCollector
    watcher: PodWatcher
    store: PodStore
    api_client: Any = None  # for single reads elsewhere (the node's zone label)
    slices: ResourceSliceWatcher | None = None


def api_client_for(config: Config) -> Any:
    """An ApiClient as kubectl picks its config: --kubeconfig (or KWATT_KUBECONFIG, or
    kubernetes.kubeconfig in the YAML), else $KUBECONFIG, else the in-cluster service
    account."""
    from kubernetes import client
    from kubernetes import config as kube_config
    from kubernetes.config.config_exception import ConfigException
    from kubernetes.config.incluster_config import InClusterConfigLoader

    configuration = client.Configuration()
    try:
        kubeconfig = config.kubeconfig or config.kubeconfig_env
        if kubeconfig:
            # A ':'-joined KUBECONFIG list is merged by the client, as kubectl does.
            cast(Any, kube_config).load_kube_config(config_file=kubeconfig,
                                                    client_configuration=configuration)
        else:
            cast(Any, InClusterConfigLoader)(
                token_filename=os.path.join(config.service_account_dir, "token"),
                cert_filename=os.path.join(config.service_account_dir, "ca.crt"),
            ).load_and_set(configuration)
    except (ConfigException, OSError, ValueError, TypeError) as exc:
        key = "--kubeconfig" if config.kubeconfig else \
            "KUBECONFIG" if config.kubeconfig_env else "kubernetes.service_account_dir"
        raise ConfigError(f"{key}: cannot load Kubernetes client config: {exc}") from None
    # Our own loop retries with backoff; urllib3's hidden retries would multiply the
    # per-request timeout and hide failures.
    configuration.retries = False
    return client.ApiClient(configuration=configuration)


def build_kubernetes(config: Config, clock: Callable[[], float] = time.monotonic,
                     settings: WatchSettings = DEFAULT_WATCH_SETTINGS,
                     slices: SliceStore | None = None) -> KubernetesParts:
    """The Kubernetes pieces; raises ConfigError when the client cannot be configured.
    With ``slices``, this node's ResourceSlices are watched into it."""
    if not config.node_name:
        raise ConfigError("--node-name: required when Kubernetes metadata is on")
    api_client = api_client_for(config)
    store = PodStore(config.retention_seconds, clock)
    health = WatchHealth(settings.no_watch_grace_seconds)
    owners = ApiOwnerResolver(api_client, settings, clock, health.report,
                              config.owner_lookups)
    watcher = PodWatcher(api_client, config.node_name, store, owners,
                         config.pod_label_allowlist, settings, clock, health=health)
    slice_watcher = None
    if slices is not None:
        slice_watcher = ResourceSliceWatcher(
            api_client, config.node_name, slices, settings=settings, clock=clock,
            health=WatchHealth(settings.no_watch_grace_seconds, source=resourceslices.SOURCE))
    return KubernetesParts(
        namer=KubernetesNamer(store.current),
        stage=KubernetesHealthStage(watcher, store, slice_watcher),
        collector=PodInfoCollector(store.current, config.node_name,
                                   config.pod_label_allowlist),
        watcher=watcher, store=store, api_client=api_client, slices=slice_watcher)
